"""The pipeline's causal-LM task: prompt + completion data, the letters task, scoring generated completions, and a
run end to end with on-policy distillation against the SFT baseline."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_distill.pipeline import causal, parse_args, run_pipeline
from hf_distill.pipeline.data import prepare_data

TINY_GPT2 = '{"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32}'
LETTERS_RUN = [
    "--task", "causal-lm", "--dataset", "offline:letters", "--processor", "offline:letters",
    "--teacher_config", TINY_GPT2, "--max_length", "32", "--teacher_max_train_samples", "64",
    "--max_train_samples", "32", "--max_eval_samples", "8", "--eval_max_new_tokens", "10",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4", "--num_train_epochs", "1",
    "--teacher_num_train_epochs", "1", "--latency_repeats", "1", "--latency_batch_sizes", "1",
    "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "0",
]  # fmt: skip


def test_the_letters_checker_accepts_every_order_of_the_prompts_letters_and_nothing_else():
    prompt = "a c d f g h k m ="
    assert causal.letters_valid(prompt, "m k h g f d c a")
    assert causal.letters_valid(prompt, " a c d f g h k m ")
    assert not causal.letters_valid(prompt, "a c d f g h k")  # one missing
    assert not causal.letters_valid(prompt, "a c d f g h k k")  # one twice
    assert not causal.letters_valid(prompt, "a c d f g h k m m")  # one more
    assert not causal.letters_valid(prompt, "a c d f g h k b")  # one not in the prompt
    splits = causal.letters()
    assert {name: len(split) for name, split in splits.items()} == causal.LETTERS_SIZES
    assert all(causal.letters_valid(row["prompt"], row["completion"]) for row in splits["validation"])
    assert splits["train"][0] == causal.letters()["train"][0]  # the same examples every time


def test_an_example_is_the_prompt_then_the_completion_and_its_end_with_labels_on_the_completion_alone():
    tokenizer = AutoTokenizer.from_pretrained(causal.letters_tokenizer_dir())
    rows = causal.tokenize(
        {"prompt": ["a c ="], "completion": ["c a"]}, tokenizer, "prompt", "completion", max_length=32
    )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    a, c, equals = tokenizer.convert_tokens_to_ids(["a", "c", "="])
    assert rows["input_ids"] == [[bos, a, c, equals, c, a, eos]]
    assert rows["labels"] == [[-100, -100, -100, -100, c, a, eos]]
    assert rows["attention_mask"] == [[1] * 7]
    # A long completion is cut to max_length; a prompt that leaves no room for one token is refused.
    cut = causal.tokenize({"prompt": ["a ="], "completion": ["a b c d"]}, tokenizer, "prompt", "completion", 5)
    assert cut["labels"] == [[-100, -100, -100, a, tokenizer.convert_tokens_to_ids("b")]]
    with pytest.raises(ValueError, match="raise --max_length"):
        causal.tokenize({"prompt": ["a b c ="], "completion": ["a"]}, tokenizer, "prompt", "completion", 5)


class Echo(torch.nn.Module):
    """A stand-in causal LM: its logits put all the mass on `answer`'s tokens in turn, and `generate` writes them."""

    def __init__(self, answers: list[list[int]], vocab: int, eos: int, sampled: list[list[int]] | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answers = {False: answers, True: answers if sampled is None else sampled}
        self.vocab, self.eos = vocab, eos
        self.calls = {False: 0, True: 0}
        self.sampling = []

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()

    def generate(self, input_ids, attention_mask, generation_config):
        sample = generation_config.do_sample
        if sample:  # sampled from the full distribution at temperature 1, the same stream for every model
            self.sampling.append((generation_config.temperature, generation_config.top_k, torch.rand(1).item()))
        rows = self.answers[sample][self.calls[sample] : self.calls[sample] + input_ids.shape[0]]
        self.calls[sample] += input_ids.shape[0]
        width = max(len(row) for row in rows) + 2
        new = torch.full((len(rows), width), self.eos)
        for index, row in enumerate(rows):
            new[index, : len(row)] = torch.tensor(row)
        return torch.cat([input_ids, new], dim=1)


def test_generated_completions_are_scored_by_the_metric_and_the_references_give_the_perplexity():
    """Three held-out prompts; the stand-in answers one validly, one with a repeat, one exactly as the reference.
    Its logits are uniform, so the perplexity of any reference is the vocabulary size."""
    tokenizer = AutoTokenizer.from_pretrained(causal.letters_tokenizer_dir())
    references = causal.letters()["validation"].select(range(3))
    settings = {"prompt": "prompt", "completion": "completion", "max_length": 32}
    split = references.map(causal.tokenize, batched=True, remove_columns=references.column_names,
                           fn_kwargs={"tokenizer": tokenizer, **settings})  # fmt: skip
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    letters = [row["prompt"].split()[:-1] for row in references]
    answers = [ids(" ".join(reversed(letters[0]))), ids(" ".join(letters[1][:7] + letters[1][:1])),
               ids(references[2]["completion"])]  # fmt: skip
    from transformers import DataCollatorForSeq2Seq

    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    score = lambda metric, model: causal.evaluate_generation(  # noqa: E731
        model, split, collator, tokenizer, references, metric, batch_size=2, max_new_tokens=10
    )
    # Sampled, it answers the first prompt validly and the others with a repeat.
    sampled = [answers[0], answers[1], answers[1]]
    echo = Echo(answers, len(tokenizer), tokenizer.eos_token_id, sampled)
    checked = score("letters", echo)
    assert checked["accuracy"] == pytest.approx(2 / 3)
    assert checked["sampled_accuracy"] == pytest.approx(1 / 3)
    assert [setting[:2] for setting in echo.sampling] == [(1.0, 0), (1.0, 0)]
    # Every model is sampled from the same random stream (batch by batch), whatever the random state before.
    torch.manual_seed(1234)
    again = Echo(answers, len(tokenizer), tokenizer.eos_token_id, sampled)
    score("letters", again)
    assert again.sampling == echo.sampling
    assert checked["perplexity"] == pytest.approx(len(tokenizer), rel=1e-5)
    assert score("exact_match", Echo(answers, len(tokenizer), tokenizer.eos_token_id))["accuracy"] == pytest.approx(
        1 / 3
    )
    mine = score("test_causal_pipeline:reverse_order", Echo(answers, len(tokenizer), tokenizer.eos_token_id))
    assert mine["accuracy"] == pytest.approx(1 / 3)
    # Perplexity alone generates nothing; its accuracy is the share of reference tokens ranked first.
    uniform = score("perplexity", Echo([], len(tokenizer), tokenizer.eos_token_id))
    assert set(uniform) == {"accuracy", "perplexity"}  # and no sampled accuracy


def reverse_order(prompt: str, completion: str) -> bool:
    """A checker given as module:function: the prompt's letters in reverse."""
    return completion.split() == list(reversed(prompt.split()[:-1]))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--generation_metric", "bleu"], "is not a metric"),
        (["--generation_metric", "no_such_module:check"], "cannot import check"),
        (["--transfer_dataset", "unused"], "a causal-LM example's completion is its label"),
        (["--processor", None], "needs a tokenizer"),
        (["--prompt_column", "question"], "no column 'question'"),
        (["--teacher_processor", "offline:letters-characters"], "cannot be made of its layers: give --student_config"),
        (
            ["--teacher_processor", "offline:letters-characters", "--student_config", TINY_GPT2, "--generations", "2"],
            "drop --generations",
        ),
    ],
)
def test_causal_lm_mistakes_are_refused_with_the_fix_before_any_training(tmp_path, flags, message):
    argv = [*LETTERS_RUN, "--output_dir", str(tmp_path)]
    if flags[1] is None:
        index = argv.index(flags[0])
        del argv[index : index + 2]
    else:
        argv += flags
    with pytest.raises(ValueError, match=message):
        args, config, _ = parse_args(argv)
        prepare_data(args.data_settings, seed=0)


def test_a_causal_lm_run_distils_on_policy_and_reports_generated_answers_against_the_sft_baseline(tmp_path):
    """Teacher trained here from a config, a student of its layers distilled on its own samples (lmbda 1,
    generalized JSD), the SFT baseline on the data's completions for as many steps, every model scored by the
    letters checker on its greedy completions; the student loads with AutoModelForCausalLM."""
    args, config, _ = parse_args(
        [*LETTERS_RUN, "--output_dir", str(tmp_path), "--lmbda", "1.0", "--baseline", "true",
         "--rollout_generation", '{"max_new_tokens": 10}',
         "--losses", '{"soft_target": {"weight": 1.0, "divergence": "generalized_jsd", "beta": 0.5}}']
    )  # fmt: skip
    report = run_pipeline(args, config)
    results = report["results"]
    assert set(results) == {"teacher", "student", "baseline"}
    for row in results.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and math.isfinite(row["perplexity"]) and row["perplexity"] > 1.0
        assert 0.0 <= row["sampled_accuracy"] <= 1.0
    assert report["training_steps"] == {"student": 4, "baseline": 4}
    assert report["generation_metric"] == "letters"
    assert report["completions"] == {"lmbda": 1.0, "seq_kd": False}
    with open(os.path.join(tmp_path, "report.md"), encoding="utf-8") as handle:
        text = handle.read()
    assert "greedy completion passes `letters`" in text and "lmbda = 1.0" in text
    assert "| sampled_accuracy |" in text and "sampled at temperature 1" in text
    student = AutoModelForCausalLM.from_pretrained(report["student_dir"])
    tokenizer = AutoTokenizer.from_pretrained(report["student_dir"])
    assert student.config.n_layer == 1 and len(tokenizer) == student.config.vocab_size
    with open(os.path.join(tmp_path, "report.json"), encoding="utf-8") as handle:
        assert json.load(handle)["task"] == "causal-lm"


def test_the_letters_recipe_runs_its_arms_as_student_kinds_at_small_sizes(tmp_path):
    """`letters-on-policy` with fewer examples and two of its arms: each arm a student kind from the same teacher,
    the on-policy arm on its own samples, each beside its SFT baseline, in one report."""
    from hf_distill.pipeline.kinds import run_student_kinds

    args, config, recipe = parse_args(
        ["--recipe", "letters-on-policy", "--output_dir", str(tmp_path), "--teacher_max_train_samples", "64",
         "--max_train_samples", "16", "--max_eval_samples", "8", "--teacher_num_train_epochs", "1",
         "--per_device_eval_batch_size", "8", "--latency_repeats", "1", "--latency_batch_sizes", "1",
         "--student_kinds", "supervised_kd", "on_policy_beta_1", "--use_cpu", "true", "--disable_tqdm", "true"]
    )  # fmt: skip
    report = run_student_kinds(args, config, recipe)
    assert list(report["results"]) == [
        "teacher", "supervised_kd", "supervised_kd baseline", "on_policy_beta_1", "on_policy_beta_1 baseline"
    ]  # fmt: skip
    kinds = report["kinds"]
    assert kinds["on_policy_beta_1"]["completions"] == {"lmbda": 1.0, "seq_kd": False}
    assert kinds["supervised_kd"]["completions"] is None
    assert kinds["on_policy_beta_1"]["losses"]["soft_target"]["beta"] == 1.0
    # Both arms trained as many steps from the same teacher (trained once, kept beside the kinds).
    assert {kind: run["training_steps"]["student"] for kind, run in kinds.items()} == {
        "supervised_kd": 1, "on_policy_beta_1": 1
    }  # fmt: skip
    assert os.path.isfile(os.path.join(tmp_path, "teacher", "model.safetensors"))


@pytest.mark.slow  # a teacher trained, a student kind and its baseline: about 40 s
def test_the_cross_tokenizer_recipe_trains_the_teacher_in_its_own_tokens_and_distils_across(tmp_path):
    """`letters-cross-tokenizer` at small sizes: the teacher is trained and scored on the character tokenizer's
    tokens, the fresh student on the letters tokenizer's, distilled with gold over aligned groups."""
    from hf_distill.pipeline.kinds import run_student_kinds

    args, config, recipe = parse_args(
        ["--recipe", "letters-cross-tokenizer", "--output_dir", str(tmp_path), "--teacher_max_train_samples", "64",
         "--max_train_samples", "16", "--max_eval_samples", "8", "--teacher_num_train_epochs", "1",
         "--per_device_eval_batch_size", "8", "--latency_repeats", "1", "--latency_batch_sizes", "1",
         "--student_kinds", "gold_last", "--num_train_epochs", "1", "--use_cpu", "true", "--disable_tqdm", "true",
         "--teacher_cache", str(tmp_path / "cache")]
    )  # fmt: skip
    report = run_student_kinds(args, config, recipe)
    assert list(report["results"]) == ["teacher", "gold_last", "gold_last baseline"]
    teacher = AutoTokenizer.from_pretrained(os.path.join(tmp_path, "teacher"))
    assert teacher.convert_ids_to_tokens(teacher("a c")["input_ids"]) == ["[BOS]", "a", " ", "c"]
    # The student distilled from a cache of the teacher's aligned groups, in the teacher's own vocabulary.
    cache = os.path.join(tmp_path, "cache", "gold_last")  # each kind its own cache
    cached = json.load(open(os.path.join(cache, "cache.json"), encoding="utf-8"))["contents"]["groups"]
    assert cached["variants"] == [[1.0, "last"]] and cached["width"] == len(teacher)
    run = report["kinds"]["gold_last"]
    assert run["losses"]["gold"]["merge"] == "last" and run["training_steps"]["student"] == 1
    for row in report["results"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and math.isfinite(row["perplexity"])
    student = AutoModelForCausalLM.from_pretrained(run["student_dir"])
    assert student.config.vocab_size == len(AutoTokenizer.from_pretrained(run["student_dir"]))

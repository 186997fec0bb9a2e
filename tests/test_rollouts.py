"""On-policy (lmbda) and sequence-level (seq_kd) distillation: where a step's completions come from, how they are
generated, and that training on them is exactly training on those sequences."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from helpers import (
    LM_EOS,
    LM_PAD,
    VOCAB,
    bert_classifier,
    causal_lm,
    config,
    pad_right,
    prompt_completion_dataset,
    seq2seq_dataset,
    t5,
)

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.losses import SampledTokenLoss
from hf_distill.rollouts import (
    GenerateBackend,
    completed_batch,
    cut_after_end,
    draw_source,
    generation_seed,
    rollout_generation_config,
    split_prompts,
)

JSD = {"soft_target": {"weight": 1.0, "divergence": "generalized_jsd", "beta": 0.5}}
EOS, PAD = LM_EOS, LM_PAD
collate = pad_right


def gpt2(seed: int, layers: int = 2):
    return causal_lm(seed, layers)


class Recording(DistillationTrainer):
    """Keeps every training micro-batch the losses see, with where its completions came from."""

    def compute_distillation_loss(self, student_outputs, teacher_outputs, inputs):
        if self.model.training:
            batch = {key: inputs[key].detach().clone() for key in ("input_ids", "attention_mask", "labels")}
            self.seen = getattr(self, "seen", []) + [(self.state.global_step, self.completion_source, batch)]
        return super().compute_distillation_loss(student_outputs, teacher_outputs, inputs)


class CountingBackend(GenerateBackend):
    """transformers' generate, recording each call: the model, whether it was training, the prompts' shape."""

    def __init__(self):
        self.calls = []

    def generate(self, model, input_ids, attention_mask, generation_config, synced_gpus):
        self.calls.append((model, model.training, tuple(input_ids.shape), synced_gpus))
        return super().generate(model, input_ids, attention_mask, generation_config, synced_gpus)


def trainer(tmp_path, losses=JSD, backend=None, trainer_class=Recording, data=None, teachers=None, **overrides):
    settings = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        train_sampling_strategy="sequential",
        rollout_generation={"max_new_tokens": 6},
    )
    settings.update(overrides)
    return trainer_class(
        model=gpt2(2),
        teacher_model=gpt2(1, layers=3) if teachers is None else teachers(),
        args=config(tmp_path, losses, **settings),
        train_dataset=prompt_completion_dataset() if data is None else data,
        data_collator=collate,
        rollout_backend=backend,
    )


# ---- the parts ---------------------------------------------------------------------------------------------------


def test_a_prompt_is_what_precedes_the_first_label_and_padding_is_left_out():
    batch = {
        "input_ids": torch.tensor([[0, 0, 5, 6, 7, 8], [5, 6, 7, 8, 9, 0]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, -100, 6, 7, 8], [-100, -100, 7, 8, 9, -100]]),
    }
    prompts = split_prompts(batch)
    assert [prompt.tolist() for prompt in prompts] == [[5], [5, 6]]


@pytest.mark.parametrize(
    "batch, message",
    [
        ({"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([[-100, -100]])}, "no label that is not -100"),
        ({"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([[5, 6]])}, "its prompt is empty"),
        ({"input_ids": torch.tensor([[5, 6]])}, "needs labels"),
        (
            {"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([[-100, 6]]), "token_type_ids": None},
            "token_type_ids",
        ),
    ],
)
def test_batches_without_a_prompt_and_a_completion_are_refused_with_what_to_do(batch, message):
    with pytest.raises(ValueError, match=message):
        split_prompts(batch)


def test_a_completion_ends_at_its_first_end_of_sequence_token_which_it_keeps():
    assert cut_after_end(torch.tensor([5, 6, EOS, 7, EOS]), (EOS,)).tolist() == [5, 6, EOS]
    assert cut_after_end(torch.tensor([5, 6, 7]), (EOS,)).tolist() == [5, 6, 7]
    assert cut_after_end(torch.tensor([5, 9, 7]), (9, EOS)).tolist() == [5, 9]  # any of several end tokens


def test_a_completed_batch_is_right_padded_with_labels_on_the_completion_only():
    batch = completed_batch(
        [torch.tensor([5, 6]), torch.tensor([7])], [torch.tensor([8, EOS]), torch.tensor([9])], PAD
    )
    assert batch["input_ids"].tolist() == [[5, 6, 8, EOS], [7, 9, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 8, EOS], [-100, 9, -100, -100]]


def test_the_draw_is_a_function_of_the_seed_and_the_step_with_lmbda_as_its_frequency():
    draws = [draw_source(3, step, 0.3, seq_kd=True) for step in range(2000)]
    assert draws == [draw_source(3, step, 0.3, seq_kd=True) for step in range(2000)]
    assert set(draws) == {"student", "teacher"}
    assert abs(draws.count("student") / len(draws) - 0.3) < 0.04
    assert {draw_source(3, step, 0.3, seq_kd=False) for step in range(200)} == {"student", "data"}
    assert {draw_source(3, step, 0.0, seq_kd=False) for step in range(200)} == {"data"}
    assert {draw_source(3, step, 1.0, seq_kd=True) for step in range(200)} == {"student"}
    assert draws != [draw_source(4, step, 0.3, seq_kd=True) for step in range(2000)]
    assert generation_seed(1, 5, 0) == generation_seed(1, 5, 0) != generation_seed(1, 5, 1)


def test_generation_settings_take_a_generation_config_or_its_fields_and_refuse_others():
    config = rollout_generation_config({"max_new_tokens": 7, "top_p": 0.9})
    assert (config.max_new_tokens, config.top_p, config.do_sample, config.use_cache) == (7, 0.9, True, True)
    with pytest.raises(ValueError, match="max_new_tokn"):
        rollout_generation_config({"max_new_tokn": 7})
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        rollout_generation_config({"max_new_tokens": 0})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"lmbda": 1.5}, "lmbda is a probability"),
        ({"lmbda": 0.5, "teacher_cache": "cache"}, "drop teacher_cache"),
        ({"seq_kd": True, "teacher_cache": "cache"}, "drop teacher_cache"),
        ({"rollout_generation": '{"max_new": 3}'}, "GenerationConfig does not know"),
    ],
)
def test_rollout_settings_are_checked_when_the_config_is_built(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), **settings)


def test_a_student_that_is_not_a_causal_lm_or_an_encoder_decoder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="causal LM or an encoder-decoder"):
        DistillationTrainer(
            model=bert_classifier(), teacher_model=bert_classifier(seed=1), args=config(tmp_path, lmbda=1.0)
        )


def test_seq_kd_without_a_teacher_or_with_labels_alone_is_refused(tmp_path):
    labels_alone = {"hard_label": {"weight": 1.0}}
    with pytest.raises(ValueError, match="seq_kd samples completions from the teacher"):
        DistillationTrainer(model=gpt2(2), args=config(tmp_path, labels_alone, seq_kd=True))
    with pytest.raises(ValueError, match="learns the dataset's completions only"):
        DistillationTrainer(model=gpt2(2), args=config(tmp_path, labels_alone, lmbda=1.0))


# ---- in the trainer ----------------------------------------------------------------------------------------------


def test_each_optimizer_step_generates_once_for_all_its_micro_batches_in_eval_mode(tmp_path):
    backend = CountingBackend()
    run = trainer(tmp_path, backend=backend, lmbda=1.0)
    run.train()
    assert len(backend.calls) == 3  # one per optimizer step, for its 2 micro-batches of 2
    for model, training, shape, synced in backend.calls:
        assert model is run.model and not training and shape[0] == 4 and not synced
    sources = {source for _, source, _ in run.seen}
    assert sources == {"student"}
    for _, _, batch in run.seen:
        completion = batch["labels"] != -100
        assert 1 <= int(completion.sum(-1).min()) and int(completion.sum(-1).max()) <= 6
        # Right-padded: the attention mask is a run of ones from the start of each row.
        lengths = batch["attention_mask"].sum(-1)
        assert torch.equal(
            batch["attention_mask"], (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long()
        )


def test_the_prompts_of_generated_batches_are_those_of_the_dataset(tmp_path):
    data = prompt_completion_dataset()
    run = trainer(tmp_path, lmbda=1.0, data=data, max_steps=2)
    run.train()
    expected = [split_prompts(collate([data[index]]))[0].tolist() for index in range(8)]
    got = [prompt.tolist() for _, _, batch in run.seen for prompt in split_prompts(batch)]
    assert got == expected  # sequential sampling: examples 0-7 over 2 steps of 2 micro-batches of 2


def test_seq_kd_samples_from_the_teacher_and_lmbda_zero_keeps_the_dataset(tmp_path):
    backend = CountingBackend()
    run = trainer(tmp_path / "seq_kd", backend=backend, seq_kd=True)
    run.train()
    assert {source for _, source, _ in run.seen} == {"teacher"}
    assert all(model is run.teacher_model for model, *_ in backend.calls)
    data = trainer(tmp_path / "data", lmbda=0.0)
    data.train()
    assert {source for _, source, _ in data.seen} == {"data"}


#: Two teachers: their mixture scores the student's samples, and one of them is matched on hidden states too.
SEVERAL = {
    "soft_target": {"weight": 1.0, "divergence": "skew_reverse_kl"},
    "hidden_state": {"weight": 1.0, "teacher": "wide", "layer_map": [[-1, -1]]},
}


@pytest.mark.parametrize(
    "losses, teachers",
    [
        (JSD, None),
        pytest.param(  # the one-teacher case is the same check on smaller shapes
            SEVERAL,
            lambda: {"deep": gpt2(1, layers=3), "wide": causal_lm(3, layers=2, width=24)},
            marks=pytest.mark.slow,
        ),
    ],
    ids=["one-teacher", "several-teachers-and-hidden-states"],
)
def test_training_on_generated_completions_is_training_on_those_sequences(tmp_path, losses, teachers):
    """The same weights as a run on the dataset made of the sequences the on-policy run generated, micro-batch for
    micro-batch: generation split over micro-batches, completion-token normalisation over the accumulated batch and
    gradient accumulation all exact; with several teachers, their mixture and a hidden-state term (whose projector
    trains too) on the generated sequences."""
    on_policy = trainer(tmp_path / "on", losses, teachers=teachers, lmbda=1.0)
    on_policy.train()
    rows = [
        {key: batch[key][row].tolist() for key in ("input_ids", "attention_mask", "labels")}
        for _, _, batch in on_policy.seen
        for row in range(batch["input_ids"].shape[0])
    ]
    replay = trainer(tmp_path / "replay", losses, teachers=teachers, lmbda=0.0, data=Dataset.from_list(rows))
    replay.train()
    assert [batch["input_ids"].shape for *_, batch in replay.seen] == [
        b["input_ids"].shape for *_, b in on_policy.seen
    ]
    for (name, mine), theirs in zip(on_policy.model.named_parameters(), replay.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)
    for mine, theirs in zip(
        on_policy.distillation_losses.parameters(), replay.distillation_losses.parameters(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_hard_label_trains_on_the_dataset_completions_only(tmp_path):
    losses = {**JSD, "hard_label": {"weight": 1.0}}
    run = trainer(tmp_path, losses, lmbda=0.5, seq_kd=False, max_steps=4, logging_steps=1)
    run.train()
    sources = {step: source for step, source, _ in run.seen}
    assert set(sources.values()) == {"data", "student"}
    logged = {entry["step"]: entry for entry in run.state.log_history if "soft_target" in entry}
    for step, source in sources.items():
        entry = logged[step + 1]
        if source == "data":
            assert entry["hard_label"] > 0
        else:  # no hard_label on the student's own samples: the loss is the divergence alone
            assert "hard_label" not in entry or entry["hard_label"] == 0
            assert entry["loss"] == pytest.approx(entry["soft_target"], rel=1e-4)


def test_sampling_resumes_bit_exactly_from_a_checkpoint(tmp_path):
    """Steps 2 and 3 (one from the teacher, one from the student) draw and sample the same after a resume from the
    checkpoint of step 2, and end with the same weights."""
    whole = trainer(tmp_path / "whole", lmbda=0.5, seq_kd=True, max_steps=4, save_strategy="steps", save_steps=2)
    whole.train()
    resumed = trainer(tmp_path / "resumed", lmbda=0.5, seq_kd=True, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert [source for _, source, _ in whole.seen[::2]] == ["teacher", "student", "teacher", "student"]
    later = [(step, source, batch) for step, source, batch in whole.seen if step >= 2]
    assert len(later) == len(resumed.seen)
    for (step, source, batch), (step_r, source_r, batch_r) in zip(later, resumed.seen, strict=True):
        assert (step, source) == (step_r, source_r)
        assert torch.equal(batch["input_ids"], batch_r["input_ids"])
    for mine, theirs in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


# ---- the sampled-token loss --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_sampled_token_loss_is_its_formula_by_hand_in_value_and_gradient(chunk_size):
    torch.manual_seed(0)
    student_logits = torch.randn(2, 6, VOCAB, requires_grad=True)
    teacher_logits = torch.randn(2, 6, VOCAB)
    labels = torch.tensor([[-100, -100, 5, 6, 7, EOS], [-100, 8, 9, -100, -100, -100]])
    loss = SampledTokenLoss(chunk_size=chunk_size)
    loss.setup(gpt2(0), gpt2(1))
    value = loss(SimpleNamespace(logits=student_logits), SimpleNamespace(logits=teacher_logits), {"labels": labels})
    (gradient,) = torch.autograd.grad(value, student_logits)

    # By hand: position t predicts label t + 1; a = log p(y) - log q(y), no gradient through it.
    positions = [(0, 1, 5), (0, 2, 6), (0, 3, 7), (0, 4, EOS), (1, 0, 8), (1, 1, 9)]
    logits = student_logits.detach().clone().requires_grad_(True)
    estimate, surrogate = 0.0, 0.0
    for row, position, token in positions:
        log_q = torch.log_softmax(logits[row, position], -1)[token]
        log_p = torch.log_softmax(teacher_logits[row, position], -1)[token]
        estimate += float((log_q - log_p).detach())
        surrogate = surrogate - (log_p - log_q).detach() * log_q
    surrogate.backward()
    assert loss.count_items({"labels": labels}) == len(positions)
    assert float(value.detach()) == pytest.approx(estimate, rel=1e-5)
    torch.testing.assert_close(gradient, logits.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # three runs; test_loss_values checks the fused and the full paths' values
def test_sampled_token_trains_alike_on_fused_row_and_full_logits(tmp_path):
    losses = {"sampled_token": {"weight": 1.0, "chunk_size": 4}}
    runs = {}
    for name, settings in {
        "fused": {},
        "rows": {"fused_token_logits": False},
        "full": {"compact_token_logits": False},
    }.items():
        run = trainer(tmp_path / name, losses, lmbda=1.0, max_steps=2, **settings)
        run.train()
        runs[name] = run
    fused = dict(runs["fused"].model.named_parameters())
    for name in ("rows", "full"):
        assert [b["input_ids"].tolist() for *_, b in runs[name].seen] == [
            b["input_ids"].tolist() for *_, b in runs["fused"].seen
        ]
        for key, parameter in runs[name].model.named_parameters():
            torch.testing.assert_close(parameter, fused[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


def test_sampled_token_is_refused_for_a_student_that_is_not_a_causal_lm():
    with pytest.raises(ValueError, match="sampled_token scores the tokens a causal LM generated"):
        SampledTokenLoss().setup(bert_classifier(), bert_classifier(seed=1))


def stack(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows of equal widths as one batch (an encoder-decoder's micro-batch as the rollouts leave it)."""
    return {key: torch.tensor([row[key] for row in rows]) for key in ("input_ids", "attention_mask", "labels")}


@pytest.mark.slow  # two T5 runs: the default suite keeps within its budget
def test_an_encoder_decoder_student_trains_on_its_decoders_samples_exactly_as_on_those_labels(tmp_path):
    """T5 student and teacher, lmbda 1: each step samples the decoder from all its micro-batches' encoder inputs at
    once; the new labels are the sampled tokens after the decoder's start, cut after the end token, -100 after; and
    training on them is training on a dataset of those labels (decoder inputs rebuilt from them for both models)."""
    backend = CountingBackend()

    def run(folder, data, **settings):
        return Recording(
            model=t5(2), teacher_model=t5(1, layers=3), args=config(tmp_path / folder, JSD, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=2, train_sampling_strategy="sequential", **settings),
            train_dataset=data, data_collator=stack, rollout_backend=backend if settings.get("lmbda") else None,
        )  # fmt: skip

    data = seq2seq_dataset(8, padded=True)
    on_policy = run("on", data, lmbda=1.0, rollout_generation={"max_new_tokens": 5})
    on_policy.train()
    assert len(backend.calls) == 2 and all(shape == (4, data[0]["input_ids"].__len__()) for _, _, shape, _ in
                                           backend.calls)  # fmt: skip
    for index, (_, source, batch) in enumerate(on_policy.seen):
        assert source == "student"
        rows = [data[2 * index + row] for row in range(2)]  # sequential: the encoder inputs are the dataset's
        assert batch["input_ids"].tolist() == [row["input_ids"] for row in rows]
        assert batch["labels"].tolist() != [row["labels"][: batch["labels"].shape[1]] for row in rows]  # sampled
        for labels in batch["labels"].tolist():
            kept = [token for token in labels if token != -100]
            assert 1 <= len(kept) <= 5 and labels[: len(kept)] == kept  # -100 only after the completion
            assert 1 not in kept[:-1]  # nothing after the end token (T5's eos is 1)
    rows = [
        {key: batch[key][row].tolist() for key in ("input_ids", "attention_mask", "labels")}
        for _, _, batch in on_policy.seen
        for row in range(batch["input_ids"].shape[0])
    ]
    replay = run("replay", Dataset.from_list(rows))
    replay.train()
    for (name, mine), theirs in zip(on_policy.model.named_parameters(), replay.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)

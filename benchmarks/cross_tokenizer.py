"""Distilling across tokenizers: a character-level teacher into a student with a BPE tokenizer. Offline, over seeds.

    python benchmarks/cross_tokenizer.py             # seeds 1 2 3; writes benchmarks/CROSS_TOKENIZER.md and .json
    python benchmarks/cross_tokenizer.py --quick     # tiny sizes, a minute: a spot check, printed, not a result

The task is the letters task of `hf-distill` (`hf_distill.pipeline.causal`) written without spaces: a prompt of 8
distinct letters of a 16-letter alphabet in order, then `=` (`"acdfghkm="`); a valid answer writes the same 8
letters, each once, in any order (`"hcafgdkm"`), then ends. The training answers are random orders, so which letters
may come next depends on those already written.

Tokenizers, built here with `tokenizers`: the teacher's has one token per character (the pipeline's
`offline:letters-characters`); the student's is a BPE of 64 tokens trained on the training text, whose merges are
pairs of letters (mostly neighbours, frequent in the sorted prompts), so it writes some of an answer's letters in
pairs, differently from answer to answer. Per seed, every model a GPT-2 built from a config: the teacher (4 layers,
width 128) trains on 20,000 examples in its tokens; each arm trains the same fresh student (2 layers, width 128, the
same initialisation) for the same steps, batch, learning rate and examples:
- `sft`: the labels alone (`hard_label`);
- `uld`: labels + ULD's sorted distance to the character teacher (`uld`, each group over its last token);
- `gold_last` / `gold_first`: labels + GOLD's hybrid (`gold`, forward KL over the tokens both vocabularies hold,
  the single letters, and the sorted distance over the rest), each group's distribution over its last or its
  first token;
- `same_tokenizer_kd`: labels + forward KL to a teacher of the same shape trained the same way in the student's own
  tokens (`soft_target`): what distillation gives where the two tokenizers agree.
Scored on 500 held-out prompts: validity of greedy and of sampled (temperature 1) answers, and each arm's time.

With `--sizes '{"warm_steps": N}'` every arm starts from the same student trained first on the labels alone for N
steps (batch 32, the arms' learning rate, constant), as GKD's students start from a supervised fine-tuning: the arms
then compare what each objective adds to a student that already writes some valid answers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, processors, trainers
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.pipeline import causal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from on_policy import collate  # noqa: E402 - the letters benchmark's padding

HERE = os.path.dirname(os.path.abspath(__file__))
LETTERS = causal.LETTERS
CHOSEN = causal.CHOSEN
SPECIAL = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
LABELS = {"hard_label": {"weight": 1.0}}
ARMS = {
    "sft": (LABELS, "characters"),
    "uld": ({**LABELS, "uld": {"weight": 1.0, "merge": "last"}}, "characters"),
    "gold_last": ({**LABELS, "gold": {"weight": 1.0, "beta": 0.0, "merge": "last"}}, "characters"),
    "gold_first": ({**LABELS, "gold": {"weight": 1.0, "beta": 0.0, "merge": "first"}}, "characters"),
    "same_tokenizer_kd": ({**LABELS, "soft_target": {"weight": 1.0, "temperature": 1.0}}, "student"),
}


def texts(count: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of the letters task, as the pipeline draws them, without the spaces."""
    examples = causal.letters_examples(count, seed)
    return [(prompt.replace(" ", ""), answer.replace(" ", ""))
            for prompt, answer in zip(examples["prompt"], examples["completion"], strict=True)]  # fmt: skip


def valid(prompt: str, answer: str) -> bool:
    """The prompt's 8 letters, each once, in any order."""
    return len(answer) == CHOSEN and set(answer) == set(prompt[:-1])


def bpe_tokenizer(corpus: list[str], size: int) -> PreTrainedTokenizerFast:
    """A BPE of `size` tokens trained on `corpus` (no pre-tokenizer), every character of the task in its alphabet, the
    special tokens of the pipeline's letters tokenizers."""
    model = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=SPECIAL, initial_alphabet=[*LETTERS, "="],
                                  show_progress=False)  # fmt: skip
    model.train_from_iterator(corpus, trainer)
    model.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    model.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]")  # fmt: skip


def tokenized(pairs: list[tuple[str, str]], tok: PreTrainedTokenizerFast) -> Dataset:
    rows = []
    for prompt, answer in pairs:
        head = tok(prompt)["input_ids"]
        tail = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": head + tail, "attention_mask": [1] * len(head + tail),
                     "labels": [-100] * len(head) + tail})  # fmt: skip
    return Dataset.from_list(rows)


def gpt2(shape: list[int], tok: PreTrainedTokenizerFast, seed: int) -> GPT2LMHeadModel:
    """A GPT-2 of `shape` (layers, width, heads) over `tok`'s vocabulary, 48 positions (the teacher's examples are
    up to 34 characters long)."""
    torch.manual_seed(seed)
    layers, width, heads = shape
    ids = {f"{name}_token_id": getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=width, n_layer=layers,
                                      n_head=heads, **ids))  # fmt: skip


def plain_training(model, data, steps: int, seed: int, folder: str, batch: int = 64, learning_rate: float = 1e-3,
                   schedule: str = "cosine") -> None:  # fmt: skip
    args = TrainingArguments(
        output_dir=folder, max_steps=steps, per_device_train_batch_size=batch, learning_rate=learning_rate,
        warmup_steps=0.05 if schedule == "cosine" else 0, lr_scheduler_type=schedule, save_strategy="no",
        report_to="none", use_cpu=True, seed=seed, disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate).train()


@torch.no_grad()
def score(model, tok, held_out: list[tuple[str, str]], seed: int) -> dict[str, float]:
    """The share of held-out prompts whose greedy / sampled (temperature 1) answer is valid, and the model's
    bits per character of the held-out reference answers (their tokens and the end of sequence, teacher-forced, over
    the answers' 8 characters each): a measure that does not depend on the tokenizer, and that moves before any
    answer is valid."""
    model.eval()
    data = collate(list(tokenized(held_out, tok)))
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1].float()
    labels = data["labels"][:, 1:]
    counted = labels != -100
    log_probs = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    characters = sum(len(answer) for _, answer in held_out)
    tok.padding_side = "left"
    prompts = tok([prompt for prompt, _ in held_out], return_tensors="pt", padding=True)
    results = {"bits_per_character": float(-(log_probs * counted).sum() / characters / math.log(2))}
    for name, settings in (("greedy", {"do_sample": False}), ("sampled", {"do_sample": True, "top_k": 0})):
        torch.manual_seed(seed)
        out = model.generate(**prompts, max_new_tokens=CHOSEN + 2, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, **settings)  # fmt: skip
        answers = []
        for row in out[:, prompts["input_ids"].shape[1] :].tolist():
            ended = tok.eos_token_id in row
            answers.append(tok.decode(row[: row.index(tok.eos_token_id)]) if ended else None)
        results[f"valid_{name}"] = sum(
            answer is not None and valid(prompt, answer) for (prompt, _), answer in zip(held_out, answers, strict=True)
        ) / len(held_out)
    return results


def one_seed(seed: int, sizes: dict, folder: str, arms: list[str]) -> dict:
    train = texts(sizes["examples"], seed)
    held_out = texts(sizes["eval_prompts"], 10_000 + seed)
    characters = AutoTokenizer.from_pretrained(causal.letters_characters_tokenizer_dir())
    student_tok = bpe_tokenizer([prompt + answer for prompt, answer in train], sizes["student_vocab"])
    lengths = [len(student_tok(answer, add_special_tokens=False)["input_ids"]) for _, answer in held_out]
    record = {"student_vocab": len(student_tok), "student_tokens_per_answer": statistics.mean(lengths)}
    teachers = {}
    for name, tok in (("characters", characters), ("student", student_tok)):
        if not any(ARMS[arm][1] == name for arm in arms):
            continue
        set_seed(seed)
        teacher = gpt2(sizes["teacher"], tok, seed)
        start = time.perf_counter()
        plain_training(teacher, tokenized(train, tok), sizes["teacher_steps"], seed, os.path.join(folder, name))
        teachers[name] = (teacher, tok)
        record[f"teacher_{name}"] = {**score(teacher, tok, held_out, seed), "time_s": time.perf_counter() - start}
        print(f"seed {seed} teacher ({name} tokens): {json.dumps(record[f'teacher_{name}'])}", flush=True)
    distil = tokenized(train[: sizes["distil_examples"]], student_tok)
    first_student = gpt2(sizes["student"], student_tok, seed + 1)
    if sizes.get("warm_steps"):
        set_seed(seed)
        start = time.perf_counter()
        plain_training(first_student, distil, sizes["warm_steps"], seed, os.path.join(folder, "warm"), batch=32,
                       learning_rate=sizes["learning_rate"], schedule="constant")  # fmt: skip
        record["warm_start"] = {**score(first_student, student_tok, held_out, seed),
                                "time_s": time.perf_counter() - start}  # fmt: skip
        print(f"seed {seed} warm start: {json.dumps(record['warm_start'])}", flush=True)
    record["arms"] = {}
    for arm in arms:
        losses, which = ARMS[arm]
        teacher, teacher_tok = teachers[which]
        student = copy.deepcopy(first_student)
        args = DistillationConfig(
            output_dir=os.path.join(folder, arm), max_steps=sizes["arm_steps"], per_device_train_batch_size=32,
            learning_rate=sizes["learning_rate"], warmup_steps=0.05, save_strategy="no", report_to="none",
            use_cpu=True, seed=seed, disable_tqdm=True, logging_strategy="no", losses=losses,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=student, teacher_model=None if arm == "sft" else teacher, args=args, train_dataset=distil,
            data_collator=collate, processing_class=student_tok, teacher_processing_class=teacher_tok,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        record["arms"][arm] = {**score(student, student_tok, held_out, seed), "time_s": time.perf_counter() - start}
        print(f"seed {seed} {arm}: {json.dumps(record['arms'][arm])}", flush=True)
    return record


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(records: dict[int, dict], facts: str) -> str:
    seeds = sorted(records)
    arms = list(records[seeds[0]]["arms"])
    lines = [
        "# Distilling across tokenizers: a character-level teacher, a BPE student (the letters task, no spaces)",
        "",
        f"{facts}. Generated by `python benchmarks/cross_tokenizer.py`; mean ± sample std over seeds {seeds}.",
        "",
        "| model | bits per character | valid, greedy (%) | valid, sampled (%) | "
        + " | ".join(f"seed {s} bits/char" for s in seeds) + " | time (s) |",
        "|---|---|---|---|" + "---|" * len(seeds) + "---|",
    ]  # fmt: skip

    def row(name: str, rows: list[dict]) -> str:
        bits = mean_std([r["bits_per_character"] for r in rows])
        greedy = mean_std([100 * r["valid_greedy"] for r in rows])
        sampled = mean_std([100 * r["valid_sampled"] for r in rows])
        time_s = mean_std([r["time_s"] for r in rows])
        per_seed = " | ".join(f"{r['bits_per_character']:.3f}" for r in rows)
        return (f"| {name} | {bits[0]:.3f} ± {bits[1]:.3f} | {greedy[0]:.1f} ± {greedy[1]:.1f} | "
                f"{sampled[0]:.1f} ± {sampled[1]:.1f} | {per_seed} | {time_s[0]:.0f} |")  # fmt: skip

    for key in ("teacher_characters", "teacher_student"):
        if key in records[seeds[0]]:
            lines.append(row(f"teacher ({key.split('_')[1]} tokens)", [records[s][key] for s in seeds]))
    if "warm_start" in records[seeds[0]]:
        lines.append(row("warm start (every arm's first student)", [records[s]["warm_start"] for s in seeds]))
    for arm in arms:
        lines.append(row(arm, [records[s]["arms"][arm] for s in seeds]))
    lines += ["", "Against `sft` (the labels alone), paired by seed (validity in points; bits per character, lower "
              "is better):", ""]  # fmt: skip
    for arm in arms:
        if arm == "sft" or "sft" not in arms:
            continue
        for metric, scale, digits in (("bits_per_character", 1, 3), ("valid_greedy", 100, 1),
                                      ("valid_sampled", 100, 1)):  # fmt: skip
            differences = [
                scale * (records[s]["arms"][arm][metric] - records[s]["arms"]["sft"][metric]) for s in seeds
            ]
            spread = max(mean_std([scale * records[s]["arms"][a][metric] for s in seeds])[1] for a in (arm, "sft"))
            mean, std = mean_std(differences)
            verdict = "beyond" if abs(mean) > 2 * spread else "within"
            lines.append(f"- {arm}, {metric.replace('_', ' ')}: {mean:+.{digits}f} ± {std:.{digits}f} (per seed "
                         f"{', '.join(f'{d:+.{digits}f}' for d in differences)}; {verdict} twice the larger seed "
                         f"spread, {spread:.{digits}f})")  # fmt: skip
    vocab = mean_std([records[s]["student_vocab"] for s in seeds])[0]
    tokens = mean_std([records[s]["student_tokens_per_answer"] for s in seeds])[0]
    lines += ["", f"The student's tokenizer: {vocab:.0f} tokens; an answer of 8 letters is {tokens:.2f} of its tokens "
              "(the teacher's: 8).", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a spot check, printed, not a result")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--sizes", type=json.loads, default={}, help="JSON object of sizes to change, as printed")
    parser.add_argument("--report", default=os.path.join(HERE, "CROSS_TOKENIZER"),
                        help="where the report goes: REPORT.md and REPORT.json")  # fmt: skip
    options = parser.parse_args()
    sizes = dict(teacher=[4, 128, 4], student=[2, 128, 4], student_vocab=64, examples=20_000, teacher_steps=1500,
                 distil_examples=19_200, arm_steps=600, learning_rate=1e-3, eval_prompts=500)  # fmt: skip
    if options.quick:
        sizes.update(examples=512, teacher_steps=20, distil_examples=128, arm_steps=3, eval_prompts=32)
        options.seeds = options.seeds[:1]
    sizes.update(options.sizes)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
    records, started = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for seed in options.seeds:
            seed_start = time.perf_counter()
            records[seed] = one_seed(seed, sizes, os.path.join(folder, str(seed)), options.arms)
            records[seed]["seed_time_s"] = time.perf_counter() - seed_start
    facts = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, transformers {transformers.__version__}, sizes {json.dumps(sizes)}, "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    text = report(records, facts)
    print(text)
    if not options.quick:
        with open(f"{options.report}.json", "w", encoding="utf-8") as handle:
            json.dump({"facts": facts, "sizes": sizes, "records": {str(k): v for k, v in records.items()}}, handle,
                      indent=1)  # fmt: skip
        with open(f"{options.report}.md", "w", encoding="utf-8") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()

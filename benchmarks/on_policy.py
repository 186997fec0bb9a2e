"""Does on-policy distillation make a causal-LM student generate better than supervised KD? Offline, over seeds.

    python benchmarks/on_policy.py                   # seeds 1 2 3; writes benchmarks/ON_POLICY.md and .json
    python benchmarks/on_policy.py --quick           # tiny sizes, a minute: a spot check, printed, not a result
    python benchmarks/on_policy.py --from-records a.json b.json   # the report from runs' --records files

The task: a prompt of 8 distinct letters of a 16-letter alphabet, in alphabetical order; a valid answer lists all
8, each once, in any order, then ends. The teacher learns it from random orders, so its distribution is
multi-modal, and which letters may come next depends on the ones the student itself has already written: a
student trained on the teacher's or the data's prefixes alone meets prefixes of its own at generation time
(exposure bias), which is what on-policy distillation addresses. The tokenizer (one token per letter, plus BOS,
SEP, EOS and PAD) is built here with `tokenizers`; the models are GPT-2s built from configs.

Per seed: the teacher (4 layers, width 128) trains on 20,000 examples; the student (2 layers, width 128) is
warmed up on the data (GKD does the same); then each arm trains a copy of that warmed-up student for the same
steps, batch, learning rate and order of prompts:
- `sft`: the data's completions, labels alone (`hard_label`);
- `supervised_kd`: the data's completions, forward KL to the teacher (`lmbda=0`);
- `seq_kd`: the teacher's sampled completions, forward KL (`seq_kd=True`);
- `on_policy_beta_0` / `_0.5` / `_1`: the student's own samples (`lmbda=1`), generalized JSD with beta 0
  (forward KL), 0.5 and 1 (reverse KL);
- `mixed_beta_0.5`: `lmbda=0.5`, generalized JSD 0.5;
- `on_policy_skew_kl`: `lmbda=1`, DistiLLM's skew KL (alpha 0.1).
Every KD arm uses temperature 1. Scored on 500 held-out prompts: validity of greedy and of sampled (temperature
1) answers, the teacher's reverse KL on the student's own samples (per token, mean of log q - log p along them),
the teacher-forced forward KL on held-out references (per completion token), and each arm's training time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import transformers
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer, TrainingArguments, set_seed

from hf_distill import DistillationConfig, DistillationTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
LETTERS = [chr(ord("a") + index) for index in range(16)]
SPECIAL = ["[PAD]", "[BOS]", "[SEP]", "[EOS]"]
CHOSEN = 8


def jsd(beta: float) -> dict:
    return {"soft_target": {"weight": 1.0, "temperature": 1.0, "divergence": "generalized_jsd", "beta": beta}}


FORWARD = {"soft_target": {"weight": 1.0, "temperature": 1.0, "divergence": "forward_kl"}}
ARMS = {
    "sft": ({"hard_label": {"weight": 1.0}}, {}),
    "supervised_kd": (FORWARD, {}),
    "seq_kd": (FORWARD, {"seq_kd": True}),
    "on_policy_beta_0": (jsd(0.0), {"lmbda": 1.0}),
    "on_policy_beta_0.5": (jsd(0.5), {"lmbda": 1.0}),
    "on_policy_beta_1": (jsd(1.0), {"lmbda": 1.0}),
    "mixed_beta_0.5": (jsd(0.5), {"lmbda": 0.5}),
    "on_policy_skew_kl": (
        {"soft_target": {"weight": 1.0, "temperature": 1.0, "divergence": "skew_kl", "alpha": 0.1}},
        {"lmbda": 1.0},
    ),
}


def tokenizer() -> PreTrainedTokenizerFast:
    vocabulary = {token: index for index, token in enumerate(SPECIAL + LETTERS)}
    model = Tokenizer(models.WordLevel(vocabulary, unk_token="[PAD]"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", sep_token="[SEP]"
    )


def examples(count: int, seed: int, tok: PreTrainedTokenizerFast) -> Dataset:
    """Prompts `[BOS] letters (sorted) [SEP]`, completions the same letters in a random order then `[EOS]`."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        chosen = sorted(torch.randperm(len(LETTERS), generator=generator)[:CHOSEN].tolist())
        order = [chosen[int(i)] for i in torch.randperm(CHOSEN, generator=generator)]
        prompt = tok.convert_tokens_to_ids(["[BOS]", *(LETTERS[i] for i in chosen), "[SEP]"])
        completion = tok.convert_tokens_to_ids([*(LETTERS[i] for i in order), "[EOS]"])
        ids = prompt + completion
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + completion})
    return Dataset.from_list(rows)


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    length = max(len(row["input_ids"]) for row in rows)
    return {
        key: torch.tensor([row[key] + [fill] * (length - len(row[key])) for row in rows])
        for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100))
    }


def gpt2(layers: int, width: int, heads: int, tok: PreTrainedTokenizerFast, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=32, n_embd=width, n_layer=layers, n_head=heads,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def plain_training(model, data, steps: int, learning_rate: float, seed: int, folder: str) -> None:
    args = TrainingArguments(
        output_dir=folder, max_steps=steps, per_device_train_batch_size=64, learning_rate=learning_rate,
        warmup_steps=0.05, lr_scheduler_type="cosine", save_strategy="no", report_to="none", use_cpu=True,
        seed=seed, disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate).train()


@torch.no_grad()
def score(student, teacher, prompts: Dataset, references: Dataset, tok, seed: int) -> dict[str, float]:
    """Validity of greedy and sampled answers, the teacher's reverse KL on the student's samples, and the
    teacher-forced forward KL on references."""
    student.eval()
    teacher.eval()
    batch = collate([{**row, "labels": row["labels"]} for row in prompts])
    prompt_length = batch["labels"].ne(-100).int().argmax(-1)  # every prompt has the same length here
    length = int(prompt_length[0])
    input_ids = batch["input_ids"][:, :length]
    letters = [set(ids[1:-1]) for ids in input_ids.tolist()]
    results = {}
    for name, settings in (("greedy", {"do_sample": False}), ("sampled", {"do_sample": True, "top_k": 0})):
        torch.manual_seed(seed)
        out = student.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=CHOSEN + 2,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **settings,
        )  # fmt: skip
        valid = 0
        for row, wanted in zip(out[:, length:].tolist(), letters, strict=True):
            answer = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else None
            valid += answer is not None and len(answer) == CHOSEN and set(answer) == wanted
        results[f"valid_{name}"] = valid / len(letters)
        if name == "sampled":  # the teacher's reverse KL along the student's own samples
            completions = out[:, length:]
            ends = (completions == tok.eos_token_id).int().cumsum(-1)
            mask = (ends == 0) | ((ends == 1) & (completions == tok.eos_token_id))
            log_q = torch.log_softmax(student(out).logits[:, length - 1 : -1].float(), -1)
            log_p = torch.log_softmax(teacher(out).logits[:, length - 1 : -1].float(), -1)
            token_log_q = log_q.gather(-1, completions[..., None]).squeeze(-1)
            token_log_p = log_p.gather(-1, completions[..., None]).squeeze(-1)
            results["reverse_kl_on_samples"] = float(((token_log_q - token_log_p) * mask).sum() / mask.sum())
    reference = collate(list(references))
    counted = reference["labels"][:, 1:] != -100
    student_logits = student(input_ids=reference["input_ids"]).logits[:, :-1][counted].float()
    teacher_logits = teacher(input_ids=reference["input_ids"]).logits[:, :-1][counted].float()
    p = torch.log_softmax(teacher_logits, -1)
    results["forward_kl_teacher_forced"] = float(
        (p.exp() * (p - torch.log_softmax(student_logits, -1))).sum(-1).mean()
    )
    return results


def one_seed(seed: int, sizes: dict, folder: str, arms: list[str], teachers: str | None = None) -> dict:
    tok = tokenizer()
    train = examples(sizes["teacher_examples"], seed, tok)
    held_out = examples(sizes["eval_prompts"], 10_000 + seed, tok)
    set_seed(seed)
    teacher = gpt2(*sizes["teacher"], tok, seed)
    start = time.perf_counter()
    kept = (
        os.path.join(teachers, f"teacher-{seed}-{json.dumps(sizes['teacher'])}-{sizes['teacher_steps']}.safetensors")
        if teachers
        else None
    )
    if kept and os.path.exists(kept):  # a teacher trained by an earlier run with the same sizes and seed
        teacher.load_state_dict(load_file(kept))
        with safe_open(kept, "pt") as handle:
            teacher_time = float((handle.metadata() or {}).get("seconds", "nan"))  # its training time then
    else:
        plain_training(teacher, train, sizes["teacher_steps"], 1e-3, seed, os.path.join(folder, "teacher"))
        teacher_time = time.perf_counter() - start
        if kept:  # whole or not at all: another run may be reading the folder
            weights = {key: value.clone() for key, value in teacher.state_dict().items()}  # tied: one copy each
            save_file(weights, f"{kept}.partial", metadata={"seconds": str(teacher_time)})
            os.replace(f"{kept}.partial", kept)
    record = {"teacher": score(teacher, teacher, held_out, held_out, tok, seed), "teacher_time_s": teacher_time}
    print(f"seed {seed} teacher: {json.dumps(record)}", flush=True)
    student = gpt2(*sizes["student"], tok, seed + 1)
    plain_training(student, train, sizes["warmup_steps"], 1e-3, seed, os.path.join(folder, "warmup"))
    warmed = {key: value.clone() for key, value in student.state_dict().items()}
    record["warmed_up_student"] = score(student, teacher, held_out, held_out, tok, seed)
    print(f"seed {seed} warmed-up student: {json.dumps(record['warmed_up_student'])}", flush=True)
    distil_data = examples(sizes["distil_examples"], 20_000 + seed, tok)
    record["arms"] = {}
    for learning_rate in sizes["arm_learning_rates"]:
        record["arms"][str(learning_rate)] = train_arms(
            student, warmed, teacher, distil_data, held_out, tok, seed, sizes, learning_rate, arms, folder
        )
    return record


def train_arms(student, warmed, teacher, distil_data, held_out, tok, seed, sizes, learning_rate, arms, folder):
    """Each arm trains the warmed-up student for the same steps at `learning_rate`; each is scored."""
    results = {}
    for arm in arms:
        losses, settings = ARMS[arm]
        student.load_state_dict(warmed)
        args = DistillationConfig(
            output_dir=os.path.join(folder, arm), max_steps=sizes["arm_steps"], per_device_train_batch_size=32,
            learning_rate=learning_rate, warmup_steps=0.05, save_strategy="no", report_to="none",
            use_cpu=True, seed=seed, disable_tqdm=True, logging_strategy="no", losses=losses,
            rollout_generation={"max_new_tokens": CHOSEN + 2}, **settings,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=distil_data, data_collator=collate,
            processing_class=tok,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        results[arm] = {
            **score(student, teacher, held_out, held_out, tok, seed),
            "time_s": time.perf_counter() - start,
        }
        print(f"seed {seed} lr {learning_rate} {arm}: {json.dumps(results[arm])}", flush=True)
    return results


def by_learning_rate(content: dict) -> tuple[dict, dict[str, dict[int, dict]]]:
    """A records file's sizes and its records as {learning rate: {seed: record with `arms` of that rate}}; files
    written with one rate (`arm_learning_rate`, `arms` as {arm: metrics}) are read too."""
    sizes, rates = content["sizes"], {}
    for seed, record in content["records"].items():
        arms = record["arms"]
        if "arm_learning_rate" in sizes:
            arms = {str(sizes["arm_learning_rate"]): arms}
        for rate, results in arms.items():
            rates.setdefault(rate, {})[int(seed)] = {**record, "arms": results}
    return sizes, rates


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary(records: dict[int, dict]) -> str:
    """One learning rate's table: every arm's metrics, mean ± std over the seeds."""
    seeds = sorted(records)
    metrics = ["valid_greedy", "valid_sampled", "reverse_kl_on_samples", "forward_kl_teacher_forced", "time_s"]

    def cell(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
        mean, spread = mean_std([value * scale for value in values])
        return f"{mean:.{digits}f} ± {spread:.{digits}f}"

    lines = [
        "| arm | valid, greedy (%) | valid, sampled (%) | teacher's reverse KL on own samples | teacher-forced "
        "forward KL | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for label, rows in (
        ("teacher", [records[s]["teacher"] for s in seeds]),
        ("warmed-up student (start of every arm)", [records[s]["warmed_up_student"] for s in seeds]),
        *(
            (arm, [records[s]["arms"][arm] for s in seeds])
            for arm in ARMS
            if all(arm in records[s]["arms"] for s in seeds)
        ),
    ):
        cells = [
            cell([row[m] for row in rows], 100.0 if m.startswith("valid") else 1.0, 1 if m.startswith("valid")
                 or m == "time_s" else 3) if all(m in row for row in rows) else "–"
            for m in metrics
        ]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison(rates: dict[str, dict[int, dict]]) -> list[str]:
    """Does the best on-policy arm beat supervised KD by more than twice the seed-to-seed spread? By validity of the
    greedy and of the sampled answers, at each learning rate, and with each arm at its own best rate (by the mean of
    that validity)."""

    def validity(arm: str, rate: str, metric: str) -> list[float]:
        records = rates[rate]
        return [100 * records[seed]["arms"][arm][metric] for seed in sorted(records)]

    ran = [
        arm for arm in ARMS if all(arm in record["arms"] for records in rates.values() for record in records.values())
    ]
    on_policy = [arm for arm in ran if ARMS[arm][1].get("lmbda", 0.0) > 0]
    if "supervised_kd" not in ran or not on_policy:
        return []

    def verdict(label: str, chosen: dict[str, str], metric: str, how: str) -> str:
        best = max(on_policy, key=lambda arm: statistics.mean(validity(arm, chosen[arm], metric)))
        kd = validity("supervised_kd", chosen["supervised_kd"], metric)
        top = validity(best, chosen[best], metric)
        (kd_mean, kd_std), (best_mean, best_std) = mean_std(kd), mean_std(top)
        margin = best_mean - kd_mean
        spread = 2 * max(kd_std, best_std)
        against_arms = "beyond" if margin > spread else "within"
        # Paired by seed (the same teacher, warmed-up student and prompts): the spread of the per-seed differences.
        differences = [a - b for a, b in zip(top, kd, strict=True)]
        paired_mean, paired_std = mean_std(differences)
        paired = "beyond" if paired_mean > 2 * paired_std else "within"
        return (
            f"- {label}: the best on-policy arm, `{best}` (lr {chosen[best]}), is valid {how} on "
            f"{best_mean:.1f}% ± {best_std:.1f} of held-out prompts, supervised KD (lr {chosen['supervised_kd']}) on "
            f"{kd_mean:.1f}% ± {kd_std:.1f}: {margin:+.1f} points, {against_arms} twice the larger seed-to-seed "
            f"spread ({spread:.1f}); seed by seed {', '.join(f'{d:+.1f}' for d in differences)} "
            f"({paired_mean:+.1f} ± {paired_std:.1f}, {paired} twice its spread)"
        )

    lines = []
    for metric, how in (("valid_greedy", "greedily"), ("valid_sampled", "when sampled")):
        choices = [(f"at learning rate {rate}", {arm: rate for arm in ran}) for rate in rates]
        if len(rates) > 1:
            best_rates = {
                arm: max(rates, key=lambda rate, arm=arm: statistics.mean(validity(arm, rate, metric))) for arm in ran
            }
            choices.append(("each arm at its own best learning rate", best_rates))
        lines += [verdict(label, chosen, metric, how) for label, chosen in choices]
    return lines


def report(rates: dict[str, dict[int, dict]], facts: str) -> str:
    lines = ["# On-policy distillation: the letters task", "", facts, ""]
    for rate in sorted(rates, key=float):
        lines += [f"## Every arm at learning rate {rate}", "", summary(rates[rate]), ""]
    lines += ["## On-policy against supervised KD", "", *comparison(rates), ""]
    return "\n".join(lines)


def write_json(path: str, content: dict) -> None:
    """Write `content` whole or not at all: into a temporary file beside `path`, then renamed over it."""
    staging = f"{path}.partial"
    with open(staging, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=1)
    os.replace(staging, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a spot check, printed, not a result")
    parser.add_argument("--records", help="also write the records, updated after each seed, to this JSON file")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="the arms to run")
    parser.add_argument("--teachers", help="a folder to keep each seed's trained teacher in, reused when there")
    parser.add_argument("--sizes", type=json.loads, default={}, help="JSON object of sizes to change, as printed")
    parser.add_argument(
        "--report", default=os.path.join(HERE, "ON_POLICY"),
        help="where the report goes: REPORT.md and REPORT.json (default benchmarks/ON_POLICY)",
    )  # fmt: skip
    parser.add_argument(
        "--from-records", nargs="+", metavar="JSON",
        help="write the report from records files of earlier runs (their seeds and learning rates together)",
    )  # fmt: skip
    options = parser.parse_args()
    if options.from_records:
        return write_from_records(options.from_records, options.report)
    sizes = dict(teacher=[4, 128, 4], student=[2, 128, 4], teacher_examples=20_000, teacher_steps=1500,
                 warmup_steps=150, distil_examples=20_000, arm_steps=300, arm_learning_rates=[5e-4, 2e-3],
                 eval_prompts=500)  # fmt: skip
    if options.quick:
        sizes.update(teacher_examples=512, teacher_steps=20, warmup_steps=5, distil_examples=256, arm_steps=3,
                     arm_learning_rates=[5e-4], eval_prompts=32)  # fmt: skip
        options.seeds = options.seeds[:1]
    sizes.update(options.sizes)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
    records = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for seed in options.seeds:
            seed_start = time.perf_counter()
            records[seed] = one_seed(seed, sizes, os.path.join(folder, str(seed)), options.arms, options.teachers)
            records[seed]["seed_time_s"] = time.perf_counter() - seed_start
            if options.records:  # each seed's record as soon as it is complete, so a long run is never lost whole
                write_json(options.records, {"sizes": sizes, "records": {str(k): v for k, v in records.items()}})
    content = {"sizes": sizes, "records": {str(k): v for k, v in records.items()}}
    facts = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, transformers {transformers.__version__}, seeds {options.seeds}, sizes "
        f"{json.dumps(sizes)}, {time.perf_counter() - started:.0f} s in all"
    )
    text = report(by_learning_rate(content)[1], facts)
    print(text)
    if not options.quick:
        write_json(f"{options.report}.json", {"facts": [facts], "runs": [content]})
        with open(f"{options.report}.md", "w", encoding="utf-8") as handle:
            handle.write(text)


def write_from_records(paths: list[str], report_path: str) -> None:
    """ON_POLICY.md and .json from the records of several runs (say, one per learning rate, run side by side)."""
    rates, facts, runs = {}, [], []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
        sizes, found = by_learning_rate(content)
        for rate, records in found.items():
            for seed, record in records.items():
                earlier = rates.setdefault(rate, {}).get(seed)
                if earlier is None:
                    rates[rate][seed] = record
                elif earlier["sizes"] != sizes:
                    raise ValueError(f"{path}: seed {seed} at learning rate {rate} was run with other sizes before")
                else:  # the same seed's other arms, from a run of those arms alone
                    earlier["arms"] = {**earlier["arms"], **record["arms"]}
                rates[rate][seed]["sizes"] = sizes
        seeds = sorted(int(seed) for seed in content["records"])
        times = {seed: round(content["records"][str(seed)].get("seed_time_s", float("nan"))) for seed in seeds}
        facts.append(f"`{os.path.basename(path)}`: seeds {seeds}, sizes {json.dumps(sizes)}, seconds per seed {times}")
        runs.append(content)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; records of the runs: " + "; ".join(facts)
    )
    text = report(rates, machine)
    print(text)
    write_json(f"{report_path}.json", {"facts": facts, "runs": runs})
    with open(f"{report_path}.md", "w", encoding="utf-8") as handle:
        handle.write(text)


if __name__ == "__main__":
    sys.exit(main())

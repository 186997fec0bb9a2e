"""What the distillation strategies beyond one frozen teacher give on offline data, over several seeds.

    python benchmarks/strategies.py                 # 3 seeds, ~35 min on 2 CPU cores; writes benchmarks/STRATEGIES.md
    python benchmarks/strategies.py --quick         # tiny sizes, a minute: a spot check, printed, not a result

Data: the offline Rotten Tomatoes snippets (`offline:rotten_tomatoes`), shuffled once with seed 42; students learn
from the first `--train` labelled snippets, and every model is scored on the held-out test split. Teachers
(trained once, seed 42): A, the packaged MiniLM-L6 fine-tuned 1 epoch on the first 4,000 snippets (the quick
start's teacher), and B, the same checkpoint fine-tuned 1 epoch on the next 4,000. Every student is the same
3-layer network, layers 0, 2, 5 of the pretrained MiniLM-L6 (not of a fine-tuned teacher), trained the same
number of steps; only the training seed changes between repeats (the classifier's initialisation, dropout, batch
order).

Compared, each over the seeds:
- labels alone (`hard_label`) — generation 1 of born-again networks too;
- mutual learning (Zhang et al., 2018): two such students from the same start, each `hard_label` +
  `soft_target` (T 1) toward the other's detached prediction (`trainable_teachers`); the first is scored;
- a moving-average teacher (`teacher_model="ema"`, momentum 0.99): `hard_label` + `soft_target` (T 1);
- born-again generation 2 (Furlanello et al., 2018): learns from generation 1 (the labels-only student),
  `hard_label` 0.5 + `soft_target` 0.5 (T 2);
- teacher A alone, teacher B alone and both (the 1:1 mixture of their distributions), each `hard_label` 0.5 +
  `soft_target` 0.5 (T 2).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import transformers
from transformers import Trainer, set_seed

from hf_distill import DistillationTrainer
from hf_distill.pipeline import build_student, evaluate_model, load_initial_teacher, parse_args, prepare_data
from hf_distill.pipeline.models import prepare_teacher, stage_args

HERE = os.path.dirname(os.path.abspath(__file__))
RESPONSE = {"hard_label": {"weight": 0.5}, "soft_target": {"weight": 0.5, "temperature": 2.0}}
MUTUAL = {"hard_label": {"weight": 1.0}, "soft_target": {"weight": 1.0, "temperature": 1.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, about a minute (not a result)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--train", type=int, default=1000, help="labelled snippets the students learn from")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--output_dir", default=os.path.join(tempfile.gettempdir(), "hf_distill_strategies"))
    parser.add_argument("--rewrite", action="store_true", help="rewrite STRATEGIES.md from strategies.json, no runs")
    options = parser.parse_args()
    if options.rewrite:
        saved = json.load(open(os.path.join(HERE, "strategies.json"), encoding="utf-8"))
        options.train, options.epochs = saved.get("train", options.train), saved.get("epochs", options.epochs)
        options.seeds = saved.get("seeds", options.seeds)
        write_markdown(saved["summary"], options, saved["timings_s"], saved.get("test_size", 1922))
        return
    if options.quick:
        options.seeds, options.train, options.epochs = [1, 2], 64, 1.0
    teacher_samples = 128 if options.quick else 4000
    argv = ["--recipe", "minilm-rotten-tomatoes", "--output_dir", options.output_dir, "--seed", "42",
            "--max_train_samples", str(options.train), "--teacher_max_train_samples", str(2 * teacher_samples),
            "--num_train_epochs", str(options.epochs), "--disable_tqdm", "true", "--logging_steps", "50"]  # fmt: skip
    if options.quick:
        argv += ["--max_eval_samples", "64"]
    args, config, _ = parse_args(argv)
    started = time.perf_counter()
    data = prepare_data(args, seed=42)
    both_halves = data.teacher_train
    data.teacher_train = both_halves.select(range(teacher_samples))
    teacher_a, _ = prepare_teacher(args, config, data, trained_dir=os.path.join(options.output_dir, "teacher-a"))
    teacher_b = train_teacher(args, config, data, both_halves.select(range(teacher_samples, 2 * teacher_samples)))
    timings = {"teachers": time.perf_counter() - started}
    initial, _ = load_initial_teacher(args, config, data)
    scores = {"teacher A": [evaluate(teacher_a, data)], "teacher B": [evaluate(teacher_b, data)]}
    for seed in options.seeds:
        for name, score in run_seed(seed, initial, teacher_a, teacher_b, data, config, options, timings).items():
            scores.setdefault(name, []).append(score)
        print(json.dumps({"seed": seed, **{k: v[-1] for k, v in scores.items()}}), flush=True)
    timings["total"] = time.perf_counter() - started
    summary = {name: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v}
               for name, v in scores.items()}  # fmt: skip
    if not options.quick:
        write_markdown(summary, options, timings, len(data.eval))
    print(json.dumps({name: round(value["mean"], 4) for name, value in summary.items()}))


def train_teacher(args, config, data, snippets):
    """Teacher B: the pretrained checkpoint fine-tuned like teacher A, on other snippets (kept for a rerun with the
    same output folder, as teacher A is)."""
    folder = os.path.join(config.output_dir, "teacher-b")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return type(load_initial_teacher(args, config, data)[0]).from_pretrained(folder).eval()
    teacher, _ = load_initial_teacher(args, config, data)
    teacher_args = stage_args(config, os.path.join(config.output_dir, "checkpoints-b"), num_train_epochs=1,
                              learning_rate=args.teacher_learning_rate, max_steps=-1, save_strategy="no")  # fmt: skip
    Trainer(model=teacher, args=teacher_args, train_dataset=snippets, data_collator=data.train_collator).train()
    teacher.save_pretrained(folder)
    return teacher.eval()


def student(initial, seed: int):
    """The 3-layer student from the pretrained layers, its classifier drawn afresh from `seed`."""
    model, _ = build_student(initial, layers=[0, 2, 5])
    set_seed(seed)
    torch.nn.init.normal_(model.classifier.weight, std=model.config.initializer_range)
    torch.nn.init.zeros_(model.classifier.bias)
    return model


def evaluate(model, data) -> float:
    return evaluate_model(model, data, batch_size=64)["accuracy"]


def train(model, teacher, losses, data, config, seed: int, **changes):
    args = stage_args(config, os.path.join(config.output_dir, "students"), losses=losses, seed=seed,
                      data_seed=seed, save_strategy="no", **changes)  # fmt: skip
    trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=data.train,
                                  data_collator=data.train_collator, processing_class=data.processor)  # fmt: skip
    trainer.train()
    return trainer


def run_seed(seed, initial, teacher_a, teacher_b, data, config, options, timings) -> dict[str, float]:
    scores = {}

    def timed(name, work):
        start = time.perf_counter()
        model = work()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        scores[name] = evaluate(model, data)
        return model

    alone = timed("labels alone", lambda: train(student(initial, seed), None, {"hard_label": {}}, data, config,
                                                seed).model)  # fmt: skip

    def mutual():
        first = student(initial, seed)
        return train(first, copy.deepcopy(first), MUTUAL, data, config, seed, trainable_teachers=["teacher"]).model

    timed("mutual learning", mutual)
    timed("moving-average teacher", lambda: train(student(initial, seed), "ema", MUTUAL, data, config, seed,
                                                  ema_momentum=0.99).model)  # fmt: skip
    timed("born-again generation 2", lambda: train(student(initial, seed), alone.eval(), RESPONSE, data, config,
                                                   seed).model)  # fmt: skip
    for name, teacher in (("teacher A alone", teacher_a), ("teacher B alone", teacher_b),
                          ("teachers A + B", {"a": teacher_a, "b": teacher_b})):  # fmt: skip
        timed(name, lambda teacher=teacher: train(student(initial, seed), teacher, RESPONSE, data, config,
                                                  seed).model)  # fmt: skip
    return scores


#: Each strategy against what it must beat, by seed (the same seed: the same head, dropout and batch order).
COMPARISONS = {
    "mutual learning": ["labels alone"],
    "moving-average teacher": ["labels alone"],
    "born-again generation 2": ["labels alone"],
    "teacher A alone": ["labels alone"],
    "teachers A + B": ["teacher A alone", "teacher B alone"],
}


def _spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:+.2%} ± {statistics.stdev(values):.2%}" if len(values) > 1 else f"{mean:+.2%}"


def write_markdown(summary, options, timings, test_size: int) -> None:
    runs = len(options.seeds)
    lines = [
        "# Strategies beyond one frozen teacher: measured",
        "",
        f"`python benchmarks/strategies.py` (seeds {', '.join(map(str, options.seeds))}; {options.train:,} labelled "
        f"snippets, {options.epochs:g} epochs per student; test split: {test_size:,} snippets), "
        f"{timings['total'] / 60:.0f} min in all on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}),"
        f" torch {torch.__version__}, transformers {transformers.__version__}. Accuracy on the held-out test split, "
        f"mean ± standard deviation over the {runs} seeds; the teachers are trained once (seed 42) before the "
        "students. See the script's docstring for the exact setup.",
        "",
        "| model | accuracy (mean ± std) | per seed | difference, seed by seed (mean ± std) | training time, all seeds |",
        "|---|---|---|---|---|",
    ]
    for name, value in summary.items():
        per_seed = ", ".join(f"{score:.2%}" for score in value["runs"])
        spread = f"{value['mean']:.2%} ± {value['std']:.2%}" if len(value["runs"]) > 1 else f"{value['mean']:.2%}"
        differences = "; ".join(
            f"{_spread([a - b for a, b in zip(value['runs'], summary[other]['runs'], strict=True)])} vs {other}"
            for other in COMPARISONS.get(name, [])
        )
        seconds = timings.get(name)
        time_cell = f"{seconds:.0f} s" if seconds is not None else "-"
        lines.append(f"| {name} | {spread} | {per_seed} | {differences or '-'} | {time_cell} |")
    lines += [
        "",
        f"Teachers: {timings['teachers']:.0f} s in this run to prepare both (a teacher already trained in the output "
        "folder with the same settings is reused rather than trained again).",
    ]
    with open(os.path.join(HERE, "STRATEGIES.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    with open(os.path.join(HERE, "strategies.json"), "w", encoding="utf-8") as handle:
        json.dump({"summary": summary, "timings_s": timings, "argv": sys.argv[1:], "train": options.train,
                   "epochs": options.epochs, "seeds": options.seeds, "test_size": test_size}, handle, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()

"""Several kinds of student on one teacher and one data set, in one run and one report.

report = run_student_kinds(args, config, recipe="minilm-rotten-tomatoes-kinds")
# <output_dir>/teacher: the teacher, trained once; <output_dir>/<kind>: each kind's run (student, baseline, report)
# <output_dir>/report.{json,md,png}: every kind's student and baseline against the teacher, side by side

A kind is a set of settings over the run's own (`--student_kind_settings`, a recipe's `student_kind_settings`):
pipeline arguments such as `student_num_layers`, `student_width` or `student_quantization`, and training settings
such as `learning_rate` or `num_train_epochs`. `layers` and `int8` need none: `layers` is the run's own student,
`int8` the same with `student_quantization: int8` (give it `student_num_layers` equal to the teacher's depth for
the teacher's own network, quantized).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from ..config import DistillationConfig
from .arguments import PipelineArguments
from .report import (
    markdown_header,
    markdown_row,
    plt,
    write_report_files,
)  # report sets matplotlib's file-only backend first
from .run import run_pipeline
from .spread import combine_reports, plus_minus, spread

#: Kinds that need no settings of their own.
DEFAULT_KINDS: dict[str, dict[str, Any]] = {"layers": {}, "int8": {"student_quantization": "int8"}}
#: The pipeline arguments a kind may set (the rest of its settings are training settings).
KIND_ARGUMENTS = (
    "student_layers",
    "student_num_layers",
    "student_width",
    "student_init",
    "student_quantization",
    "calibration_examples",
)


def kind_settings(args: PipelineArguments, config: DistillationConfig) -> dict[str, dict[str, Any]]:
    """Each kind of `args.student_kinds` with its settings, checked: {kind: settings}."""
    given = args.student_kind_settings or {}
    # A default kind's settings stay under those given for it: int8 with student_num_layers is still int8.
    defined = {kind: {**DEFAULT_KINDS.get(kind, {}), **given.get(kind, {})} for kind in {**DEFAULT_KINDS, **given}}
    unknown = [kind for kind in args.student_kinds if kind not in defined]
    if unknown:
        raise ValueError(
            f"student kinds {unknown} have no settings: define them in student_kind_settings (e.g. "
            '\'{"width": {"student_width": {"hidden_size": 256, "num_attention_heads": 8}}}\'); '
            f"{', '.join(DEFAULT_KINDS)} need none"
        )
    training = {field.name for field in dataclasses.fields(config)}
    for kind in args.student_kinds:
        for key in defined[kind]:
            if key not in KIND_ARGUMENTS and key not in training:
                raise ValueError(
                    f"student kind {kind!r} sets {key!r}, which is neither a student setting ({', '.join(KIND_ARGUMENTS)}) "
                    "nor a training setting of DistillationConfig"
                )
    return {kind: defined[kind] for kind in args.student_kinds}


def kind_run(
    args: PipelineArguments, config: DistillationConfig, kind: str, settings: dict[str, Any]
) -> tuple[PipelineArguments, DistillationConfig]:
    """The arguments and training settings of one kind's run: the run's own with the kind's settings over them,
    in `<output_dir>/<kind>`, sharing the teacher of `<output_dir>/teacher`; a teacher cache in `<teacher_cache>/<kind>`
    (what it stores follows each kind's losses and student)."""
    student = {key: value for key, value in settings.items() if key in KIND_ARGUMENTS}
    one = dataclasses.replace(
        args,
        student_kinds=None,
        student_kind_settings=None,
        teacher_dir=args.teacher_dir or os.path.join(config.output_dir, "teacher"),
        **student,
    )
    training = {key: value for key, value in settings.items() if key not in KIND_ARGUMENTS}
    if config.teacher_cache is not None:
        training.setdefault("teacher_cache", os.path.join(config.teacher_cache, kind))
    return one, dataclasses.replace(config, output_dir=os.path.join(config.output_dir, kind), **training)


def run_student_kinds(args: PipelineArguments, config: DistillationConfig, recipe: str | None = None) -> dict:
    """Run the pipeline once per kind of `args.student_kinds` (each with its own baseline: labels only, or for an
    int8 student, post-training quantization) and write the side-by-side report to `<output_dir>/report.*`."""
    if args.teachers:
        raise ValueError("--student_kinds compares students of one teacher: name one --teacher")
    # Every kind's arguments are built (and so checked) before the first kind trains.
    runs = {kind: kind_run(args, config, kind, settings) for kind, settings in kind_settings(args, config).items()}
    kinds = {kind: run_pipeline(one_args, one_config, recipe) for kind, (one_args, one_config) in runs.items()}
    report = combine_kinds(kinds)
    report.update(recipe=recipe, seed=config.seed)
    write_kinds_report(config.output_dir, report)
    return report


def combine_kinds(kinds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One table from each kind's report: the teacher (as the first kind timed it), then each kind's student and
    baseline; each kind's summary (retention, speed-ups, size, gap closure) under its name."""
    first = next(iter(kinds.values()))
    results = {"teacher": first["results"]["teacher"]}
    for kind, report in kinds.items():
        results[kind] = report["results"]["student"]
        if "baseline" in report["results"]:
            results[f"{kind} baseline"] = report["results"]["baseline"]
    return {
        "kinds": kinds,
        "results": results,
        "summary": {kind: report["summary"] for kind, report in kinds.items()},
        "timings_s": {kind: report["timings_s"].get("total") for kind, report in kinds.items()},
    }


def _batches(row: dict[str, Any], prefix: str) -> list[str]:
    return sorted((key.rsplit("_", 1)[1] for key in row if key.startswith(prefix)), key=int)


def kinds_report_lines(report: dict[str, Any]) -> list[str]:
    """The side-by-side table (accuracy, parameters, bytes, eager and compiled CPU latency, speed-up over the
    teacher) and each kind's summary, as Markdown lines."""
    results = report["results"]
    teacher = results["teacher"]
    eager, compiled = _batches(teacher, "latency_ms_batch_"), _batches(teacher, "compiled_latency_ms_batch_")
    sampled = "sampled_accuracy" in teacher
    header = ["model", "accuracy", *(["sampled_accuracy"] if sampled else []), "parameters (M)", "size (MB)"]
    header += [f"CPU ms, batch {b} (speed-up)" for b in eager]
    header += [f"compiled CPU ms, batch {b} (speed-up)" for b in compiled]
    lines = [
        f"# Student kinds: {report.get('recipe') or 'custom run'}",
        "",
        *markdown_header(header),
    ]
    for name, row in results.items():
        # Each kind's rows are timed beside the teacher in that kind's own run: speed-ups are within one run.
        kind = name.removesuffix(" baseline")
        reference = report["kinds"][kind]["results"]["teacher"] if kind in report["kinds"] else row
        cells = [name, f"{row['accuracy']:.2%}", *([f"{row['sampled_accuracy']:.2%}"] if sampled else []),
                 f"{row['parameters'] / 1e6:.2f}", f"{row['size_bytes'] / 1e6:.1f}"]  # fmt: skip
        for prefix, batches in (("latency_ms_batch_", eager), ("compiled_latency_ms_batch_", compiled)):
            for batch in batches:
                key = f"{prefix}{batch}"
                cells.append(f"{row[key]:.1f} ({reference[key] / row[key]:.2f}x)" if key in row else "-")
        lines.append(markdown_row(cells))
    lines.append("")
    for kind, summary in report["summary"].items():
        # NaN where teacher and baseline tie (post-training quantization can keep the teacher's accuracy exactly).
        closure = (
            f", gap closure {summary['gap_closure']:.2%}"
            if math.isfinite(summary.get("gap_closure", math.nan))
            else ""
        )
        lines.append(
            f"- {kind}: retention {summary['retention']:.2%}, {1 / summary['size_ratio']:.2f}x smaller{closure}; "
            f"its baseline: {baseline_kind(report['kinds'][kind])}"
        )
    lines.append(
        "- speed-ups are over the teacher timed in the same kind's run, the models taking turns; each kind's own "
        "report is in " + ", ".join(f"`{kind}/report.md`" for kind in report["kinds"])
    )
    lines.append(
        "- time taken: "
        + ", ".join(f"{kind} {seconds:.0f} s" for kind, seconds in report["timings_s"].items() if seconds is not None)
    )
    return lines


def baseline_kind(report: dict[str, Any]) -> str:
    """What a kind's baseline is, in words."""
    steps = report.get("training_steps", {})
    if "baseline" not in steps:
        return "none"
    if steps["baseline"] == 0:
        return "the teacher quantized to int8 after training (post-training quantization)"
    return f"the same student trained on the labels alone for {steps['baseline']} steps"


def _plot_kinds(report: dict[str, Any], path: str) -> None:
    results = report["results"]
    teacher = results["teacher"]
    latency = next(
        (f"{prefix}{b}" for prefix in ("compiled_latency_ms_batch_", "latency_ms_batch_") for b in
         reversed(_batches(teacher, prefix))),
        None,
    )  # fmt: skip
    axes_keys = [("size_bytes", "weights (MB)", 1e-6)]
    if latency is not None:
        label = "compiled " if latency.startswith("compiled_") else ""
        axes_keys.append((latency, f"{label}CPU latency, batch {latency.rsplit('_', 1)[1]} (ms)", 1.0))
    figure, axes = plt.subplots(1, len(axes_keys), figsize=(5 * len(axes_keys), 4), squeeze=False)
    for axis, (key, label, scale) in zip(axes[0], axes_keys, strict=True):
        for index, (name, row) in enumerate(results.items()):
            if key in row:
                marker = "s" if name.endswith("baseline") else "o"
                axis.scatter(row[key] * scale, row["accuracy"], s=60, marker=marker, color=f"C{index}", label=name)
        axis.set_xlabel(label)
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_kinds_report(output_dir: str, report: dict[str, Any]) -> None:
    """Write the side-by-side `report.json`, `report.md` and `report.png` to `output_dir`."""
    write_report_files(output_dir, report, kinds_report_lines(report), lambda path: _plot_kinds(report, path))


def combine_kinds_over_seeds(reports: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Each kind's reports over the seeds combined as `combine_reports` combines one kind's: {kind: combined}."""
    kinds = list(reports[0]["kinds"])
    return {
        "seeds": list(seeds),
        "kinds": {kind: combine_reports([report["kinds"][kind] for report in reports], seeds) for kind in kinds},
        "baselines": {kind: baseline_kind(reports[0]["kinds"][kind]) for kind in kinds},
        "timings_s": [sum(s for s in report["timings_s"].values() if s is not None) for report in reports],
    }


def kinds_seeds_report_lines(report: dict[str, Any]) -> list[str]:
    """Every kind's student and baseline as means ± std over the seeds, with retention, the margin over the
    baseline, size and speed-ups, as Markdown lines."""
    seeds = report["seeds"]
    any_kind = next(iter(report["kinds"].values()))
    speedups = [key for key in any_kind["summary"] if key.startswith(("speedup_batch_", "compiled_speedup_batch_"))]
    teacher = any_kind["results"]["teacher"]
    sampled = "sampled_accuracy" in teacher
    header = ["model", "accuracy (mean ± std)", *(["sampled_accuracy (mean ± std)"] if sampled else []),
              "parameters (M)", "size (MB)"]  # fmt: skip
    header += [("compiled " if key.startswith("compiled_") else "") + f"speed-up, batch {key.rsplit('_', 1)[1]}"
               for key in speedups]  # fmt: skip
    lines = [
        f"# Student kinds over {len(seeds)} seeds: {report.get('recipe') or 'custom run'}",
        "",
        *markdown_header(header),
    ]
    lines.append(f"| teacher | {plus_minus(teacher['accuracy'], 100, unit='%')} | "
                 + (f"{plus_minus(teacher['sampled_accuracy'], 100, unit='%')} | " if sampled else "")
                 + f"{teacher['parameters']['mean'] / 1e6:.2f} | {teacher['size_bytes']['mean'] / 1e6:.1f} |"
                 + " 1.00x |" * len(speedups))  # fmt: skip
    for kind, combined in report["kinds"].items():
        for name in ("student", "baseline"):
            if name not in combined["results"]:
                continue
            row = combined["results"][name]
            cells = [kind if name == "student" else f"{kind} baseline", plus_minus(row["accuracy"], 100, unit="%"),
                     *([plus_minus(row["sampled_accuracy"], 100, unit="%")] if sampled else []),
                     f"{row['parameters']['mean'] / 1e6:.2f}", f"{row['size_bytes']['mean'] / 1e6:.1f}"]  # fmt: skip
            for key in speedups:
                latency = key.replace("speedup_batch_", "latency_ms_batch_")
                if name == "student":
                    cells.append(plus_minus(combined["summary"][key], unit="x"))
                else:
                    teacher_mean = combined["results"]["teacher"][latency]["mean"]
                    ratio = teacher_mean / row[latency]["mean"] if latency in row else None
                    cells.append("-" if ratio is None else f"{ratio:.2f}x")
            lines.append(markdown_row(cells))
    lines.append("")
    for kind, combined in report["kinds"].items():
        summary = combined["summary"]
        parts = [f"retention {plus_minus(summary['retention'], 100, unit='%')}"]
        if "student_minus_baseline_points" in summary:
            margin = summary["student_minus_baseline_points"]
            parts.append(f"student - baseline {margin['mean']:+.2f} ± {margin['std']:.2f} points "
                         f"(beats it with {summary['beats_baseline_seeds']} of {len(seeds)} seeds)")  # fmt: skip
        if "size_ratio" in summary:
            parts.append(f"{1 / summary['size_ratio']['mean']:.2f}x smaller")
        lines.append(f"- {kind}: " + "; ".join(parts) + f"; baseline: {report['baselines'][kind]}")
    lines += kinds_against_first(report, seeds)
    lines.append(
        "- std: the sample standard deviation over the seeds; a baseline's speed-up is from the mean latencies; "
        "each kind's speed-ups are over the teacher timed in the same run"
    )
    timings = [seconds for seconds in report.get("timings_s", []) if seconds is not None]
    if timings:
        lines.append(f"- time taken: {sum(timings):.0f} s in all ({', '.join(f'{s:.0f} s' for s in timings)})")
    return lines


def kinds_against_first(report: dict[str, Any], seeds: list[int]) -> list[str]:
    """Each kind's student against the first kind's, paired by seed, on every accuracy the rows carry: the mean and
    std of the per-seed differences, and whether the mean is beyond twice the larger of the two kinds' own spreads."""
    kinds = list(report["kinds"])
    if len(kinds) < 2 or len(seeds) < 2:
        return []
    first = report["kinds"][kinds[0]]["results"]["student"]
    lines = []
    for metric in ("accuracy", "sampled_accuracy"):
        if metric not in first:
            continue
        parts = []
        for kind in kinds[1:]:
            row = report["kinds"][kind]["results"]["student"][metric]
            differences = [100 * (a - b) for a, b in zip(row["values"], first[metric]["values"], strict=True)]
            paired = spread(differences)
            noise = 2 * 100 * max(row["std"], first[metric]["std"])
            beyond = abs(row["mean"] - first[metric]["mean"]) * 100 > noise
            parts.append(f"{kind} {paired['mean']:+.2f} ± {paired['std']:.2f}" + (" (beyond 2 std)" if beyond else ""))
        lines.append(f"- {metric}, each kind's student - {kinds[0]}'s, paired by seed (points): " + "; ".join(parts))
    return lines


def write_kinds_seeds_report(output_dir: str, report: dict[str, Any]) -> None:
    """Write the kinds-over-seeds `report.json`, `report.md` and `report.png` (each kind's every seed)."""

    def plot(path: str) -> None:
        figure, axis = plt.subplots(figsize=(6, 4))
        for index, (kind, combined) in enumerate(report["kinds"].items()):
            for name in ("student", "baseline"):
                if name in combined["results"]:
                    row = combined["results"][name]
                    axis.errorbar(row["size_bytes"]["mean"] / 1e6, row["accuracy"]["mean"],
                                  yerr=row["accuracy"]["std"], fmt="o" if name == "student" else "s", capsize=4,
                                  color=f"C{index}", label=kind if name == "student" else f"{kind} baseline")  # fmt: skip
        teacher = next(iter(report["kinds"].values()))["results"]["teacher"]
        axis.errorbar(teacher["size_bytes"]["mean"] / 1e6, teacher["accuracy"]["mean"], yerr=teacher["accuracy"]["std"],
                      fmt="*", capsize=4, color="black", label="teacher")  # fmt: skip
        axis.set_xlabel("weights (MB)")
        axis.set_ylabel(f"accuracy (mean ± std over {len(report['seeds'])} seeds)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)

    write_report_files(output_dir, report, kinds_seeds_report_lines(report), plot)

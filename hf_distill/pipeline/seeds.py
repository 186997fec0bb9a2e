"""Several seeds: the whole pipeline once per seed, and one report of every figure's mean ± standard deviation.

report = run_seeds(args, config, seeds=[1, 2, 3], recipe="minilm-rotten-tomatoes")
# <output_dir>/seed-1, seed-2, seed-3 hold each run (its teacher, student, report); <output_dir>/report.* the spread

A claim that the student beats the baseline holds when the mean margin exceeds twice the seed-to-seed standard
deviation of that margin; the report says whether it does.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import matplotlib.pyplot as plt

from ..card import public_name
from ..config import DistillationConfig
from .arguments import PipelineArguments
from .report import _ordered, markdown_header, markdown_row, transfer_lines, write_report_files
from .run import run_pipeline

#: The figures of a model's row whose spread is reported (latencies are added by batch size).
ROW_FIGURES = ("accuracy", "perplexity", "parameters", "size_bytes")
#: The summary's figures whose spread is reported (speed-ups are added by batch size).
SUMMARY_FIGURES = ("retention", "gap_closure", "size_ratio")
#: Latencies (eager, compiled) and speed-ups, by batch size.
LATENCY_PREFIXES = ("latency_ms_batch_", "compiled_latency_ms_batch_")
SPEEDUP_PREFIXES = ("speedup_batch_", "compiled_speedup_batch_")


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and the values themselves (NaN in, NaN out:
    a gap closure is NaN where teacher and baseline tie)."""
    mean = sum(values) / len(values)
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {
        "mean": mean,
        "std": math.sqrt(variance),
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


def run_seeds(
    args: PipelineArguments, config: DistillationConfig, seeds: list[int], recipe: str | None = None
) -> dict[str, Any]:
    """Run the pipeline (or, with `args.student_kinds`, every kind) once per seed, each in
    `<output_dir>/seed-<seed>`, and write the combined report to `<output_dir>/report.{json,md,png}`."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    if config.push_to_hub:
        raise ValueError(
            "--push_to_hub with several --seeds would push one student per seed to one repository: run the seed "
            "you want to publish alone with --push_to_hub"
        )
    from .kinds import combine_kinds_over_seeds, run_student_kinds, write_kinds_seeds_report

    run = run_student_kinds if args.student_kinds else run_pipeline
    reports = []
    for seed in seeds:
        folder = os.path.join(config.output_dir, f"seed-{seed}")
        reports.append(run(args, dataclasses.replace(config, seed=seed, output_dir=folder), recipe))
    if args.student_kinds:
        combined = combine_kinds_over_seeds(reports, seeds)
        combined["recipe"] = recipe
        write_kinds_seeds_report(config.output_dir, combined)
        return combined
    combined = combine_reports(reports, seeds)
    combined["recipe"] = recipe
    write_seeds_report(config.output_dir, combined)
    return combined


def combine_reports(reports: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Each model's figures and the student's summary as spreads over the runs (one report per seed)."""
    models = [name for name in _ordered(reports[0]["results"]) if all(name in r["results"] for r in reports)]
    results = {}
    for name in models:
        rows = [report["results"][name] for report in reports]
        keys = [key for key in rows[0] if key in ROW_FIGURES or key.startswith(LATENCY_PREFIXES)]
        results[name] = {key: spread([float(row[key]) for row in rows]) for key in keys if all(key in r for r in rows)}
    summary_keys = [key for key in reports[0]["summary"] if key in SUMMARY_FIGURES or key.startswith(SPEEDUP_PREFIXES)]
    summary = {key: spread([float(report["summary"][key]) for report in reports]) for key in summary_keys}
    metric = "accuracy" if "accuracy" in results.get("student", {}) else None
    if metric and "baseline" in results:
        margins = [
            100 * (report["results"]["student"][metric] - report["results"]["baseline"][metric]) for report in reports
        ]
        summary["student_minus_baseline_points"] = spread(margins)
        summary["beats_baseline_seeds"] = sum(margin > 0 for margin in margins)
        margin = summary["student_minus_baseline_points"]
        summary["margin_beyond_two_std"] = len(margins) > 1 and margin["mean"] > 2 * margin["std"]
    refinement = None
    if reports[0].get("refinement"):  # DistilBERT's flow: the second stage's two models, and the margin between
        names = list(reports[0]["refinement"]["results"])
        accuracy = {name: [report["refinement"]["results"][name]["accuracy"] for report in reports] for name in names}
        refinement = {
            **{key: reports[0]["refinement"][key] for key in ("task", "dataset", "train_examples")},
            "results": {name: {"accuracy": spread(values)} for name, values in accuracy.items()},
            "margin_points": spread([100 * (a - b) for a, b in zip(*accuracy.values(), strict=True)]),
        }
    return {
        "seeds": list(seeds),
        "runs": [os.path.dirname(report["student_dir"]) for report in reports],
        **({"refinement": refinement} if refinement else {}),
        "task": reports[0].get("task"),
        "train_examples": reports[0].get("train_examples"),
        "transfer_examples": reports[0].get("transfer_examples"),
        "augmented_examples": reports[0].get("augmented_examples"),
        "losses": reports[0].get("losses"),
        "results": results,
        "summary": summary,
        "timings_s": [report.get("timings_s", {}).get("total") for report in reports],
    }


def _plus_minus(figure: dict[str, Any], scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    return f"{figure['mean'] * scale:.{digits}f}{unit} ± {figure['std'] * scale:.{digits}f}{unit}"


def seeds_report_lines(report: dict[str, Any]) -> list[str]:
    """The combined report as Markdown lines: means ± std per model, the per-seed figures, the student's summary."""
    results, summary, seeds = report["results"], report["summary"], report["seeds"]
    metric = next((key for key in ("accuracy", "perplexity") if key in results.get("student", {})), None)
    student = results.get("student", {})
    latencies = [
        key
        for prefix in LATENCY_PREFIXES
        for key in sorted((k for k in student if k.startswith(prefix)), key=lambda k: int(k.rsplit("_", 1)[1]))
    ]
    scale, unit = (100.0, "%") if metric == "accuracy" else (1.0, "")
    header = [
        "model",
        f"{metric} (mean ± std)",
        *[f"seed {seed}" for seed in seeds],
        "parameters (M)",
        "size (MB)",
        *[
            f"{'compiled ' if key.startswith('compiled_') else ''}CPU ms, batch {key.rsplit('_', 1)[1]}"
            for key in latencies
        ],
    ]
    lines = [
        f"# Distillation report over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}: "
        f"{report.get('recipe') or 'custom run'}",
        "",
        *markdown_header(header),
    ]
    for name, row in results.items():
        cells = [
            name,
            _plus_minus(row[metric], scale, unit=unit),
            *[f"{value * scale:.2f}{unit}" for value in row[metric]["values"]],
            f"{row['parameters']['mean'] / 1e6:.2f}",
            f"{row['size_bytes']['mean'] / 1e6:.1f}",
            *[_plus_minus(row[key], digits=1) for key in latencies],
        ]
        lines.append(markdown_row(cells))
    lines.append("")
    if "retention" in summary:
        figure = summary["retention"]
        lines.append(
            f"- retention (student / teacher {metric}): {_plus_minus(figure, 100, unit='%')} "
            f"(from {figure['min']:.2%} to {figure['max']:.2%})"
        )
    if "student_minus_baseline_points" in summary:
        margin = summary["student_minus_baseline_points"]
        beyond = "more" if summary["margin_beyond_two_std"] else "not more"
        lines.append(
            f"- student - baseline: {margin['mean']:+.2f} ± {margin['std']:.2f} points; the student beats the "
            f"baseline with {summary['beats_baseline_seeds']} of {len(seeds)} seeds, by {beyond} than twice the "
            "seed-to-seed standard deviation"
        )
    if "gap_closure" in summary and all(math.isfinite(value) for value in summary["gap_closure"]["values"]):
        lines.append(f"- gap closure: {_plus_minus(summary['gap_closure'], 100, unit='%')}")
    for key, figure in summary.items():
        if key.startswith(SPEEDUP_PREFIXES):
            both = ", both compiled" if key.startswith("compiled_") else ""
            lines.append(f"- CPU speed-up at batch {key.rsplit('_', 1)[1]}{both}: {_plus_minus(figure, unit='x')}")
    if "size_ratio" in summary:
        figure = summary["size_ratio"]
        lines.append(f"- size: the student's weights take {_plus_minus(figure, 100, unit='%')} of the teacher's bytes")
    lines += transfer_lines(report)
    stage = report.get("refinement")
    if stage:
        (first, one), (second, two) = stage["results"].items()
        margin = stage["margin_points"]
        lines.append(
            f"- refinement on {public_name(stage['dataset'])} ({stage['task']}): {first} "
            f"{_plus_minus(one['accuracy'], 100, unit='%')}, {second} {_plus_minus(two['accuracy'], 100, unit='%')}; "
            f"difference {margin['mean']:+.2f} ± {margin['std']:.2f} points"
        )
    lines.append("- std: the sample standard deviation over the seeds; each seed's own report is in " +
                 ", ".join(f"`{run}`" for run in report["runs"]))  # fmt: skip
    timings = [seconds for seconds in report.get("timings_s", []) if seconds is not None]
    if timings:
        lines.append(f"- time taken: {sum(timings):.0f} s in all ({', '.join(f'{s:.0f} s' for s in timings)})")
    return lines


def _plot_spread(report: dict[str, Any], metric: str, path: str) -> None:
    """Each model's metric against its parameters and latencies: every seed's point, and the mean with ± 1 std."""
    results = report["results"]
    student = results["student"]
    axes_keys = [("parameters", "parameters (millions)", 1e-6)] + [
        (key, f"CPU latency, batch {key.rsplit('_', 1)[1]} (ms)", 1.0)
        for key in student
        if key.startswith("latency_ms_batch_")
    ]
    figure, axes = plt.subplots(1, len(axes_keys), figsize=(4.5 * len(axes_keys), 4), squeeze=False)
    for axis, (key, label, scale) in zip(axes[0], axes_keys, strict=True):
        for index, (name, row) in enumerate(results.items()):
            color = f"C{index}"
            axis.scatter([value * scale for value in row[key]["values"]], row[metric]["values"], s=15,
                         alpha=0.4, color=color)  # fmt: skip
            axis.errorbar(row[key]["mean"] * scale, row[metric]["mean"], yerr=row[metric]["std"],
                          xerr=row[key]["std"] * scale, fmt="o", capsize=4, color=color, label=name)  # fmt: skip
        axis.set_xlabel(label)
        axis.set_ylabel(f"{metric} (mean ± std over {len(report['seeds'])} seeds)")
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_seeds_report(output_dir: str, report: dict[str, Any]) -> None:
    """Write the combined `report.json`, `report.md` and `report.png` to `output_dir`."""
    metric = next(key for key in ("accuracy", "perplexity") if key in report["results"]["student"])
    write_report_files(output_dir, report, seeds_report_lines(report), lambda path: _plot_spread(report, metric, path))

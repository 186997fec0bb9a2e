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
from .kinds import combine_kinds_over_seeds, run_student_kinds, write_kinds_seeds_report
from .report import markdown_header, markdown_row, transfer_lines, write_report_files
from .run import run_pipeline
from .spread import LATENCY_PREFIXES, SPEEDUP_PREFIXES, combine_reports, plus_minus


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
        *(["sampled_accuracy (mean ± std)"] if "sampled_accuracy" in student else []),
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
            plus_minus(row[metric], scale, unit=unit),
            *[f"{value * scale:.2f}{unit}" for value in row[metric]["values"]],
            *([plus_minus(row["sampled_accuracy"], 100, unit="%")] if "sampled_accuracy" in student else []),
            f"{row['parameters']['mean'] / 1e6:.2f}",
            f"{row['size_bytes']['mean'] / 1e6:.1f}",
            *[plus_minus(row[key], digits=1) for key in latencies],
        ]
        lines.append(markdown_row(cells))
    lines.append("")
    if "retention" in summary:
        figure = summary["retention"]
        lines.append(
            f"- retention (student / teacher {metric}): {plus_minus(figure, 100, unit='%')} "
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
        lines.append(f"- gap closure: {plus_minus(summary['gap_closure'], 100, unit='%')}")
    for key, figure in summary.items():
        if key.startswith(SPEEDUP_PREFIXES):
            both = ", both compiled" if key.startswith("compiled_") else ""
            lines.append(f"- CPU speed-up at batch {key.rsplit('_', 1)[1]}{both}: {plus_minus(figure, unit='x')}")
    if "size_ratio" in summary:
        figure = summary["size_ratio"]
        lines.append(f"- size: the student's weights take {plus_minus(figure, 100, unit='%')} of the teacher's bytes")
    lines += transfer_lines(report)
    stage = report.get("refinement")
    if stage:
        (first, one), (second, two) = stage["results"].items()
        margin = stage["margin_points"]
        lines.append(
            f"- refinement on {public_name(stage['dataset'])} ({stage['task']}): {first} "
            f"{plus_minus(one['accuracy'], 100, unit='%')}, {second} {plus_minus(two['accuracy'], 100, unit='%')}; "
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

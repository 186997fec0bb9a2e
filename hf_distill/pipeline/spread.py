"""Figures over several runs (one per seed): each figure's spread, and the reports of the runs combined."""

from __future__ import annotations

import math
import os
from typing import Any

from .report import ordered_rows

#: The figures of a model's row whose spread is reported (latencies are added by batch size).
ROW_FIGURES = ("accuracy", "sampled_accuracy", "perplexity", "parameters", "size_bytes")
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


def combine_reports(reports: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Each model's figures and the student's summary as spreads over the runs (one report per seed)."""
    models = [name for name in ordered_rows(reports[0]["results"]) if all(name in r["results"] for r in reports)]
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


def plus_minus(figure: dict[str, Any], scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """A spread as `mean ± std`, scaled (100 for a percentage) and with its unit."""
    return f"{figure['mean'] * scale:.{digits}f}{unit} ± {figure['std'] * scale:.{digits}f}{unit}"

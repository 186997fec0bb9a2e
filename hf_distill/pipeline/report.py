"""Stages 5 and 6: the report (JSON, Markdown, plot), the saved student with its model card, and the push.

report = write_report(output_dir, results, recipe="distilbert")
save_student(student, processor, folder, model_card(report, ...))
push_student(folder, repo_id="me/my-student")
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from huggingface_hub import HfApi, ModelCard, ModelCardData  # noqa: E402

from ..card import distillation_metadata, loss_lines, public_name  # noqa: E402
from ..guards import check_finite_weights  # noqa: E402
from .evaluation import untrusted_latencies  # noqa: E402
from .models import AUTO_CLASSES, save_atomically  # noqa: E402
from .sources import hub_id  # noqa: E402

MODEL_ORDER = ("teacher", "student before refinement", "student", "baseline")


def teacher_row(name: str, several: dict | None) -> str:
    """The row of a teacher in the results: "teacher", or "teacher <name>" when there are several."""
    return f"teacher {name}" if several else "teacher"


def teacher_rows(results: dict[str, Any]) -> list[str]:
    """The results' teacher rows, in order."""
    return [name for name in results if name == "teacher" or name.startswith("teacher ")]


def reference_teacher(results: dict[str, dict[str, Any]], metric: str = "accuracy") -> dict[str, Any]:
    """The teacher the student is measured against: the only one, or of several the most accurate."""
    return max((results[name] for name in teacher_rows(results)), key=lambda row: row[metric])


def ordered_rows(results: dict[str, Any]) -> list[str]:
    """Teachers first, then the born-again generations before the last, the student and the baseline."""
    generations = [name for name in results if name.startswith("generation ")]
    return [*teacher_rows(results), *generations, *(name for name in MODEL_ORDER[1:] if name in results)]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def margin_line(results: dict[str, dict[str, Any]], seeds_margin: dict[str, Any] | None) -> str:
    """One line: the student's margin over the baseline, and whether it is beyond twice what seeds vary it by (the
    recipe's figure over several seeds, when it has one)."""
    margin = 100 * (results["student"]["accuracy"] - results["baseline"]["accuracy"])
    line = f"- student - baseline: {margin:+.2f} points"
    if seeds_margin is None:
        return line + "; run with --seeds 1 2 3 to see what seeds vary it by"
    seeds = ", ".join(str(seed) for seed in seeds_margin["seeds"])
    spread = 2 * seeds_margin["std"]
    verdict = "beyond" if margin > spread else "within"
    return (
        line + f"; seeds vary it by {seeds_margin['std']:.2f} points (seeds {seeds}: {seeds_margin['mean']:+.2f} "
        f"± {seeds_margin['std']:.2f}, docs/results.md), so this margin is {verdict} twice that ({spread:.2f})"
    )


def summarise(results: dict[str, dict[str, Any]], metric: str = "accuracy") -> dict[str, float]:
    """Retention, gap closure, speed-ups and compression of the student, from per-model results (against the most
    accurate teacher when there are several)."""
    teacher, student = reference_teacher(results, metric), results["student"]
    summary = {
        "retention": _ratio(student[metric], teacher[metric]),
        "parameter_ratio": student["parameters"] / teacher["parameters"],
        "size_ratio": student["size_bytes"] / teacher["size_bytes"],
    }
    for key in teacher:
        for prefix in ("", "compiled_"):
            if key.startswith(f"{prefix}latency_ms_batch_"):
                summary[f"{prefix}speedup_batch_{key.rsplit('_', 1)[1]}"] = _ratio(teacher[key], student[key])
    # Latencies the measurement itself shows to be unreliable (noisy repeats, one network timed at two speeds).
    summary["latency_untrusted"] = untrusted_latencies(results)
    if "baseline" in results:
        baseline = results["baseline"][metric]
        summary["gap_closure"] = _ratio(student[metric] - baseline, teacher[metric] - baseline)
        summary["beats_baseline"] = student[metric] > baseline
    return summary


def markdown_row(cells: list[str]) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(cells) + " |"


def markdown_header(header: list[str]) -> list[str]:
    """A Markdown table's header row and the rule under it."""
    return [markdown_row(header), "|" + "---|" * len(header)]


def _table(results: dict[str, dict[str, Any]], metrics: list[str], untrusted: dict[str, str]) -> list[str]:
    def batch(key: str) -> str:
        return key.rsplit("_", 1)[1]

    eager = sorted((k for k in results["student"] if k.startswith("latency_ms_batch_")), key=lambda k: int(batch(k)))
    compiled = [f"compiled_{key}" for key in eager if f"compiled_{key}" in results["student"]]
    latencies = eager + compiled
    header = [
        "model",
        *metrics,
        "parameters (M)",
        "size (MB)",
        *[f"CPU ms, batch {batch(k)}" + (" (noisy)" if batch(k) in untrusted else "") for k in eager],
        *[f"compiled CPU ms, batch {batch(k)}" for k in compiled],
    ]
    lines = markdown_header(header)
    for name in ordered_rows(results):
        row = results[name]
        cells = [
            name,
            *[f"{row[m]:.4f}" for m in metrics],
            f"{row['parameters'] / 1e6:.2f}",
            f"{row['size_bytes'] / 1e6:.1f}",
            *[f"{row[k]:.1f}" for k in latencies],
        ]
        lines.append(markdown_row(cells))
    return lines


def _plot(results: dict[str, dict[str, Any]], metric: str, path: str) -> None:
    latencies = [key for key in results["student"] if key.startswith("latency_ms_batch_")]
    axes_keys = [("parameters", "parameters (millions)", 1e-6)] + [
        (key, f"CPU latency, batch {key.rsplit('_', 1)[1]} (ms)", 1.0) for key in latencies
    ]
    figure, axes = plt.subplots(1, len(axes_keys), figsize=(4.5 * len(axes_keys), 4), squeeze=False)
    for axis, (key, label, scale) in zip(axes[0], axes_keys, strict=True):
        for name in ordered_rows(results):
            if name in results:
                axis.scatter(results[name][key] * scale, results[name][metric], s=60, label=name)
                axis.annotate(
                    name,
                    (results[name][key] * scale, results[name][metric]),
                    textcoords="offset points",
                    xytext=(5, 5),
                )
        axis.set_xlabel(label)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def build_report(results: dict[str, dict[str, Any]], **context: Any) -> dict[str, Any]:
    """The report: `results` maps teacher/student(/baseline) to their metrics and measurements, `summary` adds
    retention, gap closure and compression, and `context` (recipe, teacher, data, losses, seed, timings...) is
    stored as it is."""
    return {**context, "results": results, "summary": summarise(results)}


def write_report(output_dir: str, report: dict[str, Any]) -> None:
    """Write `report.json`, `report.md` and `report.png` (accuracy against parameters and CPU latency)."""
    write_report_files(
        output_dir, report, report_lines(report), lambda path: _plot(report["results"], "accuracy", path)
    )


def write_report_files(output_dir: str, report: dict[str, Any], lines: list[str], plot: Callable[[str], None]) -> None:
    """`report` as `report.json`, `lines` as `report.md`, and `plot(path)` drawn to `report.png`, in `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as handle:
        json.dump(json_ready(report), handle, indent=2, default=str, allow_nan=False)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    plot(os.path.join(output_dir, "report.png"))


def json_ready(value: Any) -> Any:
    """`value` with every NaN or infinity as None: JSON has neither (a gap closure is undefined where the teacher and
    the baseline score alike; the Markdown report says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def transfer_lines(report: dict[str, Any]) -> list[str]:
    """What the student saw besides its labeled examples (a transfer set, augmented copies), as Markdown items; the
    single-run report and the seeds report both print them."""
    if not report.get("transfer_examples"):
        return []
    lines = [
        f"- transfer set: the student distilled on {report['train_examples']:,} labeled examples and "
        f"{report['transfer_examples']:,} without labels (teacher targets only); the baseline trained on the "
        "labeled ones for as many steps"
    ]
    if report.get("augmented_examples"):
        lines.append(
            f"- augmented copies: {report['augmented_examples']:,} of the examples without labels are augmented "
            "copies of the labeled ones, drawn once (word replacement by a masked LM, or image augmentation)"
        )
    return lines


def refinement_lines(report: dict[str, Any]) -> list[str]:
    """The refinement stage, as Markdown: the student before and after refinement on the same task, or (another
    task) the distilled student and the undistilled one, both fine-tuned on it, in a table of their own."""
    results, lines = report["results"], []
    if "student before refinement" in results:
        before, after = results["student before refinement"]["accuracy"], results["student"]["accuracy"]
        lines.append(
            f"- refinement: after distillation the student trained {report['training_steps']['refinement']} more "
            f"steps on the labels; accuracy {before:.2%} before, {after:.2%} after ({100 * (after - before):+.2f} points)"
        )
    stage = report.get("refinement")
    if stage:
        rows = stage["results"]
        latencies = [key for key in next(iter(rows.values())) if key.startswith("latency_ms_batch_")]
        header = ["model", "accuracy", "parameters (M)", *[f"CPU ms, batch {k.rsplit('_', 1)[1]}" for k in latencies]]
        lines += [
            "",
            f"## Refinement on {public_name(stage['dataset'])} ({stage['task']}, {stage['train_examples']:,} labeled examples)",
            "",
            *markdown_header(header),
        ]
        for name, row in rows.items():
            cells = [
                name,
                f"{row['accuracy']:.2%}",
                f"{row['parameters'] / 1e6:.2f}",
                *[f"{row[k]:.1f}" for k in latencies],
            ]
            lines.append(markdown_row(cells))
        margin = rows["distilled, then refined"]["accuracy"] - rows["refined without distillation"]["accuracy"]
        lines += ["", f"- distilled, then refined - refined without distillation: {100 * margin:+.2f} points"]
    return lines


def report_lines(report: dict[str, Any]) -> list[str]:
    """The teacher/student(/baseline) table and the student's summary, as Markdown lines."""
    results, summary = report["results"], report["summary"]
    metrics = [key for key in ("accuracy", "sampled_accuracy", "perplexity") if key in results["student"]]
    untrusted = summary.get("latency_untrusted", {})
    lines = [
        f"# Distillation report: {report.get('recipe') or 'custom run'}",
        "",
        *_table(results, metrics, untrusted),
        "",
    ]
    several = len(teacher_rows(results)) > 1
    whose = "the most accurate teacher" if several else "teacher"
    retention = summary["retention"]
    retention = f"{retention:.2%}" if math.isfinite(retention) else f"undefined (the {whose} scores 0)"
    lines.append(f"- retention (student / {whose} accuracy): {retention}")
    lines.append(f"- parameters: {summary['parameter_ratio']:.2%} of {'its' if several else 'the teacher'}'s")
    lines.append(
        f"- weights: {summary['size_ratio']:.2%} of {'its' if several else 'the teacher'}'s bytes "
        f"({1 / summary['size_ratio']:.2f}x smaller)"
    )
    for key, value in summary.items():
        if key.startswith("speedup_batch_"):
            batch = key.rsplit("_", 1)[1]
            noisy = " (not to be trusted: see below)" if batch in untrusted else ""
            lines.append(f"- CPU speed-up at batch {batch}: {value:.2f}x{noisy}")
        elif key.startswith("compiled_speedup_batch_"):
            lines.append(f"- CPU speed-up at batch {key.rsplit('_', 1)[1]}, both compiled: {value:.2f}x")
    if "gap_closure" in summary:
        closure = summary["gap_closure"]
        closure = (
            f"{closure:.2%}" if math.isfinite(closure) else "undefined (the teacher and the baseline score alike)"
        )
        lines.append(
            f"- gap closure ((student - baseline) / (teacher - baseline)): {closure}; "
            f"student {'beats' if summary['beats_baseline'] else 'does not beat'} the baseline"
        )
    if "baseline" in results and "accuracy" in metrics:
        lines.append(margin_line(results, report.get("seeds_margin")))
    lines += transfer_lines(report)
    lines += refinement_lines(report)
    if report.get("ema_teacher"):
        lines.append("- self-distillation: the student learnt from a moving average of its own weights (mean teacher)")
    generations = report.get("generations") or 1
    if generations > 1:
        lines.append(
            f"- born-again generations: {generations}; each learnt from the one before, the student is the last "
            f"(generation {generations})"
        )
    metric = report.get("generation_metric")
    if metric is not None:  # causal LM
        scored = (
            "the share of the reference completion tokens each model ranks first (teacher-forced)"
            if metric == "perplexity"
            else f"the share of the {report.get('eval_examples', 'held-out'):,} held-out prompts whose greedy "
            f"completion passes `{metric}`"
        )
        lines.append(f"- accuracy: {scored}")
        if "sampled_accuracy" in metrics:
            lines.append(
                "- sampled_accuracy: the same share for one completion a prompt sampled at temperature 1 from the "
                "full distribution, every model on the same random stream"
            )
        lines.append(
            "- perplexity: exp(mean cross-entropy) over the reference completion tokens of the held-out split"
        )
    elif "perplexity" in metrics:
        lines.append(
            "- perplexity: exp(mean cross-entropy) over the masked tokens of the held-out split, masked once with a "
            "fixed seed"
        )
    if report.get("completions"):
        settings = report["completions"]
        lines.append(
            f"- completions: the student's own with probability lmbda = {settings['lmbda']} per optimizer step"
            + (", else the teacher's (seq_kd)" if settings["seq_kd"] else ", else the data set's")
        )
    for batch, reason in untrusted.items():
        lines.append(
            f"- CPU latency at batch {batch} cannot be trusted: {reason}, so something else was using the CPU while the "
            "models were timed. For a clean figure, rerun with nothing else running on the machine (a larger "
            "--latency_repeats helps against short spells)"
        )
    timings = report.get("timings_s")
    if timings:
        stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items() if stage != "total")
        total = f"{timings['total']:.0f} s in all: " if "total" in timings else ""
        lines.append(f"- time taken: {total}{stages}")
    return lines


def _card_refinement(stage: dict[str, Any]) -> dict[str, Any]:
    return {
        "task": stage["task"],
        "dataset": public_name(stage["dataset"]),
        "accuracy": {name: row["accuracy"] for name, row in stage["results"].items()},
    }


def model_card(
    report: dict[str, Any],
    recipe: str | None,
    dataset: str,
    teacher: str | None,
    losses: dict,
    classes: dict[str, str] | None = None,
) -> ModelCard:
    """A model card that records the teacher, the losses, the data and the measured metrics and compression.

    `teacher` is the `--teacher` value (None for a teacher built from a config); `base_model` names its Hub id,
    or the Hub copy of an offline model, and is left out for local folders. A card may be pushed: local folders
    and files are named by their last path component, never by their path on this machine. `classes` names each
    result row's model class. The `hf_distill` metadata has the keys of every hf_distill card
    ([`hf_distill.card.distillation_metadata`])."""
    results, summary = report["results"], report["summary"]
    reference = reference_teacher(results)
    base_model, hub_dataset = hub_id(teacher), hub_id(dataset)
    trained_here = report.get("teacher_used") != teacher
    several = report.get("teachers") or {}
    given = {name: entry["given"] for name, entry in several.items()} or {"teacher": teacher}
    classes = classes or {}

    def facts(row: str, name_or_path: str | None) -> dict[str, Any]:
        return {"name_or_path": name_or_path, "class": classes.get(row), "parameters": results[row]["parameters"],
                "weight_bytes": results[row]["size_bytes"]}  # fmt: skip

    teachers = {name: facts(teacher_row(name, several), path) for name, path in given.items()}
    reference_name = next(name for name in given if results[teacher_row(name, several)] is reference)
    metadata = distillation_metadata(
        facts("student", None),
        teachers,
        losses,
        from_cache=report.get("teacher_cache") is not None,
        reference=reference_name,
        teacher_config=report.get("teacher_config"),
        recipe=recipe,
        dataset=public_name(dataset),
        transfer_examples=report.get("transfer_examples", 0),
        augmented_examples=report.get("augmented_examples", 0),
        summary=summary,
        refinement=_card_refinement(report["refinement"]) if report.get("refinement") else None,
    )
    teacher, dataset = public_name(teacher), public_name(dataset)
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        tags=["distillation", "hf_distill", *([f"recipe:{recipe}"] if recipe else [])],
        datasets=[hub_dataset] if hub_dataset else None,
        metrics=["accuracy"] + (["perplexity"] if "perplexity" in results["student"] else []),
        hf_distill=metadata,
    )
    if several:
        teacher_words = f"{len(several)} teachers, " + "; ".join(
            f"`{name}`: `{public_name(given['given'])}` ({results[teacher_row(name, several)]['parameters']:,} "
            "parameters" + (", task head trained here first)" if given["used"] != given["given"] else ")")
            for name, given in several.items()
        )
    elif teacher is None:
        teacher_words = "a teacher trained here from a config"
    elif trained_here:
        teacher_words = f"the teacher `{teacher}`, whose task head was trained here first"
    else:
        teacher_words = f"the teacher `{teacher}`"
    auto_class = AUTO_CLASSES[report["task"]].__name__ if report.get("task") in AUTO_CLASSES else "AutoModel"
    body = [
        "# Distilled student",
        "",
        f"Distilled with hf_distill from {teacher_words} on `{dataset}`"
        + (f", recipe `{recipe}`." if recipe else "."),
        "",
        "## Losses",
        "",
        *loss_lines(losses),
        "",
        "## Results on the held-out split",
        "",
        *report_lines(report)[2:],
        "",
        "## Compression",
        "",
        f"- parameters: {results['student']['parameters']:,} vs {reference['parameters']:,} "
        f"({summary['parameter_ratio']:.1%})",
        f"- size of the weights: {results['student']['size_bytes'] / 1e6:.1f} MB vs "
        f"{reference['size_bytes'] / 1e6:.1f} MB",
        *[
            f"- CPU speed-up at batch {k.rsplit('_', 1)[1]}: {v:.2f}x"
            for k, v in summary.items()
            if k.startswith("speedup_batch_")
        ],
        "",
        "## Use",
        "",
        f"Load it like any Transformers model: `{auto_class}.from_pretrained(<this folder or repo>)`, with its "
        "tokenizer or image processor from the same place.",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def save_student(model, processor, folder: str, card: ModelCard) -> str:
    """Save the student (safetensors), its tokenizer or image processor and its model card, written elsewhere first
    and moved into place file by file, the weights last; a student whose weights are not finite is refused."""
    check_finite_weights(model, folder)

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        card.save(os.path.join(tmp, "README.md"))

    save_atomically(folder, write)
    return folder


def push_student(
    folder: str, repo_id: str, token: str | None = None, private: bool | None = None, api: HfApi | None = None
) -> str:
    """Upload a folder written by `save_student` (model, processor, card) to the Hub in one commit."""
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload distilled student")
    return str(getattr(commit, "commit_url", commit))

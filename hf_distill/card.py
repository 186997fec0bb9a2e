"""What a `DistillationTrainer`'s model card says beyond the Trainer's own: the teacher, the losses, the compression.

`Trainer.create_model_card` (also run by `Trainer.push_to_hub`) writes `<output_dir>/README.md` from the training
summary; `DistillationTrainer.create_model_card` then adds the tags `distillation` and `hf_distill`, an `hf_distill`
metadata entry and a "Distillation" section through `add_distillation_section`.
"""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import ModelCard
from torch import nn

TAGS = ("distillation", "hf_distill")


def public_name(name: str | None) -> str | None:
    """How a card that may be pushed names a model or data set: a Hub id as it is, a local path by its last
    component (a folder's name, a file's name or glob), never the local filesystem path."""
    if not name:
        return None
    parts = name.split(",")
    return ",".join(os.path.basename(os.path.normpath(os.path.expanduser(p))) if is_local(p) else p for p in parts)


def is_local(name: str) -> bool:
    """Whether a model or data set name is a path on this machine (or a glob of files), not a Hub id."""
    path_like = os.path.isabs(name) or name.startswith(("./", "../", "~")) or "\\" in name
    return path_like or os.path.exists(name) or any(character in name for character in "*?[")


def model_facts(model: nn.Module) -> dict[str, Any]:
    """Name (Hub id or path it was loaded from, None when built from a config), class, parameters, weight bytes."""
    config = getattr(model, "config", None)
    # Under DeepSpeed ZeRO-3 a process holds a shard of each weight; `ds_numel` is the whole weight's size.
    sizes = [
        (getattr(parameter, "ds_numel", parameter.numel()), parameter.element_size())
        for parameter in model.parameters()
    ]
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "class": type(model).__name__,
        "parameters": sum(count for count, _ in sizes),
        "weight_bytes": sum(count * size for count, size in sizes),
    }


def cached_teacher_facts(record: dict[str, Any]) -> dict[str, Any]:
    """The same facts of a teacher known from its cache's record (counts absent from caches that predate them)."""
    teacher = record.get("teacher") or {}
    config = teacher.get("config") or {}
    return {
        "name_or_path": config.get("_name_or_path") or None,
        "class": teacher.get("class"),
        "parameters": teacher.get("parameters"),
        "weight_bytes": teacher.get("weight_bytes"),
    }


def add_distillation_section(
    path: str, student: dict[str, Any], teacher: dict[str, Any], losses: dict[str, dict], from_cache: bool
) -> None:
    """Add the distillation tags, metadata and section to the model card at `path` (rewritten whole, in one rename).

    Args:
        student, teacher (`dict`): `model_facts` of each (the teacher's may come from `cached_teacher_facts`).
        losses (`dict`): the configured losses, as in `DistillationConfig.losses`.
        from_cache (`bool`): whether the teacher's outputs were read from a teacher-output cache.
    """
    card = ModelCard.load(path)
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *TAGS]))
    ratio = None
    if teacher.get("parameters"):
        ratio = student["parameters"] / teacher["parameters"]
    card.data.hf_distill = {
        "teacher": public_name(teacher["name_or_path"]),
        "teacher_class": teacher["class"],
        "teacher_parameters": teacher.get("parameters"),
        "student_parameters": student["parameters"],
        "parameter_ratio": ratio,
        "losses": losses,
        "teacher_cache": from_cache,
    }
    named = (
        f"`{public_name(teacher['name_or_path'])}` " if teacher["name_or_path"] else "a teacher built from a config "
    )
    lines = [
        "## Distillation",
        "",
        f"Distilled with hf_distill from {named}(`{teacher['class']}`)"
        + (", whose outputs were read from a teacher-output cache." if from_cache else "."),
        "",
        "| model | class | parameters | weights (MB) |",
        "|---|---|---|---|",
    ]
    for name, facts in (("teacher", teacher), ("student", student)):
        parameters = f"{facts['parameters']:,}" if facts.get("parameters") else "-"
        size = f"{facts['weight_bytes'] / 1e6:.1f}" if facts.get("weight_bytes") else "-"
        lines.append(f"| {name} | `{facts['class']}` | {parameters} | {size} |")
    if ratio is not None:
        lines += ["", f"The student has {ratio:.1%} of the teacher's parameters ({1 / ratio:.2f}x fewer)."]
    lines += ["", "Loss: the weighted sum of", "", *loss_lines(losses)]
    card.text = card.text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    card.save(path + ".tmp")
    os.replace(path + ".tmp", path)


def loss_lines(losses: dict[str, dict]) -> list[str]:
    """One Markdown bullet per configured term: its name, weight and options (model cards of trainer and pipeline)."""
    lines = []
    for term, spec in losses.items():
        options = ", ".join(f"{key} {value}" for key, value in spec.items() if key != "weight")
        lines.append(f"- `{term}`, weight {spec.get('weight', 1.0)}" + (f": {options}" if options else ""))
    return lines

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
#: What only a pipeline run knows: its recipe, data, transfer set, measured summary and refinement (None elsewhere).
RUN_KEYS = ("recipe", "dataset", "transfer_examples", "augmented_examples", "summary", "refinement")
#: The keys of the `hf_distill` metadata entry of every card hf_distill writes, the trainer's and the pipeline's.
CARD_KEYS = (
    "teacher",
    "teacher_class",
    "teacher_parameters",
    "teacher_config",
    "teachers",
    "student_parameters",
    "parameter_ratio",
    "losses",
    "teacher_cache",
    *RUN_KEYS,
)


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


def distillation_metadata(
    student: dict[str, Any],
    teachers: dict[str, dict[str, Any]],
    losses: dict[str, dict],
    from_cache: bool,
    reference: str | None = None,
    teacher_config: dict | None = None,
    **run: Any,
) -> dict[str, Any]:
    """The `hf_distill` metadata entry of a model card, with the keys of `CARD_KEYS` whoever writes it.

    `student` and `teachers` are `model_facts`; `teacher` names the first teacher (by its public name), `teachers`
    lists every one when there are several (else None), and `parameter_ratio` is the student's parameters over
    those of `reference` (the teacher it is measured against; default the largest). `run` holds the `RUN_KEYS`
    a pipeline run knows.
    """
    unknown = set(run) - set(RUN_KEYS)
    if unknown:
        raise TypeError(f"not keys of the hf_distill card metadata: {sorted(unknown)} (known: {', '.join(CARD_KEYS)})")
    sizes = [facts.get("parameters") for facts in teachers.values()]
    if reference is not None:
        against = teachers[reference].get("parameters")
    else:
        against = max(sizes) if sizes and all(sizes) else None
    first = next(iter(teachers.values()), {"name_or_path": None, "class": None})
    several = [
        {"name": name, "teacher": public_name(facts["name_or_path"]), "class": facts["class"],
         "parameters": facts.get("parameters")}
        for name, facts in teachers.items()
    ]  # fmt: skip
    return {
        "teacher": public_name(first["name_or_path"]),
        "teacher_class": first["class"],
        "teacher_parameters": first.get("parameters"),
        "teacher_config": teacher_config,
        "teachers": several if len(several) > 1 else None,
        "student_parameters": student["parameters"],
        "parameter_ratio": None if not against else student["parameters"] / against,
        "losses": losses,
        "teacher_cache": from_cache,
        **{key: run.get(key) for key in RUN_KEYS},
    }


def add_distillation_section(
    path: str,
    student: dict[str, Any],
    teachers: dict[str, dict[str, Any]],
    losses: dict[str, dict],
    from_cache: bool,
) -> None:
    """Add the distillation tags, metadata and section to the model card at `path` (rewritten whole, in one rename).

    Args:
        student (`dict`): `model_facts` of the student.
        teachers (`dict`): `{name: model_facts}` of every teacher (from `cached_teacher_facts` for a cache). One
            teacher is described as "the teacher"; several each by name, and the parameter ratio is the student's
            against the largest; none (a run whose terms read no teacher) is said so.
        losses (`dict`): the configured losses, as in `DistillationConfig.losses`.
        from_cache (`bool`): whether the teacher's outputs were read from a teacher-output cache.
    """
    card = ModelCard.load(path)
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *TAGS]))
    metadata = distillation_metadata(student, teachers, losses, from_cache)
    card.data.hf_distill = metadata
    ratio, several = metadata["parameter_ratio"], len(teachers) > 1
    first = next(iter(teachers.values()), {"name_or_path": None, "class": None})

    def named(facts: dict[str, Any]) -> str:
        where = (
            f"`{public_name(facts['name_or_path'])}` " if facts["name_or_path"] else "a teacher built from a config "
        )
        return f"{where}(`{facts['class']}`)"

    if several:
        source = f"from {len(teachers)} teachers: " + "; ".join(f"{n}, {named(f)}" for n, f in teachers.items())
    else:
        source = f"from {named(first)}" if teachers else "without a teacher (its loss terms read none)"
    lines = [
        "## Distillation",
        "",
        f"{'Distilled' if teachers else 'Trained'} with hf_distill {source}"
        + (", whose outputs were read from a teacher-output cache." if from_cache else "."),
        "",
        "| model | class | parameters | weights (MB) |",
        "|---|---|---|---|",
    ]
    rows = [(f"teacher `{name}`" if several else "teacher", facts) for name, facts in teachers.items()]
    for name, facts in (*rows, ("student", student)):
        parameters = f"{facts['parameters']:,}" if facts.get("parameters") else "-"
        size = f"{facts['weight_bytes'] / 1e6:.1f}" if facts.get("weight_bytes") else "-"
        lines.append(f"| {name} | `{facts['class']}` | {parameters} | {size} |")
    if ratio is not None:
        whose = "the largest teacher's" if several else "the teacher's"
        lines += ["", f"The student has {ratio:.1%} of {whose} parameters ({1 / ratio:.2f}x fewer)."]
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

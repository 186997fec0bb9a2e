"""What a run optimises, recorded in each checkpoint and compared when training resumes from it.

`distillation_objective.json` holds the settings that change the objective: every configured term with its
weight and options (temperature, divergence, layer map...), the teachers by name with their weights, which of them
learn and how (trainable, moving average and its momentum). Resuming with any of them changed would mix two
objectives in one run, so it is refused, naming each change, before any step, unless
`DistillationConfig.resume_with_changed_objective` says it is meant: then what still fits is loaded (the projectors
whose shapes match; the optimizer's state when its parameter groups match) and the rest is named in the log.
A checkpoint written before these records existed resumes unchecked.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn

from .cache.store import write_json_atomically

#: File in each checkpoint holding the objective the run optimised.
OBJECTIVE_NAME = "distillation_objective.json"

logger = logging.getLogger(__name__)


def objective_record(args: Any, roster: Any) -> dict[str, Any]:
    """The settings of `args` (a `DistillationConfig`) and `roster` that define the objective, as JSON-able data."""
    learning = dict(roster.learning)
    return {
        "losses": json.loads(json.dumps(args.losses, sort_keys=True, default=str)),
        "teachers": list(roster.names),
        "teacher_weights": {name: round(weight, 12) for name, weight in roster.weights.items()},
        "learning_teachers": learning,
        **({"ema_momentum": args.ema_momentum} if "ema" in learning.values() else {}),
    }


def write_objective(record: dict[str, Any], checkpoint: str) -> None:
    write_json_atomically(os.path.join(checkpoint, OBJECTIVE_NAME), record)


def changes(before: Any, now: Any, where: str = "") -> list[str]:
    """Every setting that differs between two records, as `where: before -> now` lines."""
    if isinstance(before, dict) and isinstance(now, dict):
        found = []
        for key in sorted(set(before) | set(now), key=str):
            place = f"{where}[{key!r}]" if where else str(key)
            if key not in now:
                found.append(f"{place}: {before[key]!r} in the checkpoint, absent now")
            elif key not in before:
                found.append(f"{place}: absent in the checkpoint, {now[key]!r} now")
            else:
                found += changes(before[key], now[key], place)
        return found
    return [] if before == now else [f"{where}: {before!r} in the checkpoint, {now!r} now"]


def check_resume(checkpoint: str, record: dict[str, Any], allow_changes: bool) -> list[str]:
    """Compare the checkpoint's objective with this run's; refuse a difference unless `allow_changes`. Returns the
    differences (empty for the same objective, or a checkpoint without a record)."""
    path = os.path.join(checkpoint, OBJECTIVE_NAME)
    if not os.path.isfile(path):
        return []  # written before objectives were recorded: nothing to compare
    try:
        with open(path, encoding="utf-8") as handle:
            stored = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read ({error}): resume from another checkpoint") from error
    found = changes(stored, record)
    if found and not allow_changes:
        raise ValueError(
            f"{checkpoint} was written with another objective, and resuming would mix two in one run:\n  "
            + "\n  ".join(found)
            + "\nResume with the settings it was written with, train from the start, or, to change the objective on "
            "purpose, set resume_with_changed_objective=True (the projectors and optimizer state that still fit are "
            "loaded, the rest starts afresh)"
        )
    if found:
        logger.warning("Resuming from %s with a changed objective: %s", checkpoint, "; ".join(found))
    return found


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load the entries of `state` whose names and shapes match `module`'s; name the rest in the log."""
    own = module.state_dict()
    kept = {key: value for key, value in state.items() if key in own and own[key].shape == value.shape}
    module.load_state_dict(kept, strict=False)
    left = sorted(set(own) - set(kept))
    dropped = sorted(set(state) - set(kept))
    if left or dropped:
        logger.warning(
            "%s: loaded %d tensors from the checkpoint; starting afresh: %s; not used from the checkpoint: %s",
            what, len(kept), ", ".join(left) or "none", ", ".join(dropped) or "none",
        )  # fmt: skip

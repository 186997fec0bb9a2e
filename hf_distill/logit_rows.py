"""The vocabulary projection of a language model, run only at the positions its losses read.

A masked LM scores every position against the whole vocabulary, although its loss reads only the masked
positions (15% of them in BERT's recipe), and so do the built-in distillation losses on its logits. For a
BERT-base-sized student that projection is about a third of a training step's arithmetic, and its
`[batch, length, vocab]` logits (with their gradient) are the largest tensors of the step.

`project_rows(model, rows)` makes the model's output embeddings (`get_output_embeddings()`, the vocabulary
projection) see only the hidden states at `rows` for the duration of a block, through a forward pre-hook
removed on exit. The logits then come out as `[rows.sum(), vocab]`, in the row-major order of `rows`, which
is the order in which the losses, and a teacher-output cache, take the counted positions. The values are the
same rows the full projection would give; nothing else in the model changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .model_kind import describe
from .positions import label_positions


def label_rows(labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rows, targets)`: the `[batch, length]` positions whose prediction has a label, and those labels in order.

    For a causal LM (`shift`), position i predicts token i+1, so it counts when label i+1 is not -100 and the
    last position never does.
    """
    rows = label_positions(labels, shift)
    # A causal LM's target at position i is label i + 1 (its last position never counts).
    return rows, labels[..., 1:][rows[..., :-1]] if shift else labels[rows]


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's vocabulary projection (`get_output_embeddings()`), or None when it has none."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if isinstance(head, nn.Module) else None


@contextmanager
def project_rows(model: nn.Module, rows: torch.Tensor | None) -> Iterator[None]:
    """Within the block, `model`'s vocabulary projection runs only at the `[batch, length]` positions `rows`.

    With `rows=None` nothing changes. The model must not also compute its own loss from `labels` inside the
    block: that loss expects logits at every position.
    """
    head = None if rows is None else output_head(model)
    if head is None:
        yield
        return

    def select(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        if tuple(hidden.shape[:-1]) != tuple(rows.shape):
            raise RuntimeError(
                f"{type(model).__name__}'s vocabulary projection received hidden states of shape "
                f"{tuple(hidden.shape)}, not [batch, length, width] matching the label positions {tuple(rows.shape)}; "
                "set compact_token_logits=False in the DistillationConfig for this model"
            )
        return (hidden[rows.to(hidden.device)], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def supports_rows(model: nn.Module) -> bool:
    """Whether `project_rows` works on `model`: a two-position forward gives the logits of the one row selected.

    Some models apply their output embeddings' weight without calling the module, or reshape the logits
    afterwards; those keep their full projection. The probe is one tiny forward without gradients.
    """
    if output_head(model) is None:
        return False
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    input_ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    rows = torch.tensor([[True, False]], device=device)
    training = model.training
    model.eval()  # no dropout: the probe leaves the random state alone
    try:
        with torch.no_grad(), project_rows(model, rows):
            logits = model(input_ids=input_ids).logits
    except Exception:  # noqa: BLE001 - any failure means: keep the full projection
        return False
    finally:
        model.train(training)
    return logits.dim() == 2 and logits.shape[0] == 1


@dataclass(frozen=True)
class LogitRowsPlan:
    """Which models of a run project onto the vocabulary only at the positions the losses read, in training.

    Attributes:
        student, teacher: that model's projection runs at the labeled positions only (`project_rows`).
        shift: the student is a causal LM: position i predicts label i + 1.
        student_logits_read, teacher_logits_read: some configured loss reads that model's logits; a model whose
            logits nothing reads projects no position at all.
    """

    student: bool = False
    teacher: bool = False
    shift: bool = False
    student_logits_read: bool = True
    teacher_logits_read: bool = True

    def compacts(self, model: str) -> bool:
        """Whether `model` ("student" or "teacher") projects fewer positions than all in training."""
        return getattr(self, model)

    def reads(self, model: str) -> bool:
        """Whether a configured loss reads the logits of `model` ("student" or "teacher")."""
        return getattr(self, f"{model}_logits_read")


def compaction_applies(student: nn.Module, losses: list[Any], enabled: bool = True) -> bool:
    """Whether a run's logits may be projected at the read positions only: a masked or causal LM student (not an
    encoder-decoder, which builds its decoder inputs from the labels) whose every loss accepts row logits."""
    return (
        enabled
        and describe(student).language_model
        and not getattr(student.config, "is_encoder_decoder", False)
        # Only losses that accept row logits say truthfully whether they read logits (see DistillationLoss).
        and all(loss.accepts_row_logits for loss in losses)
    )


def logit_rows_plan(student: nn.Module, teacher: Any, losses: list[Any], enabled: bool = True) -> LogitRowsPlan:
    """Which models project only the positions whose logits are read, in training, and whether any of `losses`
    (already set up) reads each model's logits at all: the `logit_rows` of a `DistillationTrainer`."""
    kind = describe(student)
    use = compaction_applies(student, losses, enabled)
    return LogitRowsPlan(
        student=use and supports_rows(student),
        teacher=use and isinstance(teacher, nn.Module) and supports_rows(teacher),
        shift=kind.causal_lm,
        student_logits_read=any("logits" in loss.student_outputs for loss in losses),
        teacher_logits_read=any("logits" in loss.teacher_outputs for loss in losses if loss.needs_teacher),
    )

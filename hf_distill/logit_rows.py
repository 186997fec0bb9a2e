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

`project_rows(model, rows, defer=True)` goes one step further for a projection that is a plain `nn.Linear`:
the projection does not run at all; the model's `logits` become a [`ProjectedRows`], the hidden states of those
rows with the projection's weight and bias, and the token-level losses project them chunk by chunk as they go
([`hf_distill.losses.projected_rows_loss`]), so no `[rows, vocab]` tensor (or its gradient) exists in the step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
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


@dataclass
class ProjectedRows:
    """A language model's logits at its counted positions, not yet projected: `hidden @ weight.T + bias` would be
    the `[rows, vocab]` logits, in the row-major order of the positions (see `project_rows(..., defer=True)`).

    Attributes:
        hidden (`torch.Tensor`): `[rows, width]`, the hidden states the vocabulary projection receives.
        weight (`torch.Tensor`): `[vocab, width]`, the projection's weight (tied to the input embeddings in many
            models); bias (`torch.Tensor`, *optional*): `[vocab]`.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        """The shape the logits would have: `[rows, vocab]`."""
        return torch.Size((self.hidden.shape[0], self.weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def dim(self) -> int:
        return 2

    def logits_into(self, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The logits of rows `start..start + len(out) - 1` written into `out` (not differentiable): a buffer
        reused across groups of rows instead of a new `[rows, vocab]` tensor each time."""
        hidden = self.hidden[start : start + out.shape[0]].to(self.weight.dtype)
        if self.bias is None:
            return torch.mm(hidden, self.weight.t(), out=out)
        return torch.addmm(self.bias, hidden, self.weight.t(), out=out)

    def logits(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The logits of rows `start..end-1` (all by default), computed now in the projection's dtype (the hidden
        states may arrive cast to float32 by mixed precision); differentiable."""
        return nn.functional.linear(self.hidden[start:end].to(self.weight.dtype), self.weight, self.bias)


@dataclass
class _Projection:
    """What `project_rows` yields: with `defer`, `wrap` turns the model's outputs' logits into `ProjectedRows`."""

    head: nn.Module | None = None
    defer: bool = False
    produced: list[torch.Tensor] = field(default_factory=list)

    def wrap(self, outputs: Any, strict: bool = False) -> Any:
        """`outputs` with `logits` replaced by the `ProjectedRows` the deferred projection stood for.

        `supports_deferred` has checked (`strict`) on the model itself that it returns the projection's output
        unchanged: the very tensor or its exact cast to another dtype (accelerate's mixed precision returns float32
        outputs). In training the check is structural, one tensor of that shape, since a wrapper may also pass it
        on as a copy (DDP clones outputs through an autograd function); the copy is what carries its gradient.
        """
        if not self.defer:
            return outputs
        logits = getattr(outputs, "logits", None)
        produced = self.produced[0] if len(self.produced) == 1 else None
        same = (
            produced is not None
            and isinstance(logits, torch.Tensor)
            and logits.is_floating_point()
            and logits.shape == produced.shape
        )
        if same and strict and logits.data_ptr() != produced.data_ptr():
            same = torch.equal(logits, produced.to(logits.dtype))
        if not same:
            raise RuntimeError(
                "the model did not return its vocabulary projection's output unchanged as `logits` (it transforms or "
                "recomputes them), so the projection cannot be deferred to the losses: set fused_token_logits=False "
                "in the DistillationConfig"
            )
        outputs["logits"] = ProjectedRows(logits, self.head.weight, self.head.bias)
        return outputs


def deferrable_head(model: nn.Module) -> nn.Module | None:
    """The model's vocabulary projection when it is a plain `nn.Linear` (its forward not overridden), which
    `project_rows(..., defer=True)` can leave to the losses; else None."""
    head = output_head(model)
    if head is None or not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return None
    return head


@contextmanager
def project_rows(model: nn.Module, rows: torch.Tensor | None, defer: bool = False) -> Iterator[_Projection]:
    """Within the block, `model`'s vocabulary projection runs only at the `[batch, length]` positions `rows`.

    With `rows=None` nothing changes. The model must not also compute its own loss from `labels` inside the
    block: that loss expects logits at every position. With `defer` (a projection that `deferrable_head`
    accepts), the projection does not run: it returns the hidden states of the rows, and the yielded object's
    `wrap(outputs)` makes the model's logits a `ProjectedRows`.
    """
    head = None if rows is None else (deferrable_head(model) if defer else output_head(model))
    if head is None:
        if rows is not None and defer:
            raise RuntimeError(
                f"{type(model).__name__}'s vocabulary projection is not a plain nn.Linear, so it cannot be deferred: "
                "call project_rows without defer (check deferrable_head(model) first)"
            )
        yield _Projection()
        return
    projection = _Projection(head, defer)

    def select(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        if tuple(hidden.shape[:-1]) != tuple(rows.shape):
            raise RuntimeError(
                f"{type(model).__name__}'s vocabulary projection received hidden states of shape "
                f"{tuple(hidden.shape)}, not [batch, length, width] matching the label positions {tuple(rows.shape)}; "
                "set compact_token_logits=False in the DistillationConfig for this model"
            )
        return (hidden[rows.to(hidden.device)], *args[1:])

    def deferred(hidden: torch.Tensor) -> torch.Tensor:
        projection.produced.append(hidden)
        return hidden

    handle = head.register_forward_pre_hook(select)
    if defer:
        head.forward = deferred  # the instance attribute shadows nn.Linear.forward; hooks still run around it
    try:
        yield projection
    finally:
        handle.remove()
        if defer:
            del head.forward


def _probe(model: nn.Module, defer: bool) -> Any:
    """The logits `model` returns for two positions of which `project_rows` keeps the first (`defer`: wrapped
    strictly); None if anything fails. In evaluation mode and without gradients, so no random state is drawn."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    # Not the padding token: transformers warns about padding fed without an attention mask.
    token = 1 if getattr(getattr(model, "config", None), "pad_token_id", None) == 0 else 0
    input_ids = torch.full((1, 2), token, dtype=torch.long, device=device)
    rows = torch.tensor([[True, False]], device=device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), project_rows(model, rows, defer) as projection:
            outputs = model(input_ids=input_ids)
        return projection.wrap(outputs, strict=True).logits
    except Exception:  # noqa: BLE001 - any failure means: keep the model's own projection
        return None
    finally:
        model.train(training)


def supports_rows(model: nn.Module) -> bool:
    """Whether `project_rows` works on `model`: a two-position forward gives the logits of the one row selected.

    Some models apply their output embeddings' weight without calling the module, or reshape the logits
    afterwards; those keep their full projection. The probe is one tiny forward without gradients.
    """
    if output_head(model) is None:
        return False
    logits = _probe(model, defer=False)
    return isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] == 1


def supports_deferred(model: nn.Module) -> bool:
    """Whether `project_rows(..., defer=True)` works on `model`: its projection is a plain `nn.Linear` and a
    two-position forward returns that projection's output unchanged as its logits (no scaling or capping; an exact
    cast to another dtype is accepted). One tiny forward without gradients."""
    if deferrable_head(model) is None:
        return False
    projected = _probe(model, defer=True)
    return isinstance(projected, ProjectedRows) and projected.hidden.shape[0] == 1


@dataclass(frozen=True)
class LogitRowsPlan:
    """Which models of a run project onto the vocabulary only at the positions the losses read, in training.

    Attributes:
        student, teacher: that model's projection runs at the labeled positions only (`project_rows`).
        shift: the student is a causal LM: position i predicts label i + 1.
        student_logits_read, teacher_logits_read: some configured loss reads that model's logits; a model whose
            logits nothing reads projects no position at all.
        student_deferred, teacher_deferred: that model's projection is left to the losses (`ProjectedRows`).
    """

    student: bool = False
    teacher: bool = False
    shift: bool = False
    student_logits_read: bool = True
    teacher_logits_read: bool = True
    student_deferred: bool = False
    teacher_deferred: bool = False

    def compacts(self, model: str) -> bool:
        """Whether `model` ("student" or "teacher") projects fewer positions than all in training."""
        return getattr(self, model)

    def reads(self, model: str) -> bool:
        """Whether a configured loss reads the logits of `model` ("student" or "teacher")."""
        return getattr(self, f"{model}_logits_read")

    def defers(self, model: str) -> bool:
        """Whether `model`'s logits in training are `ProjectedRows` (projected by the losses)."""
        return getattr(self, model) and getattr(self, f"{model}_logits_read") and getattr(self, f"{model}_deferred")


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


def deferral_applies(losses: list[Any], side: str, enabled: bool = True) -> bool:
    """Whether every one of `losses` that reads the logits of `side` ("student" or "teacher") takes them as
    `ProjectedRows` (the built-in `soft_target` and `hard_label` do)."""
    reading = [
        loss
        for loss in losses
        if "logits" in getattr(loss, f"{side}_outputs") and (side == "student" or loss.needs_teacher)
    ]
    return enabled and bool(reading) and all(loss.accepts_projected_logits for loss in reading)


def logit_rows_plan(
    student: nn.Module, teacher: Any, losses: list[Any], enabled: bool = True, defer: bool = False
) -> LogitRowsPlan:
    """Which models project only the positions whose logits are read, in training, whether any of `losses`
    (already set up) reads each model's logits at all, and (`defer`) whose projection the losses run: the
    `logit_rows` of a `DistillationTrainer`."""
    kind = describe(student)
    use = compaction_applies(student, losses, enabled)
    student_rows = use and supports_rows(student)
    plan = LogitRowsPlan(
        student=student_rows,
        shift=kind.causal_lm,
        student_logits_read=any("logits" in loss.student_outputs for loss in losses),
        student_deferred=student_rows and deferral_applies(losses, "student", defer) and supports_deferred(student),
    )
    return with_teacher(plan, teacher, losses, use, defer)


def with_teacher(plan: LogitRowsPlan, teacher: Any, losses: list[Any], rows: bool, defer: bool) -> LogitRowsPlan:
    """`plan` with the fields of `teacher` as `losses` (those that read it) read it: its projection at the rows
    when `rows` allows and its probe passes, and left to the losses when `defer` allows too."""
    rows = rows and isinstance(teacher, nn.Module) and supports_rows(teacher)
    return replace(
        plan,
        teacher=rows,
        teacher_logits_read=any("logits" in loss.teacher_outputs for loss in losses if loss.needs_teacher),
        teacher_deferred=rows and deferral_applies(losses, "teacher", defer) and supports_deferred(teacher),
    )


def plan_training_rows(
    student: nn.Module,
    terms: Any,
    sources: list[Any],
    compact: bool,
    defer: bool,
    defer_teachers: bool,
) -> LogitRowsPlan:
    """Where each model of a `DistillationTrainer` run projects onto the vocabulary in training: the student's plan,
    returned (with the first teacher's fields), and each frozen teacher's own, given to its source (`rows_plan`),
    from the losses of `terms` that read it. `defer` lets the losses run the projections; `defer_teachers` extends
    that to the teachers (not when `teacher_forward` is overridden), and so to a teacher-cache build, which projects
    the rows chunk by chunk as it stores them. A teacher that learns computes its task loss from its labels: logits
    everywhere."""
    losses = list(terms.losses.values())
    plan = logit_rows_plan(student, None, losses, compact, defer)  # the student probed once
    applies = compaction_applies(student, losses, compact)
    for source in sources:
        source.rows_plan = with_teacher(
            plan,
            source.reference,
            terms.reading(source.name),
            rows=applies and not source.trainable,
            defer=defer and defer_teachers,
        )
    return sources[0].rows_plan if sources else plan

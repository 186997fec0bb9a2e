"""`sampled_token`: on-policy distillation from the teacher's log-probability of each sampled token alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..logit_rows import ProjectedRows, label_rows
from ..model_kind import describe
from .base import DistillationLoss, register_loss
from .chunked import chunked_rows_loss, rows_per_chunk, target_rows
from .gradients import sampled_token_value_and_grad
from .logits import check_same_outputs
from .row_terms import RowChunk, RowTerm, shared_rows_loss, teacher_log_probs


def sampled_token_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """Summed over rows: with q the student's and p the teacher's probability of each row's token y,
    a = log p(y) - log q(y) taken as a constant, the value sum(log q(y) - log p(y)) (the one-sample estimate of
    KL(q || p) on tokens the student sampled) with the gradient of -sum(a * log q(y))."""
    student = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        teacher = torch.log_softmax(teacher_logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        advantage = teacher.to(student.device) - student.detach()
    surrogate = -(advantage * student)
    return (surrogate - surrogate.detach() - advantage).sum()


@register_loss("sampled_token")
class SampledTokenLoss(DistillationLoss):
    """Sampled-token on-policy distillation for causal LMs: each completion token y_t the student generated is
    scored by the teacher's log-probability log p(y_t) alone, the advantage a_t = log p(y_t) − log q(y_t) (no
    gradient), and the loss −Σ a_t · log q(y_t): a policy-gradient step on the reverse KL along the sampled
    tokens, the estimator of TRL's server and IW-OPD modes, which needs no teacher distribution over the vocabulary
    (a served teacher returns one log-probability per token). Its logged value is Σ (log q(y_t) − log p(y_t)), the
    one-sample estimate of KL(q ‖ p), with the gradient above.

    Meant for the student's own samples (`DistillationConfig.lmbda` = 1, [`hf_distill.rollouts`]); on the dataset's
    or the teacher's completions it weighs tokens the student did not sample. One item per completion token
    (label ≠ -100). Logits arrive as full `[batch, length, vocab]`, as the `[rows, vocab]` of the labeled positions
    or unprojected ([`~hf_distill.logit_rows.ProjectedRows`]), `chunk_size` rows at a time as for `soft_target`.

    Options:
        chunk_size (`int`, *optional*): rows per chunk (default: as many as fit 16 MiB of float32 logits).
    """

    student_outputs = teacher_outputs = frozenset({"logits"})
    needs_labels = True
    accepts_row_logits = True
    accepts_projected_logits = True

    def __init__(self, chunk_size: int | None = None):
        super().__init__()
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"sampled_token chunk_size must be an integer >= 1 (or unset), got {chunk_size!r}")
        self.chunk_size = chunk_size

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if not describe(student).causal_lm:
            raise ValueError(
                f"sampled_token scores the tokens a causal LM generated, but the student is a "
                f"{type(student).__name__}: use soft_target for other models"
            )
        check_same_outputs(student, teacher)

    def count_items(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                "sampled_token scores the completion tokens (labels not -100), but the batch has no labels: label "
                "the completions, with -100 on the prompts"
            )
        return label_rows(labels, shift=True)[0].sum().float()

    def forward(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        term = self.row_term(student_outputs, teacher_outputs, inputs)
        if term is not None:
            return shared_rows_loss(student_outputs.logits, [term], chunk_size=term.chunk_size)[0]
        rows, tokens = label_rows(inputs["labels"], shift=True)
        student, teacher = student_outputs.logits, self._teacher_rows(teacher_outputs, rows)

        def row_loss(student_rows: torch.Tensor, start: int, end: int) -> torch.Tensor:
            targets = target_rows(teacher, start, end)
            return sampled_token_loss(student_rows, targets, tokens[start:end].to(student_rows.device))

        mask = rows.to(student.device) if student.dim() == 3 else None
        return chunked_rows_loss(student, mask, row_loss, rows_per_chunk(student.shape[-1], self.chunk_size))

    def row_term(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> RowTerm | None:
        student = student_outputs.logits
        if not isinstance(student, ProjectedRows):
            return None
        rows, tokens = label_rows(inputs["labels"], shift=True)
        teacher, tokens = self._teacher_rows(teacher_outputs, rows), tokens.to(student.device)

        def value_and_grad(chunk: RowChunk) -> tuple[torch.Tensor, torch.Tensor]:
            chosen = tokens[chunk.start : chunk.end]
            teacher_chosen = teacher_log_probs(chunk, teacher, 1.0).gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
            return sampled_token_value_and_grad(chunk.log_probs(), teacher_chosen, chosen, chunk.probs())

        return RowTerm(value_and_grad, rows_per_chunk(student.shape[-1], self.chunk_size))

    @staticmethod
    def _teacher_rows(teacher_outputs: Any, rows: torch.Tensor) -> Any:
        teacher = teacher_outputs.logits
        if not isinstance(teacher, ProjectedRows) and teacher.dim() == 3:
            teacher = teacher[rows.to(teacher.device)]
        return teacher

"""One loop over the chunks of a language model's rows, shared by every term that reads the student's logits.

A step of `soft_target` plus `hard_label` on a causal LM used to run two loops over the same rows: each projected
every chunk of hidden states onto the vocabulary (for GPT-2's 50,257 tokens a 154 MB weight read per chunk), took its
loss, and differentiated it through autograd. `shared_rows_loss` projects each chunk once, lets every taking-part term
compute its value and its gradient with respect to the chunk's logits there (in closed form for the built-in
divergences, cross-entropy and the sampled-token loss: [`hf_distill.losses.gradients`]), adds the gradients with the
weights the trainer gives the terms, and turns the sum into the gradients of the hidden rows, of the projection's
weight and of its bias, all in the forward pass. The backward pass only scales them.

A term takes part by returning a [`RowTerm`] from `DistillationLoss.row_term(student_outputs, teacher_outputs,
inputs)` (the built-in `soft_target`, `hard_label` and `sampled_token` do, when the student's logits arrive as
[`~hf_distill.logit_rows.ProjectedRows`]). A loss of your own can do the same: `RowTerm.from_row_loss` wraps a
per-chunk loss of the logits and differentiates it with autograd, or give `RowTerm` a function that returns the value
and the gradient itself.

The gradients are accumulated with the coefficients the terms get in the total loss (weight / item count). If the
backward pass then finds another combination (an overriding `compute_distillation_loss` that reweights the terms), the
loop runs again in backward with the coefficients that arrived, so the gradients are exact either way.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..logit_rows import ProjectedRows


class RowChunk:
    """Rows `start..end-1` of the student's logits (float32, no gradient), with what several terms read of them
    computed once: the log-softmax at each temperature (`log_probs`) and anything else a term `shares`."""

    def __init__(
        self,
        logits: torch.Tensor,
        start: int,
        end: int,
        wants_grad: bool = True,
        group: tuple[int, int, dict[Hashable, Any]] | None = None,
    ):
        self.logits, self.start, self.end = logits, start, end
        #: False when the loop only sums (no gradient required): a term may then return None for its gradient.
        self.wants_grad = wants_grad
        self._shared: dict[Hashable, Any] = {}
        #: The rows `group_start..group_end-1` projected together, of which this chunk is a part, and what the
        #: chunks of that group share (`group_shared`).
        self.group_start, self.group_end, self._group = group if group is not None else (start, end, {})

    def log_probs(self, temperature: float = 1.0) -> torch.Tensor:
        """log_softmax(logits / T) over the vocabulary; do not modify it in place (other terms read it)."""
        return self.shared(("log_probs", float(temperature)), lambda: self._log_softmax(temperature))

    def probs(self, temperature: float = 1.0) -> torch.Tensor:
        """softmax(logits / T), the exponential of `log_probs`; do not modify it in place."""
        return self.shared(("probs", float(temperature)), lambda: self.log_probs(temperature).exp())

    def _log_softmax(self, temperature: float) -> torch.Tensor:
        logits = self.logits if temperature == 1.0 else self.logits / temperature
        return torch.log_softmax(logits, dim=-1)

    def shared(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """`compute()` once per chunk for all terms that ask with the same `key` (a teacher's log-probabilities...)."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    def group_shared(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """`compute()` once per group of chunks (rows `group_start..group_end-1`), for what is cheaper computed for
        many rows at once (a teacher's projection: one matrix product for the group)."""
        if key not in self._group:
            self._group[key] = compute()
        return self._group[key]


#: `value_and_grad(chunk) -> (value, gradient)`: the term's loss summed over the chunk's rows (a float32 scalar) and
#: its gradient with respect to `chunk.logits` (`[rows, vocab]`, float32; it may be written to in place after), or
#: None when `chunk.wants_grad` is False.
ValueAndGrad = Callable[[RowChunk], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RowTerm:
    """A term's part in the shared row loop: its value and gradient on one chunk of the student's logits.

    Attributes:
        value_and_grad (`ValueAndGrad`): see above.
        chunk_size (`int`, *optional*): the most rows this term wants per chunk (the loop takes the smallest).
    """

    value_and_grad: ValueAndGrad
    chunk_size: int | None = None

    @classmethod
    def from_row_loss(
        cls, row_loss: Callable[[torch.Tensor, int, int], torch.Tensor], chunk_size: int | None = None
    ) -> RowTerm:
        """A term from `row_loss(logits, start, end)`, the summed loss of a chunk's logits (the form
        `projected_rows_loss` takes), differentiated with autograd."""

        def value_and_grad(chunk: RowChunk) -> tuple[torch.Tensor, torch.Tensor | None]:
            if not chunk.wants_grad:
                with torch.no_grad():
                    return row_loss(chunk.logits, chunk.start, chunk.end).float(), None
            with torch.enable_grad():
                logits = chunk.logits.detach().requires_grad_(True)
                value = row_loss(logits, chunk.start, chunk.end).float()
                (grad,) = torch.autograd.grad(value, logits)
            return value.detach(), grad.float()

        return cls(value_and_grad, chunk_size)


#: The most elements of the `[rows, vocab]` logits projected in one matrix product (a group of chunks, 128 MiB in
#: float32). On 2 CPU cores, a CE loop over 1,016 rows x 50,257 words took 3.23 s in chunks of 83 rows, 2.85 s of
#: 254 and 2.54 s of 508, against 2.82 s for autograd over the whole logits: each product (and each accumulation
#: into the vocabulary-sized weight gradient) streams the weight once, so fewer, larger products are faster. The
#: terms still run chunk by chunk inside a group, so their temporaries stay chunk-sized.
GROUP_ELEMENTS = 2**25


def group_rows(rows: int, chunk_size: int, vocab: int, elements: int | None = None) -> int:
    """How many rows are projected at once: at most `elements` logits (`GROUP_ELEMENTS` by default; never fewer
    than `chunk_size` rows), in groups of even size."""
    limit = max(chunk_size, (elements or GROUP_ELEMENTS) // max(vocab, 1))
    groups = max(1, -(-rows // limit))
    return max(1, -(-rows // groups))


def _run_chunks(hidden, weight, bias, terms, coefficients, chunk_size, grads_wanted):
    """The loop itself: each term's total (`[terms]`, float32) and, for `grads_wanted` (hidden, weight, bias), the
    gradients of Σ coefficients[t] · total[t].

    Rows are projected a group at a time (`group_rows`) into one buffer; the terms take each chunk of the group;
    the chunk's combined gradient overwrites its logits in the buffer, and the group's gradients of the hidden rows,
    the weight and the bias are each one matrix product.
    """
    rows = hidden.shape[0]
    totals = torch.zeros(len(terms), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grads_wanted[0] else None
    # The weight's gradient is the first group's product (not zeros to add it to: a vocabulary-sized fill saved).
    grad_weight = None
    grad_bias = torch.zeros_like(bias) if bias is not None and grads_wanted[2] else None
    differentiate = any(grads_wanted)
    size = group_rows(rows, chunk_size, weight.shape[0])
    buffer = None  # one `[size, vocab]` buffer, reused by every group
    for group_start in range(0, rows, size):
        group_end = min(group_start + size, rows)
        group_hidden = hidden[group_start:group_end].to(weight.dtype)
        if buffer is None:
            buffer = torch.empty(size, weight.shape[0], dtype=weight.dtype, device=weight.device)
        logits = ProjectedRows(group_hidden, weight, bias).logits_into(buffer[: group_end - group_start])
        group = (group_start, group_end, {})
        for start in range(group_start, group_end, chunk_size):
            end = min(start + chunk_size, group_end)
            rows_logits = logits[start - group_start : end - group_start]
            chunk = RowChunk(rows_logits.float(), start, end, differentiate, group)
            combined = None
            for index, term in enumerate(terms):
                value, grad = term.value_and_grad(chunk)
                totals[index] += value.detach().float()
                if not differentiate or coefficients[index] == 0:
                    continue
                if combined is None:
                    combined = grad.mul_(coefficients[index]) if coefficients[index] != 1 else grad
                else:
                    combined.add_(grad, alpha=coefficients[index])
            del chunk
            if not differentiate:
                continue
            if combined is None:
                rows_logits.zero_()
            elif combined.data_ptr() != rows_logits.data_ptr():
                rows_logits.copy_(combined)  # the chunk's logits are read no more: their rows now hold its gradient
        del group
        if not differentiate:
            continue
        gradient = logits  # the group's combined gradient with respect to its logits, in the weight's dtype
        if grad_hidden is not None:
            if gradient.dtype == hidden.dtype:  # written in place: no group-sized temporary
                torch.mm(gradient, weight, out=grad_hidden[group_start:group_end])
            else:
                grad_hidden[group_start:group_end] = (gradient @ weight).to(hidden.dtype)
        if grads_wanted[1]:
            if grad_weight is None:
                grad_weight = gradient.t() @ group_hidden
            else:  # accumulated in place: no vocabulary-sized temporary per group
                grad_weight.addmm_(gradient.t(), group_hidden)
        if grad_bias is not None:
            grad_bias += gradient.sum(0).to(bias.dtype)
    if grads_wanted[1] and grad_weight is None:  # no rows
        grad_weight = torch.zeros_like(weight)
    return totals, grad_hidden, grad_weight, grad_bias


class _SharedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, terms, coefficients, chunk_size):
        wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        totals, *grads = _run_chunks(hidden, weight, bias, terms, coefficients, chunk_size, wanted)
        ctx.save_for_backward(*(grad if grad is not None else torch.empty(0) for grad in grads), hidden, weight)
        ctx.bias = bias
        ctx.present, ctx.terms, ctx.coefficients, ctx.chunk_size = wanted, terms, coefficients, chunk_size
        return totals

    @staticmethod
    def backward(ctx, grad_totals):
        *grads, hidden, weight = ctx.saved_tensors
        scale = _common_scale(grad_totals, ctx.coefficients)
        if scale is None:
            # The terms were combined otherwise than planned: the loop again, with the coefficients that arrived.
            _, *grads = _run_chunks(
                hidden, weight, ctx.bias, ctx.terms, grad_totals.tolist(), ctx.chunk_size, ctx.present
            )
            scale = 1.0
        out = [
            None if not present else (grad if abs(scale - 1.0) <= 1e-6 else grad * scale)
            for grad, present in zip(grads, ctx.present, strict=True)
        ]
        return (*out, None, None, None)


def _common_scale(grad_totals: torch.Tensor, coefficients: Sequence[float]) -> float | None:
    """s with grad_totals = s · coefficients (to float32 rounding), or None when they are not proportional. An s
    within 1e-6 of 1 (the trainer's own combination, rounded in float32) is taken as 1: the gradients are used as
    they are, without a vocabulary-sized copy."""
    planned = torch.tensor(coefficients, dtype=torch.float64)
    arrived = grad_totals.detach().double().cpu()
    norm = float(planned.dot(planned))
    if norm == 0:
        return None if bool(arrived.any()) else 0.0
    scale = float(arrived.dot(planned)) / norm
    if torch.allclose(arrived, planned * scale, rtol=1e-6, atol=1e-12 * abs(scale)):
        return scale
    return None


def shared_rows_loss(
    projected: ProjectedRows,
    terms: Sequence[RowTerm],
    coefficients: Sequence[float] | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Each term's loss summed over the rows of `projected` (`[len(terms)]`, float32), in one loop over chunks of
    `chunk_size` rows that projects each chunk once.

    `coefficients` (default all 1) are what the caller will multiply each total by in its loss: the gradients are
    accumulated with them in the forward pass. Any other combination is still exact (see the module's docstring).
    Without gradients required, only the values are computed.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    terms = list(terms)
    coefficients = [1.0] * len(terms) if coefficients is None else [float(value) for value in coefficients]
    if len(coefficients) != len(terms):
        raise ValueError(f"{len(terms)} terms but {len(coefficients)} coefficients")
    hidden, weight, bias = projected.hidden, projected.weight, projected.bias
    wants_grad = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (hidden, weight, bias)
    )
    if not wants_grad:
        with torch.no_grad():
            totals, *_ = _run_chunks(hidden, weight, bias, terms, coefficients, chunk_size, (False, False, False))
        return totals
    return _SharedRows.apply(hidden, weight, bias, terms, coefficients, chunk_size)


def teacher_log_probs(chunk: RowChunk, teacher: torch.Tensor | ProjectedRows, temperature: float) -> torch.Tensor:
    """log_softmax(teacher logits / T) of the chunk's rows (float32, on the student's device), from the teacher's
    `[rows, vocab]` logits or its unprojected rows (projected here, without gradients); computed once per chunk for
    every term that reads the same teacher at the same temperature."""

    def compute() -> torch.Tensor:
        if isinstance(teacher, ProjectedRows):
            group = chunk.group_shared(("teacher_logits", id(teacher)), partial(_projected, teacher, chunk))
            logits = group[chunk.start - chunk.group_start : chunk.end - chunk.group_start]
        else:
            logits = teacher[chunk.start : chunk.end].detach()
        logits = logits.to(chunk.logits.device).float()
        return torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)

    return chunk.shared(("teacher_log_probs", id(teacher), float(temperature)), compute)


def _projected(teacher: ProjectedRows, chunk: RowChunk) -> torch.Tensor:
    """The teacher's logits of the chunk's whole group, in one product without gradients."""
    with torch.no_grad():
        return teacher.logits(chunk.group_start, chunk.group_end)


def teacher_probs(chunk: RowChunk, teacher: torch.Tensor | ProjectedRows, temperature: float) -> torch.Tensor:
    """The exponential of `teacher_log_probs`, shared the same way."""
    key = ("teacher_probs", id(teacher), float(temperature))
    return chunk.shared(key, lambda: teacher_log_probs(chunk, teacher, temperature).exp())

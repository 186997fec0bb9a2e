"""Token-level soft targets in chunks of positions, so large vocabularies do not multiply peak memory.

A plain `soft_target_loss` on `[tokens, vocab]` logits keeps several full-vocabulary float32 tensors alive
for the backward pass (both log-softmaxes, the teacher's probabilities, their product): at 30,522 tokens of
vocabulary and 16k positions, each is 2 GB. `chunked_soft_target_loss` computes the same sum chunk by chunk
under `no_grad` and, in backward, recomputes each chunk's gradient with the very same function, so the only
full-vocabulary tensor it adds is the gradient of the student's logits, which backward needs anyway.

`chunked_rows_loss` is the general form: any per-row loss of the student's logits against teacher targets
held elsewhere (a teacher-output cache's top-k rows, for instance).

`projected_rows_loss` takes the student's logits before the vocabulary projection (`ProjectedRows`, see
[`hf_distill.logit_rows`]) and projects each chunk itself: not even the student's `[rows, vocab]` logits or their
gradient exist. Each chunk's gradient is taken as the chunk is computed, so the projection runs once forward and
once backward, as in the model, with nothing recomputed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from ..logit_rows import ProjectedRows
from .functional import Divergence, check_same_logits, soft_target_loss

#: The float32 logits one chunk may hold by default (`rows_per_chunk`): 16 MiB. Kept under the C allocator's
#: largest mmap threshold (32 MiB in glibc), a chunk's temporaries are reused from the heap, not mapped afresh.
CHUNK_ELEMENTS = 2**22


def rows_per_chunk(vocab: int, chunk_size: int | None = None) -> int:
    """`chunk_size`, or by default as many rows of a `vocab`-wide vocabulary as fit `CHUNK_ELEMENTS` (16 to 1024)."""
    if chunk_size is not None:
        return chunk_size
    return max(16, min(1024, CHUNK_ELEMENTS // max(vocab, 1)))


#: `row_loss(student_rows, start, end)`: the summed loss of the student rows at `positions[start:end]`.
RowLoss = Callable[[torch.Tensor, int, int], torch.Tensor]


class _ChunkedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_rows, positions, row_loss, chunk_size):
        total = torch.zeros((), dtype=torch.float32, device=student_rows.device)
        with torch.no_grad():
            for start in range(0, positions.numel(), chunk_size):
                chunk = positions[start : start + chunk_size]
                total += row_loss(student_rows.index_select(0, chunk), start, start + chunk.numel())
        ctx.save_for_backward(student_rows, positions)
        ctx.row_loss, ctx.chunk_size = row_loss, chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_output):
        student_rows, positions = ctx.saved_tensors
        grad = torch.zeros_like(student_rows)
        for start in range(0, positions.numel(), ctx.chunk_size):
            chunk = positions[start : start + ctx.chunk_size]
            with torch.enable_grad():
                student_chunk = student_rows.index_select(0, chunk).detach().requires_grad_(True)
                loss = ctx.row_loss(student_chunk, start, start + chunk.numel())
                (chunk_grad,) = torch.autograd.grad(loss, student_chunk)
            grad.index_copy_(0, chunk, (chunk_grad * grad_output).to(grad.dtype))
        return grad, None, None, None


def chunked_rows_loss(
    student_logits: torch.Tensor, mask: torch.Tensor | None, row_loss: RowLoss, chunk_size: int = 256
) -> torch.Tensor:
    """Sum `row_loss` over the positions `mask` selects (all when None), `chunk_size` positions at a time.

    `student_logits` is `[..., vocab]` and `mask` `[...]`; positions are taken in row-major order, and
    `row_loss(rows, start, end)` receives the student's logits at positions `start..end-1` of that order (so
    targets stored in the same order are sliced `[start:end]`). Gradients are recomputed chunk by chunk; a
    selection of at most `chunk_size` positions is one chunk, computed once with ordinary autograd.
    """
    # reshape is a view for the contiguous logits models return, so no full-vocabulary copy is made here.
    student_rows = student_logits.reshape(-1, student_logits.shape[-1])
    return _rows_loss(
        student_rows, None if mask is None else selected_positions(student_rows, mask), row_loss, chunk_size
    )


def _rows_loss(
    student_rows: torch.Tensor, positions: torch.Tensor | None, row_loss: RowLoss, chunk_size: int
) -> torch.Tensor:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    count = student_rows.shape[0] if positions is None else positions.numel()
    if count <= chunk_size:
        # One chunk: plain autograd holds no more than a chunk's intermediates and skips the recomputation.
        rows = student_rows if positions is None else student_rows.index_select(0, positions)
        return row_loss(rows, 0, count).float()
    if positions is None:
        positions = torch.arange(count, device=student_rows.device)
    return _ChunkedRows.apply(student_rows, positions, row_loss, chunk_size)


def selected_positions(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of `[positions, vocab]` that `mask` selects, in row-major order."""
    return mask.reshape(-1).nonzero().squeeze(1).to(rows.device)


def chunked_soft_target_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    divergence: str | Divergence = "forward_kl",
    mask: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """The sum over positions of `soft_target_loss`, computed `chunk_size` positions at a time.

    Same value and gradient as `soft_target_loss(..., mask=mask, reduction="sum")` (Hinton et al., 2015), with
    peak memory of one extra full-vocabulary tensor. `student_logits` and `teacher_logits` are `[..., vocab]`;
    `mask` (`[...]`, bool) picks the positions that count. The teacher's logits get no gradient.
    """
    # Checked before the reshape below, which would otherwise cut mismatched logits into wrong rows.
    check_same_logits(student_logits, teacher_logits)
    teacher_rows = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    positions = None if mask is None else selected_positions(teacher_rows, mask)

    def row_loss(student_chunk: torch.Tensor, start: int, end: int) -> torch.Tensor:
        teacher_chunk = teacher_rows[start:end] if positions is None else teacher_rows[positions[start:end]]
        return soft_target_loss(student_chunk, teacher_chunk, temperature, divergence, reduction="sum")

    student_rows = student_logits.reshape(-1, student_logits.shape[-1])
    return _rows_loss(student_rows, positions, row_loss, chunk_size)


class _ProjectedRowsLoss(torch.autograd.Function):
    """The summed `row_loss` of `F.linear(hidden, weight, bias)`, chunk by chunk; the gradients of hidden, weight and
    bias are accumulated as each chunk is computed (forward), and backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, row_loss, chunk_size):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        needs = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = torch.zeros_like(weight) if needs[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and needs[2] else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            rows = hidden[start:end]
            with torch.enable_grad():
                logits = F.linear(rows.to(weight.dtype), weight, bias).detach().requires_grad_(True)
                loss = row_loss(logits, start, end)
                (grad_logits,) = torch.autograd.grad(loss, logits)
            total += loss.detach().float()
            grad_logits = grad_logits.to(logits.dtype)
            same = grad_logits.dtype == weight.dtype == hidden.dtype
            if grad_hidden is not None:
                if same:  # written in place: no chunk-sized temporary
                    torch.mm(grad_logits, weight, out=grad_hidden[start:end])
                else:
                    grad_hidden[start:end] = (grad_logits @ weight.to(grad_logits.dtype)).to(hidden.dtype)
            if grad_weight is not None:
                if same:  # accumulated in place: no vocabulary-sized temporary per chunk
                    grad_weight.addmm_(grad_logits.t(), rows)
                else:
                    grad_weight += (grad_logits.t() @ rows.to(grad_logits.dtype)).to(weight.dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0).to(bias.dtype)
        ctx.save_for_backward(
            *(tensor if tensor is not None else torch.empty(0) for tensor in (grad_hidden, grad_weight, grad_bias))
        )
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = [
            grad * grad_output.to(grad.dtype) if present else None
            for grad, present in zip(ctx.saved_tensors, ctx.present, strict=True)
        ]
        return (*grads, None, None)


def projected_rows_loss(projected: ProjectedRows, row_loss: RowLoss, chunk_size: int = 256) -> torch.Tensor:
    """Sum `row_loss(logits, start, end)` over the rows of `projected`, `chunk_size` rows at a time, each chunk's
    logits computed from the hidden states and the vocabulary projection as it is needed.

    Same value and gradients (for the hidden states, the projection's weight and bias) as `row_loss` summed over
    `projected.logits()`, without holding more than one chunk of logits. The gradients are computed in the forward
    pass; without gradients required nothing extra is done.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden, weight, bias = projected.hidden, projected.weight, projected.bias
    wants_grad = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (hidden, weight, bias)
    )
    if not wants_grad:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            total += row_loss(F.linear(hidden[start:end].to(weight.dtype), weight, bias), start, end).float()
        return total
    return _ProjectedRowsLoss.apply(hidden, weight, bias, row_loss, chunk_size)


def target_rows(logits: torch.Tensor | ProjectedRows, start: int, end: int) -> torch.Tensor:
    """Rows `start..end-1` of a teacher's `[rows, vocab]` logits, projected (without gradients) when they arrive
    unprojected: a chunk's targets for a `row_loss`."""
    if isinstance(logits, ProjectedRows):
        with torch.no_grad():
            return logits.logits(start, end)
    return logits[start:end]

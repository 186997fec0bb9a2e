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

from ..logit_rows import ProjectedRows
from .functional import Divergence, check_same_logits, soft_target_loss
from .row_terms import RowTerm, shared_rows_loss

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


def projected_rows_loss(projected: ProjectedRows, row_loss: RowLoss, chunk_size: int = 256) -> torch.Tensor:
    """Sum `row_loss(logits, start, end)` over the rows of `projected`, `chunk_size` rows at a time, each chunk's
    logits computed from the hidden states and the vocabulary projection as it is needed.

    Same value and gradients (for the hidden states, the projection's weight and bias) as `row_loss` summed over
    `projected.logits()`, without holding more than one chunk of logits: the shared row loop
    ([`hf_distill.losses.row_terms`]) with this one term, differentiated by autograd chunk by chunk in the forward
    pass. Without gradients required nothing extra is done.
    """
    return shared_rows_loss(projected, [RowTerm.from_row_loss(row_loss)], chunk_size=chunk_size)[0]


def target_rows(logits: torch.Tensor | ProjectedRows, start: int, end: int) -> torch.Tensor:
    """Rows `start..end-1` of a teacher's `[rows, vocab]` logits, projected (without gradients) when they arrive
    unprojected: a chunk's targets for a `row_loss`."""
    if isinstance(logits, ProjectedRows):
        with torch.no_grad():
            return logits.logits(start, end)
    return logits[start:end]

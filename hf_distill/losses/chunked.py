"""Token-level soft targets in chunks of positions, so large vocabularies do not multiply peak memory.

A plain `soft_target_loss` on `[tokens, vocab]` logits keeps several full-vocabulary float32 tensors alive
for the backward pass (both log-softmaxes, the teacher's probabilities, their product): at 30,522 tokens of
vocabulary and 16k positions, each is 2 GB. `chunked_soft_target_loss` computes the same sum chunk by chunk
under `no_grad` and, in backward, recomputes each chunk's gradient with the very same function, so the only
full-vocabulary tensor it adds is the gradient of the student's logits, which backward needs anyway.
"""

from __future__ import annotations

import torch

from .functional import check_same_logits, soft_target_loss


class _ChunkedSoftTarget(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_rows, teacher_rows, positions, temperature, divergence, chunk_size):
        total = torch.zeros((), dtype=torch.float32, device=student_rows.device)
        with torch.no_grad():
            for start in range(0, positions.numel(), chunk_size):
                chunk = positions[start : start + chunk_size]
                total += soft_target_loss(
                    student_rows.index_select(0, chunk),
                    teacher_rows.index_select(0, chunk),
                    temperature=temperature,
                    divergence=divergence,
                    reduction="sum",
                )
        ctx.save_for_backward(student_rows, teacher_rows, positions)
        ctx.settings = (temperature, divergence, chunk_size)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        student_rows, teacher_rows, positions = ctx.saved_tensors
        temperature, divergence, chunk_size = ctx.settings
        grad = torch.zeros_like(student_rows)
        for start in range(0, positions.numel(), chunk_size):
            chunk = positions[start : start + chunk_size]
            with torch.enable_grad():
                student_chunk = student_rows.index_select(0, chunk).detach().requires_grad_(True)
                loss = soft_target_loss(
                    student_chunk,
                    teacher_rows.index_select(0, chunk),
                    temperature=temperature,
                    divergence=divergence,
                    reduction="sum",
                )
                (chunk_grad,) = torch.autograd.grad(loss, student_chunk)
            grad.index_copy_(0, chunk, (chunk_grad * grad_output).to(grad.dtype))
        return grad, None, None, None, None, None


def chunked_soft_target_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
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
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = student_logits.shape[-1]
    # reshape is a view for the contiguous logits models return, so no full-vocabulary copy is made here.
    student_rows, teacher_rows = student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)
    if mask is None:
        positions = torch.arange(student_rows.shape[0], device=student_rows.device)
    else:
        positions = mask.reshape(-1).nonzero().squeeze(1).to(student_rows.device)
    return _ChunkedSoftTarget.apply(student_rows, teacher_rows, positions, float(temperature), divergence, chunk_size)

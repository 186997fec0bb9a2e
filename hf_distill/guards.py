"""Non-finite values never train silently, and a NaN student is never written to disk.

During training the trainer hands every teacher output, loss term and the total loss of each micro-batch to a
`NonFiniteGuard`, which keeps on the device whether each stayed finite. Before the optimizer applies a step, the
guard adds the gradients and reads the flags back in one host sync (and, across processes, one all-reduce): a
NaN or an infinity stops training with a `FloatingPointError` that names what went non-finite, the step and what
to try. The step is not applied, so the student's weights stay finite.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .logit_rows import ProjectedRows

#: What to try, by what went non-finite first (the teacher's outputs explain the terms computed from them).
_CAUSES = {
    "teacher": (
        "the teacher itself produced them, before any loss: a teacher run in float16 overflows past 65,504 (run it "
        "in float32 or bfloat16: load it with torch_dtype=torch.float32, or train with bf16 instead of fp16), or the "
        "teacher's weights are broken (check its outputs on this batch alone)"
    ),
    "term": (
        "a loss term overflowed: a temperature far from 1 (soft_target divides the logits by T and multiplies the "
        "loss by T squared; try 1 to 8), a loss weight too large, or a student already diverged (lower "
        "learning_rate, keep max_grad_norm > 0)"
    ),
    "gradients": (
        "the gradients overflowed: lower learning_rate, keep max_grad_norm > 0 so that gradients are clipped, add "
        "warm-up steps, or train in bf16 rather than fp16"
    ),
}


class NonFiniteGuard:
    """Whether each watched value of the current optimizer step is finite, kept on the device until `check`."""

    def __init__(self) -> None:
        self._finite: dict[str, torch.Tensor] = {}

    def watch(self, name: str, value: torch.Tensor | Sequence[torch.Tensor] | None) -> None:
        """Record whether `value` (a tensor, or a tuple of them such as hidden states) is finite; no host sync."""
        if isinstance(value, ProjectedRows):  # logits left to the losses: finite hidden states, finite logits
            value = value.hidden
        if isinstance(value, torch.Tensor):
            tensors = [value]
        elif isinstance(value, Sequence):
            tensors = [t for t in value if isinstance(t, torch.Tensor)]
        else:  # not model outputs (a cross-tokenizer teacher's alignment): nothing to watch
            tensors = []
        tensors = [tensor for tensor in tensors if tensor.numel() and tensor.is_floating_point()]
        if not tensors:
            return
        finite = torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all()
        previous = self._finite.get(name)
        self._finite[name] = finite if previous is None else previous & finite

    def watch_teacher(self, outputs: Any, name: str | None = None) -> None:
        """Record a teacher's outputs of one batch (`name`: which, when there are several): every tensor (or tuple
        of tensors) it returned."""
        whose = "the teacher's" if name is None else f"teacher {name!r}'s"
        for key, value in outputs.items():
            self.watch(f"{whose} {key}", value)

    def check(
        self,
        step: int,
        named_parameters: Iterable[tuple[str, nn.Parameter]] | None,
        num_processes: int = 1,
    ) -> None:
        """Raise `FloatingPointError` if anything watched since the last check, or a gradient, is not finite.

        Args:
            step (`int`): the optimizer step about to be applied (for the message).
            named_parameters: the trained parameters whose gradients to check; None skips them (a gradient scaler,
                as with fp16, skips steps with infinite gradients by design).
            num_processes (`int`): processes that must agree: one process's NaN stops every process.
        """
        watched, self._finite = self._finite, {}
        names = list(watched)
        flags = list(watched.values())
        parameters = [] if named_parameters is None else [(n, p) for n, p in named_parameters if p.grad is not None]
        if parameters:
            names.append("gradients")
            norms = torch._foreach_norm([parameter.grad for _, parameter in parameters])
            flags.append(torch.isfinite(torch.stack(norms)).all())
        if not flags:
            return
        device = flags[0].device
        finite = torch.stack([flag.to(device) for flag in flags]).float()
        if num_processes > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if all(finite.tolist()):  # the one host sync of the step
            return
        bad = [name for name, ok in zip(names, finite.tolist(), strict=True) if not ok]
        raise FloatingPointError(_message(step, bad, parameters))


def _some(names: list[str], shown: int = 5) -> str:
    """The first few names of a list, and how many more there are."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _is_teacher(name: str) -> bool:
    """Whether a watched name is a teacher's output ("the teacher's logits", "teacher 'b''s logits")."""
    return name.startswith(("the teacher's", "teacher '"))


def _message(step: int, bad: list[str], parameters: list[tuple[str, nn.Parameter]]) -> str:
    teacher = [name for name in bad if _is_teacher(name)]
    what = ", ".join(f"'{name}'" if not _is_teacher(name) and name != "gradients" else name for name in bad)
    if "gradients" in bad:
        broken = [name for name, parameter in parameters if not torch.isfinite(parameter.grad).all()]
        what = what.replace("gradients", f"the gradients of {_some(broken)}")
    if teacher:
        cause = _CAUSES["teacher"]
    elif bad != ["gradients"]:
        cause = _CAUSES["term"]
    else:
        cause = _CAUSES["gradients"]
    return (
        f"training stopped at optimizer step {step}: NaN or infinite values in {what} (across the micro-batches of "
        f"this step). The step was not applied, so the student's weights are unchanged and finite. Likely cause: "
        f"{cause}."
    )


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A quantized weight (a torchao tensor subclass) as the floating-point values it stands for; a sharded one
    (FSDP's `DTensor`) as this process's shard."""
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor if type(tensor) in (torch.Tensor, nn.Parameter) else tensor.dequantize()


def check_finite_weights(model: nn.Module, where: str) -> None:
    """Refuse to write a model whose weights are not all finite (a student trained into NaN is no model)."""
    state = {name: tensor for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    broken = [name for name, tensor in state.items() if not torch.isfinite(_plain(tensor)).all()]
    sharded = [tensor for tensor in state.values() if hasattr(tensor, "to_local")]
    if sharded and torch.distributed.is_initialized():  # FSDP: each process checks its shards, and all must agree
        finite = torch.tensor([0.0 if broken else 1.0], device=sharded[0].device)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not broken and not bool(finite.item()):
            broken = ["(shards held by another process)"]
    if broken:
        raise FloatingPointError(
            f"not saving the model to {where}: its weights {_some(broken)} hold NaN or infinite values. Training diverged "
            "before this save: lower learning_rate, keep max_grad_norm > 0, or train in bf16 rather than fp16, then "
            "train again from the last good checkpoint"
        )

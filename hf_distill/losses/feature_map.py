"""`feature_map`: feature distillation across architectures, e.g. a ViT teacher into a CNN (MobileNetV2) student."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .base import DistillationLoss, ModuleOutputs, register_loss
from .functional import feature_map_loss


def probe_input(model: nn.Module, term: str) -> torch.Tensor:
    """A blank image batch of the size the model's config expects, to read feature shapes before training."""
    config = model.config
    image_size = getattr(config, "image_size", None)
    if not isinstance(image_size, int):
        raise ValueError(
            f"losses[{term!r}] needs `config.image_size` on {type(model).__name__} to measure its feature maps"
        )
    parameter = next(model.parameters())
    return torch.zeros(
        1, getattr(config, "num_channels", 3), image_size, image_size, device=parameter.device, dtype=parameter.dtype
    )


@torch.no_grad()
def _probe(model: nn.Module, **kwargs: Any) -> Any:
    """Run a model once in eval mode (no batch-norm statistics touched) and restore its mode."""
    was_training = model.training
    model.eval()
    try:
        return model(pixel_values=probe_input(model, kwargs.pop("term")), **kwargs)
    finally:
        model.train(was_training)


def teacher_grid(hidden: torch.Tensor, pixel_values: torch.Tensor, patch_size: int | None) -> torch.Tensor:
    """A teacher's hidden state as a `[batch, channels, height, width]` map.

    Convolutional maps pass through. Vision-transformer tokens `[batch, prefix + h·w, width]` lose their
    prefix tokens (CLS, distillation) and are laid out on the h × w patch grid of the input.
    """
    if hidden.dim() == 4:
        return hidden
    if patch_size is None:
        raise ValueError("the teacher's hidden states are tokens but its config has no patch_size to lay them out")
    height, width = pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size
    prefix = hidden.shape[1] - height * width
    if prefix < 0:
        raise ValueError(f"{hidden.shape[1]} teacher tokens do not cover a {height}×{width} patch grid")
    patches = hidden[:, prefix:, :]
    return patches.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[-1], height, width)


@register_loss("feature_map")
class FeatureMapLoss(DistillationLoss):
    """Match an inner student feature map to a teacher hidden state on a common grid (FitNets, Romero et al., 2015).

    Options:
        student_module (`str`): path of the student submodule whose output is matched, as in
            `model.get_submodule(path)`, e.g. `"mobilenet_v2.layer.12"`. Captured with a forward hook.
        teacher_layer (`int`, defaults to -1): index into the teacher's `hidden_states`; ViT tokens are laid
            out on their patch grid.

    The student map goes through a learnable 1×1 convolution to the teacher's width (trained with the
    student, saved in checkpoints, left out of the saved student); both maps are average-pooled to the
    smaller grid and compared by mean squared error. One item per example. Not cacheable: `setup` probes
    the teacher model itself.
    """

    teacher_outputs = frozenset({"hidden_states"})
    cacheable = False
    accepts_row_logits = True  # reads no logits

    def __init__(self, student_module: str | None = None, teacher_layer: int = -1):
        super().__init__()
        if not isinstance(student_module, str) or not student_module:
            raise ValueError(
                "feature_map needs 'student_module', the path of a student submodule such as "
                "'mobilenet_v2.layer.12' (print(model) lists them)"
            )
        if not isinstance(teacher_layer, int) or isinstance(teacher_layer, bool):
            raise ValueError(f"feature_map teacher_layer must be an integer, got {teacher_layer!r}")
        self.student_module, self.teacher_layer = student_module, teacher_layer
        self.projector: nn.Module = nn.Identity()
        self.patch_size: int | None = None
        self.captured = ModuleOutputs()

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        try:
            module = student.get_submodule(self.student_module)
        except AttributeError:
            candidates = [name for name, _ in student.named_modules() if name.count(".") <= 2 and name][:20]
            raise ValueError(
                f"losses[{self.term!r}]: the student has no submodule {self.student_module!r}; some that exist: "
                f"{', '.join(candidates)}"
            ) from None
        self.captured.watch("student", module)
        _probe(student, term=self.term)
        student_channels = self.captured.get("student").shape[1]
        self.captured.clear()

        self.patch_size = getattr(teacher.config, "patch_size", None)
        teacher_hidden = _probe(teacher, term=self.term, output_hidden_states=True).hidden_states
        if not -len(teacher_hidden) <= self.teacher_layer < len(teacher_hidden):
            raise ValueError(
                f"losses[{self.term!r}]: teacher_layer {self.teacher_layer} is out of range; the teacher returns "
                f"{len(teacher_hidden)} hidden states (0..{len(teacher_hidden) - 1}, or negative from the end)"
            )
        layer_output = teacher_hidden[self.teacher_layer]
        teacher_channels = layer_output.shape[1] if layer_output.dim() == 4 else layer_output.shape[-1]
        self.projector = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        student_map = self.projector(self.captured.get("student"))
        self.captured.clear()
        teacher_map = teacher_grid(
            teacher_outputs.hidden_states[self.teacher_layer], inputs["pixel_values"], self.patch_size
        )
        return feature_map_loss(student_map, teacher_map, reduction="sum")

"""`deep_to_shallow`: self-distillation, the student's own last layer teaching its shallower layers (Be Your Own
Teacher, Zhang et al., ICCV 2019), through auxiliary heads that exist for training only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..model_kind import describe
from .base import DistillationLoss, register_loss
from .feature_map import probe_input
from .functional import deep_to_shallow_loss


def pooled(hidden: torch.Tensor) -> torch.Tensor:
    """One feature vector per example from a hidden state: the first token of a `[batch, tokens, width]` sequence
    (BERT's [CLS], ViT's class token), the spatial mean of a `[batch, channels, height, width]` map."""
    if hidden.dim() == 4:
        return hidden.mean(dim=(-2, -1))
    if hidden.dim() == 3:
        return hidden[:, 0]
    raise ValueError(
        f"deep_to_shallow cannot pool a hidden state of shape {tuple(hidden.shape)}: it needs [batch, tokens, width] "
        "or [batch, channels, height, width] hidden states (a transformer or CNN classifier); drop the term"
    )


@torch.no_grad()
def _probe_hidden_states(model: nn.Module, term: str) -> tuple[torch.Tensor, ...]:
    """The model's hidden states on a tiny input (eval mode, then its mode restored): their number and widths."""
    was_training = model.training
    model.eval()
    try:
        if getattr(model.config, "image_size", None) is not None and hasattr(model.config, "num_channels"):
            outputs = model(pixel_values=probe_input(model, term), output_hidden_states=True)
        else:
            device = next(model.parameters()).device
            outputs = model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), output_hidden_states=True)
    finally:
        model.train(was_training)
    return outputs.hidden_states


@register_loss("deep_to_shallow")
class DeepToShallowLoss(DistillationLoss):
    """The student's deepest classifier teaches classifiers on its shallower layers (self-distillation; no teacher).

    Options:
        layers (`list[int]`): indices into the student's `hidden_states` (0 is the embeddings, -1 the last block)
            that get an exit: an auxiliary classifier on their pooled feature ([`pooled`]).
        temperature (`float`, defaults to 3.0): T of the KL term.
        alpha (`float`, defaults to 0.5): the share of the KL term against the exit's own cross-entropy.
        feature_weight (`float`, defaults to 0.03): λ, the weight of the squared distance from each exit's feature
            (projected to the last layer's width when they differ) to the last layer's.

    Each exit `i` adds `(1 − α) · CE(q_i, y) + α · T² · KL(q_C^T ‖ q_i^T) + λ · ‖F_i − F_C‖²`, with `q_C` the
    student's own logits and `F_C` its last hidden state's pooled feature, both detached
    ([`~hf_distill.losses.functional.deep_to_shallow_loss`]); the student's task loss on `q_C` is `hard_label`'s.
    The exits and projectors train with the student, are checkpointed with the losses' state and are never part of
    the saved student. One item per example; sequence and image classifiers only.
    """

    student_outputs = frozenset({"logits", "hidden_states"})
    needs_teacher = False
    needs_labels = True
    accepts_row_logits = True  # classifiers only: their logits are never compacted

    def __init__(
        self,
        layers: list[int] | None = None,
        temperature: float = 3.0,
        alpha: float = 0.5,
        feature_weight: float = 0.03,
    ):
        super().__init__()
        if (
            not isinstance(layers, (list, tuple))
            or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        ):
            raise ValueError(
                "deep_to_shallow needs 'layers', a non-empty list of the student's hidden-state indices that get an "
                "exit, e.g. [2, 4] (0 is the embeddings)"
            )
        for name, value, low in (("temperature", temperature, 0.0), ("feature_weight", feature_weight, 0.0)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or value < low
                or (name == "temperature" and value == 0)
            ):
                raise ValueError(
                    f"deep_to_shallow {name} must be a number {'> 0' if name == 'temperature' else '>= 0'}"
                )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"deep_to_shallow alpha must lie in [0, 1], got {alpha!r}")
        self.layers = list(layers)
        self.temperature, self.alpha, self.feature_weight = float(temperature), float(alpha), float(feature_weight)
        self.exits = nn.ModuleList()
        self.projectors = nn.ModuleList()

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        kind = describe(student)
        if not kind.classifier:
            raise ValueError(
                f"deep_to_shallow supports sequence and image classifiers, not a {type(student).__name__}: drop it "
                "or distil from a teacher"
            )
        hidden = _probe_hidden_states(student, self.term)
        count = len(hidden)
        resolved = []
        for index in self.layers:
            absolute = index + count if index < 0 else index
            if not 0 <= absolute < count - 1:
                raise ValueError(
                    f"losses[{self.term!r}] gives an exit to hidden state {index}, but the student has hidden states "
                    f"0..{count - 1} and the last ({count - 1}) is the teacher: choose shallower ones"
                )
            resolved.append(absolute)
        self.layers = resolved
        final_width = pooled(hidden[-1]).shape[-1]
        num_labels = student.config.num_labels
        for index in resolved:
            width = pooled(hidden[index]).shape[-1]
            self.exits.append(nn.Linear(width, num_labels))
            self.projectors.append(nn.Identity() if width == final_width else nn.Linear(width, final_width))

    def forward(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        hidden = student_outputs.hidden_states
        final_features = pooled(hidden[-1])
        total = 0.0
        for index, exit_head, projector in zip(self.layers, self.exits, self.projectors, strict=True):
            features = pooled(hidden[index])
            total = total + deep_to_shallow_loss(
                exit_head(features),
                student_outputs.logits,
                projector(features),
                final_features,
                inputs["labels"],
                self.temperature,
                self.alpha,
                self.feature_weight,
            )
        return total

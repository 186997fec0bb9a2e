"""The loss library: one registry, each loss a pure tensor function (`functional`) plus a small module.

Importing this package registers the built-in losses: `soft_target`, `hard_label`, `hidden_state`,
`attention`, `relation`, `feature_map`, `deep_to_shallow` (self-distillation), `sampled_token`
(on-policy, from the teacher's log-probability of each sampled token), and `uld` and `gold` (a teacher with another
tokenizer).
"""

from . import functional
from .base import (
    CachedLogits,
    DistillationLoss,
    TeacherEnsemble,
    available_losses,
    build_losses,
    needs_attention_maps,
    output_flags,
    reads_teacher,
    register_loss,
)
from .chunked import chunked_soft_target_loss, projected_rows_loss, rows_per_chunk
from .cross_tokenizer import GOLDLoss, ULDLoss
from .feature_map import FeatureMapLoss
from .hidden import AttentionLoss, HiddenStateLoss, RelationLoss
from .logits import HardLabelLoss, SoftTargetLoss
from .sampled import SampledTokenLoss, sampled_token_loss
from .self_distillation import DeepToShallowLoss

__all__ = [
    "AttentionLoss",
    "CachedLogits",
    "DeepToShallowLoss",
    "DistillationLoss",
    "FeatureMapLoss",
    "GOLDLoss",
    "HardLabelLoss",
    "HiddenStateLoss",
    "RelationLoss",
    "SampledTokenLoss",
    "SoftTargetLoss",
    "TeacherEnsemble",
    "ULDLoss",
    "available_losses",
    "build_losses",
    "chunked_soft_target_loss",
    "rows_per_chunk",
    "sampled_token_loss",
    "projected_rows_loss",
    "functional",
    "needs_attention_maps",
    "output_flags",
    "reads_teacher",
    "register_loss",
]

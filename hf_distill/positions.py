"""Which positions of a language model's logits a token-level term counts: one rule for the losses, their item
counts, the vocabulary projection at those rows only (`logit_rows`) and the rows a teacher cache stores.

    label_positions(labels, shift)     # [batch, length]: the positions whose prediction has a label
    logit_positions(kind, inputs)      # the same, or, without labels, the real tokens; decoders by their labels

Position i of a causal LM predicts token i + 1, so there a position counts when the label one later is not -100
and the last position never counts; masking it, rather than slicing the logits, keeps them contiguous.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .losses.base import token_mask
from .model_kind import ModelKind
from .seq2seq import decoder_positions


def label_positions(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """The `[batch, length]` positions whose prediction has a label (label ≠ -100, one later for a causal LM)."""
    if shift:
        labels = nn.functional.pad(labels[..., 1:], (0, 1), value=-100)
    return labels.ne(-100)


def logit_positions(kind: ModelKind, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The `[batch, length]` positions whose logits a token-level term counts, for a model of `kind`.

    An encoder-decoder counts its decoder positions (labeled ones, else `decoder_attention_mask`, else all);
    other models the labeled positions, else the real tokens (`attention_mask`), else every position.
    """
    if kind.seq2seq:
        mask = decoder_positions(inputs)
        return torch.ones_like(inputs["decoder_input_ids"], dtype=torch.bool) if mask is None else mask
    labels = inputs.get("labels")
    if labels is not None:
        return label_positions(labels, kind.causal_lm)
    mask = token_mask(inputs)
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    if kind.causal_lm:  # the last position predicts nothing
        mask = nn.functional.pad(mask[..., 1:], (0, 1), value=False)
    return mask

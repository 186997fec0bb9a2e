"""Which positions a term counts: one module for the rules the losses, their item counts, the vocabulary
projection at those rows only (`logit_rows`) and the rows a teacher cache stores all follow.

    label_positions(labels, shift)     # [batch, length]: the positions whose prediction has a label
    logit_positions(kind, inputs)      # the same, or, without labels, the real tokens; decoders by their labels
    position_mask(inputs, stack)       # hidden states and attention: the real tokens (a decoder: its labeled ones)
    token_mask(inputs)                 # the real (non-padding) tokens of a text batch

Position i of a causal LM predicts token i + 1, so there a position counts when the label one later is not -100
and the last position never counts; masking it, rather than slicing the logits, keeps them contiguous.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

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


def token_mask(inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """The real (non-padding) positions of a text batch, or None when the batch has no attention mask."""
    mask = inputs.get("attention_mask")
    return None if mask is None else mask.bool()


def position_mask(inputs: Mapping[str, Any], stack: str | None = None) -> torch.Tensor | None:
    """The positions that count for a loss on hidden states: real tokens (`token_mask`), or for the decoder of an
    encoder-decoder model the labeled positions (`seq2seq.decoder_positions`); None when every position counts.

    An encoder that reads no tokens (Whisper's audio frames, an image encoder's patches) has every position
    count: a frame `attention_mask` there does not line up with the encoder's (downsampled) positions.
    """
    if stack == "decoder":
        return decoder_positions(inputs)
    if stack == "encoder" and inputs.get("input_ids") is None and inputs.get("inputs_embeds") is None:
        return None
    return token_mask(inputs)

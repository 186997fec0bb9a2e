"""Encoder-decoder students and teachers (BART, T5, Marian, Whisper...): what sets them apart for distillation.

An encoder-decoder language model predicts its labels from decoder inputs that are the labels shifted one
position right. The model builds them itself from `labels`, but a teacher is never given the labels, so the
trainer builds them once from the student (`decoder_input_ids_from_labels`) and both models see the same.
Position i of the decoder predicts label i: no further shift, unlike a causal LM.

Such a model has two stacks of layers, each with its own `*_hidden_states`; the losses on hidden states take a
`stack` option (`"encoder"` or `"decoder"`) and read the depth and width of that stack here. Encoder positions
count where `attention_mask` is 1, decoder positions where the label is not -100.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from .model_kind import describe

STACKS = ("encoder", "decoder")
# Depth of each stack across config families: BART, Marian, Whisper; T5.
_DEPTH_ATTRIBUTES = {"encoder": ("encoder_layers", "num_layers"), "decoder": ("decoder_layers", "num_decoder_layers")}


def decoder_start_token_id(model: nn.Module) -> int | None:
    """The token a model's decoder starts from: its config's, else its generation config's (None when neither)."""
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    return start


def decoder_input_ids_from_labels(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The decoder inputs `model` would build from `labels`: shifted right, the start token first, -100 as padding."""
    start, pad = decoder_start_token_id(model), getattr(model.config, "pad_token_id", None)
    if start is None or pad is None:
        raise ValueError(
            f"cannot build decoder inputs for {type(model).__name__} from the labels: its config has no "
            "decoder_start_token_id or pad_token_id; set them, or give the batches decoder_input_ids (e.g. "
            "DataCollatorForSeq2Seq(tokenizer, model=student))"
        )
    if getattr(model.config, "decoder_start_token_id", None) is not None:
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if callable(prepare):
            return prepare(labels=labels)  # the model's own rule, where it has one
    shifted = labels.new_full(labels.shape, start)
    shifted[..., 1:] = labels[..., :-1]
    return shifted.masked_fill(shifted == -100, pad)


def check_decoder_start(student: nn.Module) -> None:
    """An encoder-decoder student needs the start token from which the decoder inputs of both models are built."""
    if describe(student).seq2seq and decoder_start_token_id(student) is None:
        raise ValueError(
            f"the {type(student).__name__} student's config has no decoder_start_token_id, from which the decoder "
            "inputs of the student and the teacher are built: set it (T5: the pad token id, 0)"
        )


def with_decoder_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    """`inputs` with the `decoder_input_ids` that `model` builds from their labels, when they hold labels and no
    decoder inputs yet (a new mapping; the batch itself is left alone)."""
    if inputs.get("decoder_input_ids") is not None or inputs.get("labels") is None:
        return inputs
    return {**inputs, "decoder_input_ids": decoder_input_ids_from_labels(model, inputs["labels"])}


def decoder_positions(inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """The decoder positions that count: labeled ones (label ≠ -100), else `decoder_attention_mask`; None: all."""
    labels = inputs.get("labels")
    if labels is not None:
        return labels.ne(-100)
    mask = inputs.get("decoder_attention_mask")
    return None if mask is None else mask.bool()


def check_stack(term: str, stack: str | None, student: nn.Module, teacher: Any) -> None:
    """A loss on hidden states must name a stack for encoder-decoder models, and only for them."""
    seq2seq = [side for side, model in (("student", student), ("teacher", teacher)) if describe(model).seq2seq]
    if len(seq2seq) == 1:
        other = "teacher" if seq2seq[0] == "student" else "student"
        raise ValueError(
            f"losses[{term!r}]: the {seq2seq[0]} is an encoder-decoder model and the {other} is not, so their hidden "
            "states do not pair up; distil between two encoder-decoder models, or drop this loss"
        )
    if seq2seq and stack is None:
        raise ValueError(
            f"losses[{term!r}]: both models are encoder-decoder, with two stacks of layers: set 'stack': 'encoder' "
            "or 'decoder' (add a second term with the other stack to match both)"
        )
    if stack is not None and not seq2seq:
        raise ValueError(
            f"losses[{term!r}] sets 'stack': {stack!r}, which is for encoder-decoder models; drop it for a "
            f"{type(student).__name__} student"
        )


def stack_size(model: nn.Module, stack: str, attribute: str, term: str) -> int:
    """`num_hidden_layers` or `hidden_size` of one stack of an encoder-decoder model, from its config."""
    config = model.config
    sub_config = getattr(config, stack, None)  # EncoderDecoderConfig and kin keep one config per stack
    if isinstance(sub_config, PretrainedConfig):
        config, names = sub_config, (attribute,)
    elif attribute == "num_hidden_layers":
        names = _DEPTH_ATTRIBUTES[stack]
    else:
        names = (attribute,)
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(
        f"losses[{term!r}] cannot tell the {attribute} of the {stack} of {type(model).__name__}: its config has none "
        f"of {names}; set them in the config"
    )

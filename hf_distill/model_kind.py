"""What kind of model a model is, for distillation: read once from its class and config, then passed around.

    kind = describe(student)     # ModelKind(class_name="BertForMaskedLM", language_model=True, ...)
    kind.token_level             # one distribution per position: soft targets and items are per token

The losses, the logit-row plan, the teacher cache and the input checks ask this one description, instead of each
keeping tables of class names. A class's kind comes from the task mappings of transformers
(`MODEL_FOR_*_MAPPING_NAMES`), so every architecture registered there is known without a list of our own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.auto import modeling_auto

#: Extractive question answering's labels: the answer span's first and last position.
SPAN_LABELS = ("start_positions", "end_positions")


def _classes(*mappings: str) -> frozenset[str]:
    return frozenset(
        name
        for mapping in mappings
        for name in getattr(modeling_auto, f"MODEL_FOR_{mapping}_MAPPING_NAMES", {}).values()
    )


_CAUSAL_LM = _classes("CAUSAL_LM")
_MASKED_LM = _classes("MASKED_LM")
_TOKEN_CLASSIFICATION = _classes("TOKEN_CLASSIFICATION")
_QUESTION_ANSWERING = _classes("QUESTION_ANSWERING")
_CLASSIFICATION = _classes("SEQUENCE_CLASSIFICATION", "IMAGE_CLASSIFICATION", "AUDIO_CLASSIFICATION")
# Generation heads of encoder-decoders; these mappings also list decoder-only audio models, told apart by config.
_SEQ2SEQ = _classes("SEQ_TO_SEQ_CAUSAL_LM", "SPEECH_SEQ_2_SEQ") | {"VisionEncoderDecoderModel"}
# Heads whose logits are not one distribution per example or per position on the last axis (per-pixel class maps
# with the classes on axis 1, boxes, depth, CTC frames...): soft targets would silently mean nothing there.
_DENSE_PREDICTION = _classes(
    "SEMANTIC_SEGMENTATION", "UNIVERSAL_SEGMENTATION", "INSTANCE_SEGMENTATION", "IMAGE_SEGMENTATION",
    "OBJECT_DETECTION", "ZERO_SHOT_OBJECT_DETECTION", "DEPTH_ESTIMATION", "CTC", "AUDIO_FRAME_CLASSIFICATION",
    "MASKED_IMAGE_MODELING",
)  # fmt: skip


@dataclass(frozen=True)
class ModelKind:
    """What distillation needs to know of a model's outputs and of which positions count.

    Attributes:
        class_name: the model's class (for messages).
        seq2seq: an encoder-decoder language model: its decoder predicts `labels` position by position, from decoder
            inputs built from them ([`hf_distill.seq2seq`]).
        causal_lm: a decoder-only language model: position i predicts token i + 1 (labels line up one later).
        language_model: a masked or causal language model (logits over a vocabulary at every position).
        token_classifier: one class distribution per token.
        span: extractive question answering: `start_logits` and `end_logits` over the positions, no `logits`.
        classifier: one class distribution per example (text, image or audio classification).
        dense_prediction: outputs that are not class distributions on the last axis (segmentation, boxes, depth...).
    """

    class_name: str
    seq2seq: bool = False
    causal_lm: bool = False
    language_model: bool = False
    token_classifier: bool = False
    span: bool = False
    classifier: bool = False
    dense_prediction: bool = False

    @property
    def token_level(self) -> bool:
        """One distribution per position: soft targets, their items and a teacher cache's rows are per token."""
        return self.language_model or self.token_classifier or self.seq2seq

    @property
    def class_labels(self) -> bool:
        """Labels are class indices in `0..num_labels-1` (per example or per token)."""
        return self.classifier or self.token_classifier


def describe(model: Any) -> ModelKind:
    """The kind of `model`: a model, or a teacher known from its cache (an object with `config` and `class_name`)."""
    name = getattr(model, "class_name", None) or type(model).__name__
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    return ModelKind(
        class_name=name,
        seq2seq=name in _SEQ2SEQ and encoder_decoder,
        causal_lm=name in _CAUSAL_LM,
        language_model=name in _CAUSAL_LM or name in _MASKED_LM,
        token_classifier=name in _TOKEN_CLASSIFICATION,
        span=name in _QUESTION_ANSWERING,
        classifier=name in _CLASSIFICATION,
        dense_prediction=name in _DENSE_PREDICTION,
    )


def convolutional(model: Any) -> bool:
    """Whether most of `model`'s weights sit in 2-D convolutions (a MobileNet, a ResNet; not a ViT, whose only
    convolution embeds the patches): the models that `DistillationConfig.channels_last` converts by default."""
    import torch  # noqa: PLC0415 - model_kind is read by config checks that need no torch

    parameters = getattr(model, "parameters", None)
    if not callable(parameters):
        return False
    total = sum(parameter.numel() for parameter in model.parameters())
    convolution = sum(
        parameter.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Conv2d)
        for parameter in module.parameters(recurse=False)
    )
    return total > 0 and convolution * 2 >= total


def use_channels_last(models: list[Any], choice: bool | None) -> None:
    """Convolutional models (`choice` None: those with most weights in 2-D convolutions; True: any with one) in the
    channels-last memory format, the layout oneDNN and cuDNN convolve fastest. The weights keep their values;
    saved, they are written in the usual layout."""
    for model in models:
        if convolutional(model) or (choice and any(isinstance(module, nn.Conv2d) for module in model.modules())):
            model.to(memory_format=torch.channels_last)

"""Losses on intermediate representations: `hidden_state`, `attention` and `relation`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..alignment import ALIGNMENT_KEY
from ..model_kind import describe
from ..positions import logit_positions
from ..seq2seq import STACKS, check_stack
from .base import (
    DistillationLoss,
    ModuleOutputs,
    check_layer_map,
    config_value,
    count_positions,
    position_mask,
    register_loss,
    resolve_layer_map,
    sum_positions,
    token_mask,
)
from .functional import (
    ATTENTION_DISTANCES,
    HIDDEN_DISTANCES,
    attention_loss,
    distance_relation_loss,
    hidden_state_loss,
    relation_kl_loss,
    self_attention_relations,
    similarity_preserving_loss,
)

# Attention implementations that return their probability maps; sdpa and flash kernels return none.
_MAP_RETURNING_ATTENTION = ("eager",)
# Leaf names of the query/key/value projections across model families (BERT and ViT, most decoders, DistilBERT).
_PROJECTION_NAMES = {
    "query": ("query", "q_proj", "q_lin"),
    "key": ("key", "k_proj", "k_lin"),
    "value": ("value", "v_proj", "v_lin"),
}


def stack_states(outputs: Any, stack: str | None) -> Any:
    """The `hidden_states` of a model's output, or of one stack (`encoder_hidden_states`...) of an encoder-decoder."""
    return outputs.hidden_states if stack is None else getattr(outputs, f"{stack}_hidden_states")


def _check_choice(term_type: str, option: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{term_type} option {option} must be one of {choices}, got {value!r}")


@register_loss("hidden_state")
class HiddenStateLoss(DistillationLoss):
    """MSE or cosine distance between the hidden states of mapped layers (TinyBERT, Jiao et al., 2020).

    Options:
        distance (`str`, defaults to `"mse"`): `"mse"` or `"cosine"` (1 − cos, DistilBERT's loss).
        layer_map (`list[[int, int]]`, *optional*): `[student_layer, teacher_layer]` pairs, 0 being the
            embedding output and -1 the last layer. Defaults to an even spread: student layer i learns from
            teacher layer round(i × teacher depth / student depth). DistilBERT: `[[-1, -1]]`, cosine.
        projection (`bool`, defaults to True): when the widths differ, learn a linear map from each mapped
            student layer to the teacher's width. It trains with the student, is saved in checkpoints and
            left out of the saved student. With False, differing widths are an error.
        stack (`str`, *optional*): for encoder-decoder models (BART, T5...), which stack's hidden states to match,
            `"encoder"` or `"decoder"`; required for them, not allowed for other models. Layer numbers and the
            default map are then within that stack; add a second term for the other one.

    One item per real token (or per example for inputs without an attention mask; for a decoder stack, per
    labeled decoder position); averaged over layers.

    Beside `uld` or `gold`, with a teacher that has another tokenizer ([`hf_distill.alignment`]), positions are
    the aligned groups of the completion: each side's hidden states averaged over the group's tokens, one distance
    per group, the student's completion tokens as its items.
    """

    student_outputs = frozenset({"hidden_states"})
    teacher_outputs = frozenset({"hidden_states"})
    accepts_row_logits = True  # reads no logits
    #: Set by `align_groups`: the teacher has another tokenizer and positions are aligned groups.
    aligned = False

    def align_groups(self) -> None:
        """Compare the two models over the aligned groups of a teacher with another tokenizer (called by the
        trainer before `setup`)."""
        self.aligned = True

    def __init__(
        self, distance: str = "mse", layer_map: list | None = None, projection: bool = True, stack: str | None = None
    ):
        super().__init__()
        _check_choice("hidden_state", "distance", distance, HIDDEN_DISTANCES)
        if stack is not None:
            _check_choice("hidden_state", "stack", stack, STACKS)
        self.distance, self.stack = distance, stack
        self.layer_map = check_layer_map("hidden_state", layer_map)
        self.projection = projection
        self.pairs: list[tuple[int, int]] = []
        self.projectors = nn.ModuleList()

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        check_stack(self.term, self.stack, student, teacher)
        self.kind = describe(student)
        self.pairs = resolve_layer_map(self.term, self.layer_map, student, teacher, first_layer=0, stack=self.stack)
        student_width = config_value(student, "hidden_size", self.term, self.stack)
        teacher_width = config_value(teacher, "hidden_size", self.term, self.stack)
        if student_width != teacher_width:
            if not self.projection:
                raise ValueError(
                    f"losses[{self.term!r}]: the student is {student_width} wide and the teacher {teacher_width}; "
                    "set 'projection': true to learn a projection between them"
                )
            self.projectors = nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in self.pairs)

    def count_items(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        if self.aligned:  # the completion's tokens, as the cross-tokenizer terms count them
            return logit_positions(self.kind, inputs).sum().float()
        return count_positions(inputs, self.stack)

    def teacher_hidden_layers(self) -> list[int]:
        return sorted({teacher_layer for _, teacher_layer in self.pairs})

    def forward(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        student_states, teacher_states = (
            stack_states(student_outputs, self.stack),
            stack_states(teacher_outputs, self.stack),
        )
        alignment = teacher_outputs.get(ALIGNMENT_KEY) if self.aligned else None
        total = 0.0
        for index, (student_layer, teacher_layer) in enumerate(self.pairs):
            student_hidden, teacher_hidden = student_states[student_layer], teacher_states[teacher_layer]
            if len(self.projectors):
                student_hidden = self.projectors[index](student_hidden)
            if alignment is not None:  # another tokenizer: one distance per aligned group of tokens
                student_groups = alignment.group_means(student_hidden, "student")
                teacher_groups = alignment.group_means(teacher_hidden, "teacher")
                total = total + hidden_state_loss(student_groups, teacher_groups, self.distance, reduction="sum")
                continue
            per_position = hidden_state_loss(student_hidden, teacher_hidden, self.distance, reduction="none")
            total = total + sum_positions(per_position, inputs, self.stack)
        return total / len(self.pairs)


@register_loss("attention")
class AttentionLoss(DistillationLoss):
    """Distance between the self-attention of mapped layers (TinyBERT, Jiao et al., 2020; MiniLM, Wang et al., 2020).

    Options:
        heads (`str`, defaults to `"match"`): `"match"` compares head by head (head counts must agree);
            `"average"` compares the head-averaged maps; `"relations"` compares MiniLMv2 self-attention
            relations (query-query, key-key, value-value) split into `num_relation_heads`, so widths and head
            counts may differ and no attention maps are needed.
        distance (`str`, defaults to `"kl"`): `"kl"` or `"mse"` between maps; relations always use KL.
        layer_map (`list[[int, int]]`, *optional*): `[student_layer, teacher_layer]` pairs of transformer
            blocks numbered from 1 (-1 is the last). Defaults to an even spread.
        num_relation_heads (`int`, *optional*): relation heads for `heads="relations"`; defaults to the
            student's head count. Must divide both widths.

    Attention maps need `attn_implementation="eager"` on both models: the default sdpa kernel returns none.
    One item per real query token (or per example without an attention mask); averaged over layers. Not
    cacheable: relations are read from the teacher's projections by hooks, and maps are `layers x heads x
    length²` per example, too large to store.
    """

    cacheable = False
    accepts_row_logits = True  # reads no logits

    def __init__(
        self,
        heads: str = "match",
        distance: str = "kl",
        layer_map: list | None = None,
        num_relation_heads: int | None = None,
    ):
        super().__init__()
        _check_choice("attention", "heads", heads, ("match", "average", "relations"))
        _check_choice("attention", "distance", distance, ATTENTION_DISTANCES)
        if heads == "relations" and distance != "kl":
            raise ValueError("attention relations are compared with KL only; set 'distance': 'kl'")
        if num_relation_heads is not None and (not isinstance(num_relation_heads, int) or num_relation_heads < 1):
            raise ValueError(f"attention num_relation_heads must be a positive integer, got {num_relation_heads!r}")
        self.heads, self.distance, self.num_relation_heads = heads, distance, num_relation_heads
        self.layer_map = check_layer_map("attention", layer_map)
        self.pairs: list[tuple[int, int]] = []
        if heads != "relations":
            self.student_outputs = self.teacher_outputs = frozenset({"attentions"})
        self.captured = ModuleOutputs()

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if describe(student).seq2seq or describe(teacher).seq2seq:
            raise ValueError(
                f"losses[{self.term!r}]: attention distillation does not support encoder-decoder models yet (their "
                "self- and cross-attention of two stacks); use hidden_state with 'stack', or drop this loss"
            )
        self.pairs = resolve_layer_map(self.term, self.layer_map, student, teacher)
        if self.heads == "relations":
            self._setup_relations(student, teacher)
            return
        for side, model in (("student", student), ("teacher", teacher)):
            implementation = getattr(model.config, "_attn_implementation", None)
            if implementation not in _MAP_RETURNING_ATTENTION:
                raise ValueError(
                    f"losses[{self.term!r}] needs attention maps, but the {side} uses attn_implementation="
                    f"{implementation!r}, which returns none: load it with attn_implementation='eager' (or "
                    "call model.set_attn_implementation('eager')), or use 'heads': 'relations'"
                )
        student_heads = config_value(student, "num_attention_heads", self.term)
        teacher_heads = config_value(teacher, "num_attention_heads", self.term)
        if self.heads == "match" and student_heads != teacher_heads:
            raise ValueError(
                f"losses[{self.term!r}]: the student has {student_heads} attention heads and the teacher "
                f"{teacher_heads}; set 'heads': 'average' or 'heads': 'relations'"
            )

    def _setup_relations(self, student: nn.Module, teacher: nn.Module) -> None:
        if self.num_relation_heads is None:
            self.num_relation_heads = config_value(student, "num_attention_heads", self.term)
        for side, model in (("student", student), ("teacher", teacher)):
            width = config_value(model, "hidden_size", self.term)
            if width % self.num_relation_heads:
                raise ValueError(
                    f"losses[{self.term!r}]: num_relation_heads={self.num_relation_heads} does not divide the "
                    f"{side}'s width {width}; choose a common divisor of both widths"
                )
            layers = config_value(model, "num_hidden_layers", self.term)
            for kind, names in _PROJECTION_NAMES.items():
                projections = [
                    module
                    for name, module in model.named_modules()
                    if name.rsplit(".", 1)[-1] in names and isinstance(module, nn.Linear)
                ]
                if len(projections) != layers:
                    raise ValueError(
                        f"losses[{self.term!r}]: found {len(projections)} {kind} projections (named {names}) in the "
                        f"{side} but it has {layers} layers; attention relations need one per layer"
                    )
                used_layers = {pair[0] if side == "student" else pair[1] for pair in self.pairs}
                for layer in used_layers:
                    self.captured.watch((side, kind, layer), projections[layer - 1])

    def count_items(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        return count_positions(inputs)

    def forward(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        if self.heads == "relations":
            return self._relations_loss(inputs)
        student_maps, teacher_maps = student_outputs.attentions, teacher_outputs.attentions
        for side, maps in (("student", student_maps), ("teacher", teacher_maps)):
            if not maps:
                raise RuntimeError(
                    f"losses[{self.term!r}]: the {side} returned no attention maps; load it with "
                    "attn_implementation='eager'"
                )
        total = 0.0
        for student_layer, teacher_layer in self.pairs:
            student_map, teacher_map = student_maps[student_layer - 1], teacher_maps[teacher_layer - 1]
            if self.heads == "average":
                student_map, teacher_map = student_map.mean(1, keepdim=True), teacher_map.mean(1, keepdim=True)
            per_query = attention_loss(student_map, teacher_map, self.distance, reduction="none")
            total = total + sum_positions(per_query, inputs)
        return total / len(self.pairs)

    def _relations_loss(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        key_mask = token_mask(inputs)
        total = 0.0
        for student_layer, teacher_layer in self.pairs:
            for kind in _PROJECTION_NAMES:
                student_relations = self_attention_relations(
                    self.captured.get(("student", kind, student_layer)), self.num_relation_heads, key_mask
                )
                teacher_relations = self_attention_relations(
                    self.captured.get(("teacher", kind, teacher_layer)), self.num_relation_heads, key_mask
                )
                per_query = relation_kl_loss(student_relations, teacher_relations, reduction="none")
                total = total + sum_positions(per_query, inputs)
        self.captured.clear()
        return total / (len(self.pairs) * len(_PROJECTION_NAMES))


@register_loss("relation")
class RelationLoss(DistillationLoss):
    """Relations between the examples of a batch, which need no projector (Tung & Mori, 2019; Park et al., 2019).

    Options:
        method (`str`, defaults to `"similarity"`): `"similarity"` compares row-normalised batch Gram matrices
            (similarity-preserving KD); `"distance"` compares mean-normalised pairwise distances (RKD-D).
        source (`str`, defaults to `"hidden_state"`): `"hidden_state"` (the layer below, mean-pooled over real
            tokens, or over the grid for convolutional maps) or `"logits"` (each example's logits flattened; for
            per-token logits, those of padding positions are zeroed first, so the padding length changes nothing).
        layer (`int`, defaults to -1): index into `hidden_states` when `source="hidden_state"`.
        stack (`str`, *optional*): with `source="hidden_state"` on encoder-decoder models, `"encoder"` (pooled
            over real tokens) or `"decoder"` (pooled over labeled positions); required for them.

    One item per batch: the relations of a micro-batch are its own, so under gradient accumulation the
    term is the mean over micro-batches (a larger `per_device_train_batch_size` gives richer relations).
    """

    def __init__(
        self, method: str = "similarity", source: str = "hidden_state", layer: int = -1, stack: str | None = None
    ):
        super().__init__()
        _check_choice("relation", "method", method, ("similarity", "distance"))
        _check_choice("relation", "source", source, ("hidden_state", "logits"))
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"relation option layer must be an integer index into hidden_states, got {layer!r}")
        if stack is not None:
            _check_choice("relation", "stack", stack, STACKS)
            if source != "hidden_state":
                raise ValueError("relation option stack goes with source 'hidden_state'; drop it for logits")
        self.method, self.source, self.layer, self.stack = method, source, layer, stack
        if source == "hidden_state":
            self.student_outputs = self.teacher_outputs = frozenset({"hidden_states"})
            self.accepts_row_logits = True  # reads no logits
        else:
            self.student_outputs = self.teacher_outputs = frozenset({"logits"})

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if self.source == "hidden_state":
            check_stack(self.term, self.stack, student, teacher)
        elif describe(student).seq2seq:
            raise ValueError(
                f"losses[{self.term!r}]: relation on logits does not support encoder-decoder models (one distribution "
                "per decoder position); use source 'hidden_state' with a 'stack'"
            )
        if self.source == "logits" and describe(student).span:
            raise ValueError(
                f"relation with source 'logits' needs a model that returns `logits`; {type(student).__name__} returns "
                "start_logits and end_logits: use source 'hidden_state'"
            )

    def teacher_hidden_layers(self) -> list[int]:
        return [self.layer] if self.source == "hidden_state" else []

    def count_items(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        return torch.tensor(1.0)

    def _features(self, outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        if self.source == "logits":
            logits = outputs.logits
            mask = token_mask(inputs)
            if logits.dim() == 3 and mask is not None and mask.shape == logits.shape[:2]:
                # Per-position logits: padding positions are zeroed so the relations ignore the padding length.
                return logits.float() * mask.to(logits.device, torch.float32).unsqueeze(-1)
            return logits
        hidden = stack_states(outputs, self.stack)[self.layer]
        if hidden.dim() == 4:  # convolutional map [batch, channels, height, width]
            return hidden.float().mean((-2, -1))
        mask = position_mask(inputs, self.stack)
        if mask is None:
            return hidden.float().mean(1)
        weights = mask.to(torch.float32).unsqueeze(-1)
        return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1)

    def forward(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        loss_fn = similarity_preserving_loss if self.method == "similarity" else distance_relation_loss
        return loss_fn(self._features(student_outputs, inputs), self._features(teacher_outputs, inputs))

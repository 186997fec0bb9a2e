"""Narrower students: a transformer encoder pruned in width, keeping its most important units (Minitron).

    importance = width_importance(teacher, calibration_batch)
    student = prune_width(teacher, importance, hidden_size=256, num_attention_heads=8, intermediate_size=1024)
    student.save_pretrained("student")   # AutoModel*.from_pretrained("student"): a config with the new widths

Importance is read from activations on a calibration batch (Muralidharan et al., 2024, "Compact Language Models
via Pruning and Knowledge Distillation"): a head by the norm of its output, a feed-forward neuron by the size of
its activation, an embedding channel by the size of the layer norms' outputs in that channel, summed over every
layer norm (the residual stream is one channel space for the whole network). Each layer keeps its own heads and
neurons; all layers keep the same channels. Heads are kept whole, so the head size stays the teacher's.

Encoders with BERT's module names are covered (BERT, RoBERTa, ELECTRA with equal embedding and hidden sizes,
XLM-R, ViT, ...): a config with `hidden_size`, `num_attention_heads` and `intermediate_size`, and per layer the
`query`/`key`/`value` projections, `attention.output.dense`, `intermediate.dense` and `output.dense` (or ViT's
`q_proj`/`k_proj`/`v_proj`, `o_proj`, `fc1` and `fc2`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

# One layer's linear layers by role, in BERT's names and in the q/k/v/o_proj, fc1/fc2 names of newer encoders (ViT).
_ROLES = {
    "projection": re.compile(r"(^|\.)(query|key|value|q_proj|k_proj|v_proj)$"),
    "attention_output": re.compile(r"(attention\.output\.dense|(^|\.)o_proj)$"),
    "ffn_in": re.compile(r"(intermediate\.dense|(^|\.)fc1)$"),
    "ffn_out": re.compile(r"(^output\.dense|(^|\.)fc2)$"),
}
_WIDTHS = ("hidden_size", "num_attention_heads", "intermediate_size")


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer layers: the ModuleList as long as its config's num_hidden_layers."""
    depth = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and depth is not None and len(module) == depth:
            return name, module
    raise ValueError(
        f"cannot find the layer stack of a {type(model).__name__} to build a student from; pass student_config "
        "to build a fresh student instead"
    )


@dataclass
class WidthImportance:
    """Activation importance of each prunable unit: `channels` [hidden_size], and per layer `heads`
    [num_attention_heads] and `neurons` [intermediate_size]."""

    channels: torch.Tensor
    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]


def _check_prunable(model: nn.Module) -> tuple[int, int, int]:
    config = model.config
    missing = [name for name in _WIDTHS if not isinstance(getattr(config, name, None), int)]
    if missing:
        raise ValueError(
            f"width pruning reads {', '.join(_WIDTHS)} from the config; a {type(model).__name__} has no "
            f"{', '.join(missing)}: prune a BERT-style encoder, or build a fresh student with student_config"
        )
    if getattr(config, "embedding_size", config.hidden_size) != config.hidden_size:
        raise ValueError(
            f"a {type(model).__name__} has embedding_size {config.embedding_size} and hidden_size "
            f"{config.hidden_size}; width pruning needs them equal: build a fresh student with student_config instead"
        )
    return config.hidden_size, config.num_attention_heads, config.intermediate_size


def _layer_roles(layer: nn.Module, index: int) -> dict[str, str]:
    """The relative names of one layer's projections: {name: role}, role in projection / attention_output /
    ffn_in / ffn_out."""
    roles = {}
    for name, module in layer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        role = next((role for role, pattern in _ROLES.items() if pattern.search(name)), None)
        if role is None:
            raise ValueError(f"layer {index} has a linear layer {name!r} that width pruning does not know")
        roles[name] = role
    found = sorted(set(roles.values()))
    if found != ["attention_output", "ffn_in", "ffn_out", "projection"]:
        raise ValueError(
            f"layer {index} does not have the query/key/value, attention output and two feed-forward projections of "
            f"a BERT-style encoder (found {sorted(roles)}): width pruning covers BERT-style encoders"
        )
    return roles


def _token_sums(values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum over examples and real tokens of `values` [batch, tokens, units] -> [units], and the token count."""
    if mask is None or mask.shape != values.shape[:2]:
        flat = values.flatten(0, -2)
        return flat.sum(0), torch.tensor(float(flat.shape[0]))
    weights = mask.to(values.dtype)[..., None]
    return (values * weights).sum((0, 1)), weights.sum()


@torch.no_grad()
def width_importance(
    model: nn.Module, batches: Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]]
) -> WidthImportance:
    """Activation importance of `model`'s heads, feed-forward neurons and embedding channels: their mean over the
    real tokens (padding, by `attention_mask`, does not count) of `batches` (one batch of model inputs, or several)."""
    hidden, heads, _ = _check_prunable(model)
    head_size = hidden // heads
    prefix, layers = layer_stack(model)
    # Running sums per unit and token counts, over every batch: {key: [sum, tokens]}.
    totals: dict[tuple, list[torch.Tensor]] = {}
    mask: list[torch.Tensor | None] = [None]

    def add(key: tuple, values: torch.Tensor) -> None:
        total, tokens = _token_sums(values.float().cpu(), mask[0])
        if key in totals:
            totals[key][0] += total
            totals[key][1] += tokens
        else:
            totals[key] = [total, tokens]

    def record(role: str, index: int):
        def hook(module, args):
            values = args[0]
            if role == "heads":  # the heads' concatenated outputs, before the attention output projection
                values = values.unflatten(-1, (-1, head_size)).norm(dim=-1)
            add((role, index), values.abs())

        return hook

    def record_channels(module, args, output):
        if output.dim() == 3:
            add(("channels", id(module)), output.abs())

    handles = []
    for index, layer in enumerate(layers):
        modules = dict(layer.named_modules())
        for name, role in _layer_roles(layer, index).items():
            if role in ("attention_output", "ffn_out"):
                kind = "heads" if role == "attention_output" else "neurons"
                handles.append(modules[name].register_forward_pre_hook(record(kind, index)))
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (hidden,):
            handles.append(module.register_forward_hook(record_channels))
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        for batch in [batches] if isinstance(batches, Mapping) else batches:
            batch = {key: value.to(device) for key, value in batch.items() if key != "labels"}
            mask[0] = batch.get("attention_mask")
            mask[0] = None if mask[0] is None else mask[0].cpu()
            model(**batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not totals:
        raise ValueError("width_importance needs at least one calibration batch")

    def mean(key):
        total, tokens = totals[key]
        return total / tokens.clamp(min=1)

    channels = sum(mean(key) for key in totals if key[0] == "channels")
    return WidthImportance(
        channels=channels,
        heads=[mean(("heads", index)) for index in range(len(layers))],
        neurons=[mean(("neurons", index)) for index in range(len(layers))],
    )


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of the `count` highest scores, in their original order (so keeping all changes nothing)."""
    return torch.sort(torch.topk(scores, count).indices).values


def _resolve_widths(model: nn.Module, hidden_size, num_attention_heads, intermediate_size) -> tuple[int, int, int]:
    hidden, heads, intermediate = _check_prunable(model)
    head_size = hidden // heads
    if num_attention_heads is None:
        num_attention_heads = (hidden_size or hidden) // head_size
    hidden_size = hidden_size or num_attention_heads * head_size
    intermediate_size = intermediate_size or intermediate
    for name, value, limit in (
        ("hidden_size", hidden_size, hidden),
        ("num_attention_heads", num_attention_heads, heads),
        ("intermediate_size", intermediate_size, intermediate),
    ):
        if not isinstance(value, int) or not 0 < value <= limit:
            raise ValueError(f"the pruned {name} must be an integer in 1..{limit} (the teacher's), got {value!r}")
    if num_attention_heads * head_size != hidden_size:
        fix = (
            f"pass num_attention_heads {hidden_size // head_size}"
            if hidden_size % head_size == 0
            else f"pass a hidden_size that is a multiple of {head_size}"
        )
        raise ValueError(
            f"pruning keeps whole heads of {head_size} channels, so hidden_size must be num_attention_heads x "
            f"{head_size}; got hidden_size {hidden_size} with {num_attention_heads} heads: {fix}"
        )
    return hidden_size, num_attention_heads, intermediate_size


def pruned_config(
    model: nn.Module,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    intermediate_size: int | None = None,
):
    """`model`'s config at the given widths (a width left out keeps the teacher's; the head count follows
    `hidden_size`, at the teacher's head size), after checking that pruning can reach them: the shape of the
    pruned student, and of the randomly initialised student it is compared with."""
    widths = _resolve_widths(model, hidden_size, num_attention_heads, intermediate_size)
    config = copy.deepcopy(model.config)
    config.hidden_size, config.num_attention_heads, config.intermediate_size = widths
    if hasattr(config, "embedding_size"):
        config.embedding_size = config.hidden_size
    return config


def prune_width(
    model: nn.Module,
    importance: WidthImportance,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    intermediate_size: int | None = None,
) -> nn.Module:
    """A copy of `model` with `hidden_size` channels, `num_attention_heads` heads and `intermediate_size`
    feed-forward neurons per layer: the most important ones by `importance`, weights copied from `model`.

    A width left out keeps the teacher's (the head count follows `hidden_size`, at the teacher's head size). The
    copy is the same class with a config holding its real widths; keeping every unit reproduces `model` exactly.
    """
    config = pruned_config(model, hidden_size, num_attention_heads, intermediate_size)
    hidden_size, num_attention_heads, intermediate_size = (
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
    )
    hidden, heads, _ = _check_prunable(model)
    head_size = hidden // heads
    channels = _top(importance.channels, hidden_size)
    prefix, layers = layer_stack(model)
    if len(importance.heads) != len(layers) or len(importance.neurons) != len(layers):
        raise ValueError(f"importance covers {len(importance.heads)} layers; the model has {len(layers)}")

    # For each parameter: which units its dimensions keep ({dim: indices}).
    selections: dict[str, dict[int, torch.Tensor]] = {}
    in_layers: set[str] = set()
    for index, layer in enumerate(layers):
        kept_heads = _top(importance.heads[index], num_attention_heads)
        head_channels = (kept_heads[:, None] * head_size + torch.arange(head_size)).flatten()
        neurons = _top(importance.neurons[index], intermediate_size)
        rows_columns = {
            "projection": (head_channels, channels),
            "attention_output": (channels, head_channels),
            "ffn_in": (neurons, channels),
            "ffn_out": (channels, neurons),
        }
        roles = _layer_roles(layer, index)
        for name, module in layer.named_modules():
            full = f"{prefix}.{index}.{name}" if name else f"{prefix}.{index}"
            in_layers.add(full)
            if name in roles:
                rows, columns = rows_columns[roles[name]]
                selections[f"{full}.weight"] = {0: rows, 1: columns}
                if module.bias is not None:
                    selections[f"{full}.bias"] = {0: rows}
            elif isinstance(module, nn.LayerNorm):
                selections.update({f"{full}.{kind}": {0: channels} for kind, _ in module.named_parameters()})
            elif next(module.parameters(recurse=False), None) is not None:
                raise ValueError(f"layer {index} has parameters in {name!r} that width pruning does not know")
    for name, module in model.named_modules():
        if name in in_layers:
            continue
        for kind, parameter in module.named_parameters(recurse=False):
            full = f"{name}.{kind}" if name else kind
            if isinstance(module, nn.Linear):
                dims = {0: module.out_features == hidden, 1: kind == "weight" and module.in_features == hidden}
            elif isinstance(module, nn.Embedding):
                dims = {1: module.embedding_dim == hidden}
            elif isinstance(module, nn.LayerNorm):
                dims = {0: tuple(module.normalized_shape) == (hidden,)}
            elif isinstance(module, nn.Conv2d):  # a patch embedding
                dims = {0: module.out_channels == hidden}
            else:  # a free parameter (ViT's class token, position table): channels last
                dims = {parameter.dim() - 1: parameter.shape[-1] == hidden}
            selections[full] = {dim: channels for dim, prune in dims.items() if prune}

    state = {}
    for key, value in model.state_dict().items():
        for dim, indices in selections.get(key, {}).items():
            value = value.index_select(dim, indices.to(value.device))
        state[key] = value.clone()
    pruned = type(model)(config)
    pruned.load_state_dict(state, strict=True)
    return pruned.to(next(model.parameters()).device).train(model.training)

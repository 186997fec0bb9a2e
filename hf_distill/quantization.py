"""Int8 students: quantization-aware distillation, and an int8 export that loads with plain `from_pretrained`.

The int8 format is torchao's `Int8DynamicActivationInt8WeightConfig` for every `nn.Linear` (int8 weights per
output channel, int8 activations per token, both symmetric) and int8 weights per row for the word embeddings
(`IntxWeightOnlyConfig`), written through transformers' `TorchAoConfig`:

    student = prepare_int8_training(copy.deepcopy(teacher))   # trains as it will run in int8
    DistillationTrainer(model=student, teacher_model=teacher, ...).train()
    to_int8(student).save_pretrained("student-int8")         # AutoModel*.from_pretrained("student-int8")

`to_int8` on a model that was never trained this way is post-training quantization, the baseline that
quantization-aware distillation has to beat. Loading the saved folder needs torchao installed; the int8 kernels
are fast on the CPU under `torch.compile` (eager, they are slower than fp32).
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# torchao's symmetric int8 mapping: scale = max|x| / 127.5, q = clamp(round(x / scale), -128, 127).
_INT8_MIN, _INT8_MAX = -128, 127
_HALF_RANGE = (_INT8_MAX - _INT8_MIN) / 2
_EPS = torch.finfo(torch.float32).eps


def fake_quantize_int8(values: torch.Tensor) -> torch.Tensor:
    """`values` rounded to symmetric int8 per row (over the last dimension) and back, as torchao's int8 tensors
    compute it, with a straight-through gradient (Jacob et al., 2018): the forward pass sees the int8 grid, the
    backward pass treats the rounding as the identity."""
    rows = values.float()
    scale = (rows.detach().abs().amax(dim=-1, keepdim=True) / _HALF_RANGE).clamp(min=_EPS)
    grid = torch.clamp(torch.round(rows * (1.0 / scale)), _INT8_MIN, _INT8_MAX) * scale
    return values + (grid.to(values.dtype) - values).detach()


class Int8TrainingLinear(nn.Linear):
    """An `nn.Linear` whose input (per token) and weight (per output channel) go through `fake_quantize_int8`:
    what torchao's int8 linear computes, in floating point."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quantize_int8(input), fake_quantize_int8(self.weight), self.bias)


class Int8TrainingEmbedding(nn.Embedding):
    """An `nn.Embedding` whose rows are int8 per row: quantizing the looked-up rows equals looking up the
    quantized table, at the cost of the batch's rows only."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fake_quantize_int8(super().forward(input))


def int8_module_names(model: nn.Module, embeddings: bool = True) -> tuple[list[str], str | None]:
    """The modules the int8 format quantizes: every plain `nn.Linear`, and the input word embeddings (when
    `embeddings`). Returns (linear names, embedding name or None); training and export both read this list."""
    linears = [name for name, module in model.named_modules() if type(module) in (nn.Linear, Int8TrainingLinear)]
    embedding = None
    if embeddings and hasattr(model, "get_input_embeddings"):
        table = model.get_input_embeddings()
        embedding = next((name for name, module in model.named_modules() if module is table), None)
    return linears, embedding


def prepare_int8_training(model: nn.Module, embeddings: bool = True) -> nn.Module:
    """Make `model` train as its int8 export will run (quantization-aware training), in place, and return it.

    Each module of `int8_module_names` becomes its fake-quantized twin by a class change: the weights, hooks,
    parameter names and state dict stay as they are, so the Trainer, checkpoints and `save_pretrained` see the
    same model, and `undo_int8_training` turns it back.
    """
    linears, embedding = int8_module_names(model, embeddings)
    modules = dict(model.named_modules())
    # Checked before any module changes, so that a refused model is left as it was.
    if not linears:
        raise ValueError(f"a {type(model).__name__} has no nn.Linear layers to train for int8")
    if embedding is not None and type(modules[embedding]) not in (nn.Embedding, Int8TrainingEmbedding):
        raise ValueError(
            f"the input embeddings of a {type(model).__name__} are a {type(modules[embedding]).__name__}, not "
            "an nn.Embedding: pass embeddings=False to keep them in floating point"
        )
    for name in linears:
        modules[name].__class__ = Int8TrainingLinear
    if embedding is not None:
        modules[embedding].__class__ = Int8TrainingEmbedding
    return model


def undo_int8_training(model: nn.Module) -> nn.Module:
    """Turn the fake-quantized modules of `prepare_int8_training` back into plain ones, in place."""
    for module in model.modules():
        if type(module) is Int8TrainingLinear:
            module.__class__ = nn.Linear
        elif type(module) is Int8TrainingEmbedding:
            module.__class__ = nn.Embedding
    return model


def is_int8_training(model: nn.Module) -> bool:
    """Whether `model` holds modules prepared by `prepare_int8_training`."""
    return any(type(module) in (Int8TrainingLinear, Int8TrainingEmbedding) for module in model.modules())


def int8_config(model: nn.Module, embeddings: bool = True):
    """The `transformers.TorchAoConfig` of the int8 format for `model`: one entry per weight, so that biases,
    layer norms and position embeddings stay in floating point."""
    try:
        from torchao.quantization import (
            FqnToConfig,
            Int8DynamicActivationInt8WeightConfig,
            IntxWeightOnlyConfig,
        )
        from torchao.quantization.granularity import PerAxis
    except ImportError as error:
        raise ImportError(
            "int8 students need torchao: pip install 'hf_distill[quantization]' (or pip install torchao)"
        ) from error
    from transformers import TorchAoConfig

    linears, embedding = int8_module_names(model, embeddings)
    per_weight: dict[str, Any] = {f"{name}.weight": Int8DynamicActivationInt8WeightConfig() for name in linears}
    if embedding is not None:
        per_weight[f"{embedding}.weight"] = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    return TorchAoConfig(FqnToConfig(per_weight), include_input_output_embeddings=embedding is not None)


def to_int8(model, embeddings: bool = True):
    """`model` as a real int8 model (a new one; `model` is left as it is), ready for `save_pretrained`.

    The fp32 weights (fake-quantized training changes none of their names) are written to a scratch folder and
    loaded back with `int8_config`, which quantizes them as transformers does for any torchao checkpoint; the
    result saves with `save_pretrained`, and plain `AutoModel*.from_pretrained` gives the same int8 model back.
    """
    config = int8_config(model, embeddings)
    with tempfile.TemporaryDirectory(prefix="hf_distill-fp32-") as scratch:
        model.save_pretrained(scratch)
        return type(model).from_pretrained(scratch, quantization_config=config, use_safetensors=True).eval()

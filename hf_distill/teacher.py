"""Loading a teacher from a Hub id or a local folder, with the same task head as its student, and its dtype."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForSpeechSeq2Seq,
    AutoModelForTokenClassification,
    PreTrainedModel,
)

# Encoder-decoders first: BART's generation head is listed under masked LM too.
_TASK_AUTO_CLASSES = (
    AutoModelForSeq2SeqLM,
    AutoModelForSpeechSeq2Seq,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoModelForMaskedLM,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForQuestionAnswering,
)


def auto_class_for(student: nn.Module) -> type:
    """The `AutoModelFor*` class whose task matches the student's (a sequence classifier for a sequence classifier)."""
    name = type(student).__name__
    for auto_class in _TASK_AUTO_CLASSES:
        if name in auto_class._model_mapping._model_mapping.values():
            return auto_class
    raise ValueError(
        f"cannot tell which task head a teacher for a {name} student needs; load the teacher yourself and pass "
        "the model as teacher_model"
    )


def load_teacher(
    name_or_path: str,
    student: nn.Module,
    *,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Load a teacher with the student's task head from a Hub id or a folder saved with `save_pretrained`.

    Only safetensors weights are read, and no code from the repository runs unless `trust_remote_code`.
    """
    auto_class = auto_class_for(student)
    if attn_implementation is not None:
        from_pretrained_kwargs["attn_implementation"] = attn_implementation
    try:
        return auto_class.from_pretrained(
            name_or_path, use_safetensors=True, trust_remote_code=trust_remote_code, **from_pretrained_kwargs
        )
    except OSError as error:
        where = "the Hub is switched off (HF_HUB_OFFLINE=1)" if hub_constants.HF_HUB_OFFLINE else "loading failed"
        raise OSError(
            f"could not load the teacher {name_or_path!r} with {auto_class.__name__}: {where}. Pass the path of a "
            "local folder holding config.json and model.safetensors (one written by save_pretrained), or check "
            f"the Hub id and your connection. Cause: {error}"
        ) from error


def teacher_dtype(args: Any) -> torch.dtype | None:
    """The dtype a frozen teacher's weights are cast to: `teacher_dtype` when set (on any device), else the
    half-precision type the student trains in, on a GPU. On the CPU, and in full precision, the teacher otherwise keeps
    its own dtype."""
    chosen = getattr(args, "teacher_dtype", None)
    if chosen is not None:
        return getattr(torch, chosen)
    if args.device.type != "cuda":
        return None
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return None


def teacher_call_flags(teacher: nn.Module | None) -> dict[str, Any]:
    """Keyword arguments every teacher forward gets: `use_cache=False` where the teacher takes it, since the keys and
    values a causal or encoder-decoder model keeps for generation would stay in memory, read by nothing, through the
    student's step (288 MiB for a GPT-2-small-shaped teacher at 8 x 512 tokens)."""
    if teacher is None or "use_cache" not in inspect.signature(teacher.forward).parameters:
        return {}
    return {"use_cache": False}


def deepspeed_teacher(teacher: nn.Module, accelerator: Any, args: Any) -> nn.Module:
    """Place a frozen teacher for a student trained under DeepSpeed.

    Under ZeRO stages 0-2 every process holds the whole teacher, as under DDP. Under ZeRO-3 the teacher's weights
    are partitioned across the processes like the student's, by an inference-only DeepSpeed engine (no optimizer)
    that gathers each layer's weights for its forward: a teacher too large for one device still runs.
    """
    import deepspeed

    plugin_config = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = dict(plugin_config.get("zero_optimization", {}))
    if zero.get("stage", 0) != 3:
        return teacher.to(accelerator.device)
    width = getattr(getattr(teacher, "config", None), "hidden_size", None)
    # Sizes the Trainer fills in for the student ("auto"): set from the teacher's width, or left to DeepSpeed.
    sizes = {}
    if isinstance(width, int):
        sizes = {"reduce_bucket_size": width * width, "stage3_prefetch_bucket_size": int(0.9 * width * width),
                 "stage3_param_persistence_threshold": 10 * width}  # fmt: skip
    for key in [key for key, value in zero.items() if value == "auto"]:
        if key in sizes:
            zero[key] = sizes[key]
        else:
            zero.pop(key)
    zero.pop("offload_optimizer", None)  # the teacher has no optimizer
    config = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "bf16": {"enabled": bool(args.bf16)},
        "fp16": {"enabled": bool(args.fp16)},
    }
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def zero_stage(accelerator: Any) -> int | None:
    """The DeepSpeed ZeRO stage a trainer runs under, None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def sharding_engine(accelerator: Any) -> str | None:
    """The engine that shards the student's weights across processes ("DeepSpeed", "FSDP"), None without one."""
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        return "DeepSpeed"
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        return "FSDP"
    return None


def fsdp_teacher(teacher: nn.Module, accelerator: Any, dtype: torch.dtype | None) -> nn.Module:
    """Shard a frozen teacher across the processes of an FSDP2 run, as the student is: each of its blocks (the
    classes its `_no_split_modules` names, as accelerate's default wrapping of the student does) and then the whole
    model go through `fully_shard`, on the student's device mesh, resharded after their forward. A process holds
    1/N of the teacher's weights and gathers one block at a time for its forward; there is no optimizer state.

    Its own mixed-precision policy: the weights held in `dtype` (`teacher_dtype`, or the student's half precision
    on a GPU) when given, gathered and computed in them; outputs as computed (the losses take them to float32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    if int(getattr(plugin, "fsdp_version", 1)) != 2:
        raise ValueError(
            "a frozen teacher is sharded under FSDP2 only: set fsdp_config={'version': 2} (transformers' default; "
            "accelerate config: fsdp_version: 2), or train with DeepSpeed ZeRO-3 or DDP"
        )
    if dtype is not None:
        teacher.to(dtype)  # before sharding: each process then holds its shard in that dtype
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    options = {"mesh": mesh, "reshard_after_forward": True, "mp_policy": MixedPrecisionPolicy()}
    names = set(getattr(teacher, "_no_split_modules", None) or [])
    blocks = [module for module in teacher.modules() if type(module).__name__ in names and module is not teacher]
    if not blocks:
        raise ValueError(
            f"{type(teacher).__name__} names no blocks to shard (`_no_split_modules`): a teacher sharded under FSDP "
            "is split block by block; set that attribute on the model to its layer classes, or train with DDP"
        )
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(teacher, **options)
    teacher.requires_grad_(False)
    return teacher


def spread_by_device_map(model: nn.Module) -> bool:
    """Whether a model was placed by a device map (accelerate's big-model placement) over several devices, or with
    some of its layers offloaded to disk."""
    places = set((getattr(model, "hf_device_map", None) or {}).values())
    return len(places) > 1 or "disk" in places


def mapped_teacher(teacher: nn.Module, accelerator: Any, args: Any) -> nn.Module:
    """A frozen teacher placed by a device map, left where the map put it: accelerate's hooks move each layer's
    inputs to its device (and read an offloaded layer's weights for its forward) and return the outputs on the
    device of the inputs. One process only: refused with the fix under several."""
    places = sorted({str(place) for place in teacher.hf_device_map.values()})
    if accelerator.num_processes > 1:
        raise ValueError(
            f"the teacher is placed by a device map over {places}: that serves one process (each process would need "
            "devices of its own). With several processes, split it with DeepSpeed ZeRO-3 or FSDP2 and drop device_map "
            "from teacher_model_init_kwargs, or train in one process"
        )
    chosen = getattr(args, "teacher_dtype", None)
    held = {str(p.dtype).removeprefix("torch.") for p in teacher.parameters() if p.device.type != "meta"}
    if chosen is not None and held - {chosen}:
        raise ValueError(
            f"the teacher is placed by a device map and held in {sorted(held)}, but teacher_dtype is {chosen!r}: a "
            "placed model is not cast. Load it in that dtype (teacher_dtype does so for a teacher given as a path or "
            "Hub id; for a model you load, pass dtype= to from_pretrained)"
        )
    return accelerator.prepare_model(teacher, evaluation_mode=True)  # accelerate moves no model placed by a map


def prepare_frozen_teacher(teacher: nn.Module, accelerator: Any, args: Any) -> nn.Module:
    """A frozen teacher as a run holds it: eval mode, no gradients, prepared by accelerate in evaluation mode
    (partitioned by an inference engine under DeepSpeed, sharded by FSDP2 under FSDP, left where a device map placed
    it), in `teacher_dtype` where that applies."""
    teacher.requires_grad_(False)
    teacher.eval()
    if spread_by_device_map(teacher):
        return mapped_teacher(teacher, accelerator, args)
    engine = sharding_engine(accelerator)
    if engine == "DeepSpeed":
        return deepspeed_teacher(teacher, accelerator, args)
    dtype = teacher_dtype(args)
    if engine == "FSDP":
        return fsdp_teacher(teacher, accelerator, dtype)  # each block moves to the device as it is sharded
    if dtype is not None:
        teacher.to(dtype)  # half the teacher's memory; its outputs feed fp32 losses either way
    return accelerator.prepare_model(teacher, evaluation_mode=True)

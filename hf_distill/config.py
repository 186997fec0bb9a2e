"""`DistillationConfig`: every `TrainingArguments` field plus the distillation losses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, TrainingArguments

from .augmentation import ImageAugmentation
from .losses import available_losses, build_losses
from .rollouts import rollout_generation_config
from .teacher_sources import normalized_weights


def _default_losses() -> dict[str, dict[str, Any]]:
    # Hinton et al.'s classic mix, and the vision guide's lambda = 0.5.
    return {"hard_label": {"weight": 0.5}, "soft_target": {"weight": 0.5, "temperature": 2.0}}


#: `teacher_dtype` values: the dtype a frozen teacher's weights are held in.
TEACHER_DTYPES = ("bfloat16", "float16", "float32")
#: `from_pretrained` arguments a teacher's loading sets itself, and where a user sets them instead.
_RULED_LOADING = {
    "dtype": "set teacher_dtype",
    "torch_dtype": "set teacher_dtype",
    "trust_remote_code": "set teacher_trust_remote_code=True for a repository you trust",
    "use_safetensors": "a teacher is read from safetensors weights only",
    "attn_implementation": "the losses choose it (eager where attention maps are read)",
}


@dataclass
class DistillationConfig(TrainingArguments):
    r"""
    Configuration of a [`DistillationTrainer`]: all [`~transformers.TrainingArguments`] plus the losses.

    Parses with [`~transformers.HfArgumentParser`] from the command line (`--losses '{"soft_target": ...}'`,
    a JSON string) and from YAML or JSON files (a mapping).

    Args:
        losses (`dict[str, dict]`, *optional*, defaults to `{"hard_label": {"weight": 0.5}, "soft_target":
            {"weight": 0.5, "temperature": 2.0}}`):
            The loss terms, summed with their weights. Each key is a term name (the name it is logged under)
            and each value a mapping with `weight` (>= 0, defaults to 1.0), optionally `type` (the registered
            loss to use, defaulting to the key, so one loss can appear twice under two names) and the loss's
            own options. Built-in losses: `soft_target`, `hard_label`, `hidden_state`, `attention`,
            `relation`, `feature_map`; add more with [`register_loss`].
        teacher_weights (`dict[str, float]`, *optional*):
            With several teachers (`teacher_model={name: model, ...}`), each one's weight in the mixture that
            `soft_target` distils toward (normalised to sum to 1). Defaults to equal weights.
        trainable_teachers (`list[str]`, *optional*):
            The teachers that learn alongside the student (online distillation, deep mutual learning): by name,
            `["teacher"]` for a single one. Each gets its own task loss and the divergence toward the other models'
            detached predictions, with the weights and temperature of the configured `hard_label` and
            `soft_target` terms, logged as `<name>_<term>`. Frozen by default.
        trainable_teacher_learning_rate (`float`, *optional*):
            The learning rate of the trainable teachers (their own parameter groups, under the student's schedule).
            Defaults to `learning_rate`.
        save_trained_teachers (`bool`, *optional*, defaults to `False`):
            `save_model` also writes each trainable teacher to `<output_dir>/teachers/<name>`, loadable with
            `AutoModel*.from_pretrained`.
        resume_with_changed_objective (`bool`, *optional*, defaults to `False`):
            Resume from a checkpoint written with other losses, options, teachers or teacher weights
            ([`hf_distill.objective`]); without it that is refused, naming each change. With it, what still fits
            (projectors of matching shapes, optimizer state of matching parameter groups) is loaded and the rest named.
        ema_momentum (`float`, *optional*, defaults to 0.999):
            For `teacher_model="ema"` (a teacher that is an exponential moving average of the student), the share of
            the teacher's weights kept at each optimizer step: `θ_t ← m · θ_t + (1 − m) · θ_student`.
        teacher_trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow a teacher given as a Hub id or path to run modelling code from its repository. Only turn
            this on for a repository you trust.
        teacher_dtype (`str`, *optional*):
            `"bfloat16"`, `"float16"` or `"float32"`: the dtype of a frozen teacher's weights, on any device. A teacher
            given as a Hub id or path is loaded in it (never held in float32 first); a model given is cast. The
            losses still compute in float32 from its outputs. By default a teacher keeps its dtype, except on a GPU
            with `bf16` / `fp16`, where it takes the student's half precision. Teachers that learn (trainable,
            moving average) keep full precision.
        teacher_model_init_kwargs (`dict`, *optional*):
            More `from_pretrained` arguments for a frozen teacher given as a Hub id or path (TRL's name for them),
            e.g. `{"device_map": "auto"}` to spread a large teacher over this process's GPUs, or
            `{"device_map": {...: "disk"}, "offload_folder": "offload"}` to keep some of its layers on disk, each read
            for its forward (one process only; docs/distributed.md). `dtype` is `teacher_dtype`'s, and what it loads
            is safetensors with no code from the repository (`teacher_trust_remote_code`).
        teacher_cache (`str`, *optional*):
            A folder for the teacher's outputs on the training set ([`hf_distill.cache`]). Built on first use
            (resuming an interrupted build), then training runs from it with no teacher in memory. Refused
            when it does not match the teacher, data, preprocessing or losses, or when the inputs are random
            (masking or augmentation at batch time).
        teacher_cache_verify (`bool`, *optional*, defaults to `False`):
            Check every shard of the teacher cache against the sha256 recorded when it was built, all at once when
            it is opened. Without it each shard is still checked, before its first read in the run; a damaged,
            truncated or missing file is an error that names it.
        teacher_cache_top_k (`int`, *optional*, defaults to 64):
            For token-level tasks, how many of the teacher's largest logits a cache keeps per counted position,
            with the rest merged into one bucket (an approximation); 0 keeps every logit (the exact loss, a
            vocabulary-sized row per position). Classifiers always keep every logit.
        compact_token_logits (`bool`, *optional*, defaults to `True`):
            For masked and causal LMs trained on labels: during training, run the vocabulary projection of the
            student (and of an online teacher) only at the labeled positions, the only ones the losses read
            ([`hf_distill.logit_rows`]). Same losses and gradients; for masked LM about a third less arithmetic
            and far smaller logits. Applies only when every configured loss accepts such logits (all built-in
            ones do, except `relation` on logits); set it to False when an override of yours reads full logits.
            Evaluation always computes full logits.
        channels_last (`bool`, *optional*):
            Put the student and the frozen teachers in the channels-last memory format
            (`model.to(memory_format=torch.channels_last)`), in which oneDNN (CPU) and cuDNN (GPU) run 2-D
            convolutions fastest: unset (the default) for models with most of their weights in `nn.Conv2d` (a
            MobileNetV2 student's training step is about 25% faster on a 2-core CPU), True for every model with a
            convolution, False never. Values are unchanged and the saved student is written in the usual layout.
            Not under DeepSpeed or FSDP.
        fused_token_logits (`bool`, *optional*, defaults to `True`):
            Where `compact_token_logits` applies and every loss reading a model's logits is `soft_target` or
            `hard_label`: the model's vocabulary projection (a plain `nn.Linear`) does not run in the model; its
            training logits arrive as [`~hf_distill.logit_rows.ProjectedRows`] and the losses project them
            `chunk_size` rows at a time ([`~hf_distill.losses.projected_rows_loss`]), so that neither model's
            `[rows, vocab]` logits nor the student's gradient of them exist. Same losses and gradients. In one
            process only (not under DDP, whose reducer expects every weight used inside forward, DeepSpeed or
            FSDP), without a teacher that learns, and unless `compute_distillation_loss` (for the teacher also
            `teacher_forward`) is overridden, or the model changes its projection's output: those keep projected
            rows.
        image_augmentation (`dict`, *optional*):
            A random view of each training batch of images, drawn once and seen by the student and every teacher
            alike ([`hf_distill.augmentation`]): `crop_scale` ([low, high] share of the area of a random resized
            crop), `flip` (horizontal, p = 1/2), `mixup_alpha` and `cutmix_alpha` (λ ~ Beta(α, α) per batch;
            labels mix alike and `hard_label` reads them as class probabilities). Drawn from `seed` and the
            micro-batch's position in training, so a resumed run draws the same views. Refused with a teacher
            cache (its outputs belong to one view of each image) and with teachers that learn when mixing.
        lmbda (`float`, *optional*, defaults to 0.0):
            Causal LMs: the probability that an optimizer step trains on completions the student samples from the
            prompts of its batch (on-policy distillation, GKD's λ; [`hf_distill.rollouts`]) instead of the dataset's.
            One draw per optimizer step, from `seed` and the step: the same on every process and on a resumed run.
        seq_kd (`bool`, *optional*, defaults to `False`):
            Causal LMs: in the steps that do not sample from the student, train on completions the teacher samples
            (sequence-level KD) instead of the dataset's. With several teachers, the first one samples.
        rollout_generation (`dict` or `GenerationConfig`, *optional*):
            How completions are sampled with `lmbda` or `seq_kd`: a `GenerationConfig` or a mapping of its fields.
            Defaults: `{"max_new_tokens": 128, "do_sample": true, "temperature": 1.0, "top_k": 0, "top_p": 1.0}`;
            the KV cache is always on.
        check_finite (`bool`, *optional*, defaults to `True`):
            Stop training with a `FloatingPointError` that names the culprit (a teacher output, a loss term, the
            loss or the gradients), the step and what to try, when a value of a step is NaN or infinite, before the
            optimizer applies that step ([`hf_distill.guards`]). Costs one host sync per optimizer step. With
            fp16's gradient scaler, infinite gradients are left to the scaler, which skips such steps by design.
    """

    _VALID_DICT_FIELDS = [
        *TrainingArguments._VALID_DICT_FIELDS,
        "losses",
        "teacher_weights",
        "image_augmentation",
        "rollout_generation",
        "teacher_model_init_kwargs",
    ]

    losses: dict | str | None = field(
        default_factory=_default_losses,
        metadata={
            "help": "Loss terms as a JSON mapping of term name to {'weight': w, 'type': registered loss (defaults to "
            "the name), ...options}, summed with their weights. Built-in: "
            + ", ".join(available_losses())
            + '. Example: \'{"soft_target": {"weight": 0.5, "temperature": 5.0}, "hard_label": {"weight": 0.5}}\'.'
        },
    )
    teacher_weights: dict | str | None = field(
        default=None,
        metadata={
            "help": "Several teachers: a JSON mapping of teacher name to weight in soft_target's mixture of their "
            'distributions (normalised to sum to 1). Default: equal weights. Example: \'{"bert": 2, "roberta": 1}\'.'
        },
    )
    trainable_teachers: list[str] | None = field(
        default=None,
        metadata={
            "help": "Teachers that learn alongside the student (online, deep mutual learning), by name ('teacher' "
            "for a single one): each gets its own hard_label and a soft_target toward the other models' detached "
            "predictions, with the configured weights and temperature. Default: every teacher is frozen."
        },
    )
    trainable_teacher_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the trainable teachers (their own parameter groups). Default: learning_rate."
        },
    )
    save_trained_teachers: bool = field(
        default=False,
        metadata={"help": "save_model also writes each trainable teacher to <output_dir>/teachers/<name>."},
    )
    resume_with_changed_objective: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint written with other losses, options or teachers: loads what still fits "
            "and names the rest. Without it such a resume is refused, naming each changed setting."
        },
    )
    ema_momentum: float = field(
        default=0.999,
        metadata={
            "help": "teacher_model='ema' (a moving average of the student): the share of the teacher's weights kept "
            "at each optimizer step."
        },
    )
    teacher_trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow a teacher loaded from a Hub id or path to run code from its repository. Off unless you "
            "trust that repository."
        },
    )

    teacher_dtype: str | None = field(
        default=None,
        metadata={
            "help": "bfloat16, float16 or float32: the dtype of a frozen teacher's weights (loaded in it when given as "
            "a path or Hub id). Default: its own, or the student's half precision on a GPU with bf16/fp16."
        },
    )
    teacher_model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "More from_pretrained arguments for a frozen teacher given as a Hub id or path, as a JSON mapping: "
            '\'{"device_map": "auto"}\' (one process only).'
        },
    )

    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Folder of precomputed teacher outputs on the training set: built on first use (an interrupted "
            "build resumes), then reused with no teacher in memory. Refused if teacher, data, preprocessing or "
            "losses differ."
        },
    )
    teacher_cache_verify: bool = field(
        default=False,
        metadata={
            "help": "Check every shard of the teacher cache against its recorded sha256 when it is opened, in one pass "
            "(otherwise each shard is checked before its first read)."
        },
    )
    teacher_cache_top_k: int = field(
        default=64,
        metadata={
            "help": "Token-level tasks: teacher logits kept per counted position in the cache (the rest merged into "
            "one bucket, an approximation); 0 keeps them all (exact, large). Classifiers keep all."
        },
    )

    compact_token_logits: bool = field(
        default=True,
        metadata={
            "help": "Masked/causal LMs with labels: in training, project onto the vocabulary only at the labeled "
            "positions the losses read (same losses, less time and memory). Off for overrides reading full logits."
        },
    )
    channels_last: bool | None = field(
        default=None,
        metadata={
            "help": "Train convolutional students (and run such frozen teachers) in the channels-last memory format, "
            "faster for convolutions on CPU and GPU. Unset: models with most weights in Conv2d; True: any Conv2d."
        },
    )
    fused_token_logits: bool = field(
        default=True,
        metadata={
            "help": "With compact_token_logits: leave a language model's vocabulary projection to soft_target and "
            "hard_label, which project chunk by chunk, so no [rows, vocab] logits (or gradient) are held."
        },
    )
    image_augmentation: dict | str | None = field(
        default=None,
        metadata={
            "help": "Image students: a random view of each training batch, seen alike by student and teachers, as a "
            'JSON mapping, e.g. \'{"crop_scale": [0.35, 1.0], "flip": true, "mixup_alpha": 0.2, "cutmix_alpha": '
            "1.0}'. Refused with a teacher cache."
        },
    )
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "Causal LMs: probability that an optimizer step trains on completions the student samples from its "
            "prompts (on-policy distillation, GKD's lambda) instead of the dataset's; one draw per step."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Causal LMs: steps that do not sample from the student train on completions the teacher samples "
            "(sequence-level KD) instead of the dataset's."
        },
    )
    rollout_generation: dict | str | None = field(
        default=None,
        metadata={
            "help": "With lmbda or seq_kd: GenerationConfig fields for sampling completions, as a JSON mapping, e.g. "
            '\'{"max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0}\' (those are the defaults, with '
            "max_new_tokens 128)."
        },
    )
    check_finite: bool = field(
        default=True,
        metadata={
            "help": "Stop training, naming the culprit and the step, when a teacher output, a loss term, the loss or "
            "a gradient is NaN or infinite, before the optimizer applies the step (one host sync per step)."
        },
    )

    def __post_init__(self):
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(
                f"teacher_dtype must be one of {list(TEACHER_DTYPES)} (or unset: the teacher's own), got "
                f"{self.teacher_dtype!r}"
            )
        self.teacher_model_init_kwargs = _json_mapping(
            "teacher_model_init_kwargs", self.teacher_model_init_kwargs, '{"device_map": "auto"}'
        )
        ruled = sorted(set(self.teacher_model_init_kwargs or {}) & set(_RULED_LOADING))
        if ruled:
            raise ValueError(
                f"teacher_model_init_kwargs cannot set {ruled}: " + "; ".join(_RULED_LOADING[key] for key in ruled)
            )
        self.losses = _json_mapping("losses", self.losses, '{"soft_target": {"weight": 1.0}}')
        self.teacher_weights = _json_mapping("teacher_weights", self.teacher_weights, '{"a": 2, "b": 1}')
        if self.teacher_weights is not None:
            if not isinstance(self.teacher_weights, dict) or not self.teacher_weights:
                raise ValueError(
                    f"teacher_weights must map each teacher's name to its weight, got {self.teacher_weights!r}"
                )
            normalized_weights(list(self.teacher_weights), self.teacher_weights)  # numbers >= 0, not all 0
        if isinstance(self.trainable_teachers, str):
            self.trainable_teachers = [self.trainable_teachers]
        if self.trainable_teachers is not None and not all(
            isinstance(name, str) and name for name in self.trainable_teachers
        ):
            raise ValueError(f"trainable_teachers must be a list of teacher names, got {self.trainable_teachers!r}")
        if not 0.0 <= self.ema_momentum < 1.0 or isinstance(self.ema_momentum, bool):
            raise ValueError(f"ema_momentum must lie in [0, 1), got {self.ema_momentum!r}")
        if self.trainable_teacher_learning_rate is not None and not self.trainable_teacher_learning_rate > 0:
            raise ValueError(
                f"trainable_teacher_learning_rate must be > 0, got {self.trainable_teacher_learning_rate!r}"
            )
        if isinstance(self.teacher_cache, str) and not self.teacher_cache.strip():
            raise ValueError("teacher_cache is an empty path: give the folder of the cache, or leave it unset (None)")
        self.image_augmentation = _json_mapping(
            "image_augmentation", self.image_augmentation, '{"crop_scale": [0.35, 1.0], "flip": true}'
        )
        if self.image_augmentation is not None:
            ImageAugmentation.from_config(self.image_augmentation)  # unknown keys and bad values, now
            if self.teacher_cache is not None:
                raise ValueError(
                    "image_augmentation draws a new view of every image at every step, but a teacher cache holds the "
                    "teacher's outputs for one view: drop teacher_cache to distil online, or drop image_augmentation "
                    "(--image_augmentation none); the pipeline's --image_augmentation_copies draws fixed views a cache "
                    "can serve"
                )
        self._check_rollouts()
        # Building the losses validates names, weights and options before anything else runs.
        build_losses(self.losses)
        if (
            isinstance(self.teacher_cache_top_k, bool)
            or not isinstance(self.teacher_cache_top_k, int)
            or (self.teacher_cache_top_k < 0)
        ):
            raise ValueError(
                f"teacher_cache_top_k must be an integer >= 0 (0: every logit), got {self.teacher_cache_top_k!r}"
            )
        # Pinned host memory only speeds up copies to an accelerator; without one the DataLoader warns each epoch.
        if self.dataloader_pin_memory and not torch.accelerator.is_available():
            self.dataloader_pin_memory = False
        super().__post_init__()

    def _check_rollouts(self) -> None:
        if isinstance(self.rollout_generation, GenerationConfig):  # stored as a mapping: arguments stay JSON
            self.rollout_generation = {
                key: value
                for key, value in self.rollout_generation.to_diff_dict().items()
                if key != "transformers_version"
            }
        self.rollout_generation = _json_mapping(
            "rollout_generation", self.rollout_generation, '{"max_new_tokens": 64, "temperature": 1.0}'
        )
        rollout_generation_config(self.rollout_generation)  # unknown fields and bad values, now
        if isinstance(self.lmbda, bool) or not isinstance(self.lmbda, (int, float)) or not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda is a probability: a number in [0, 1], got {self.lmbda!r}")
        if not isinstance(self.seq_kd, bool):
            raise ValueError(f"seq_kd must be true or false, got {self.seq_kd!r}")
        if self.teacher_cache is not None and (self.lmbda > 0 or self.seq_kd):
            raise ValueError(
                "a teacher cache holds the teacher's outputs on the dataset's sequences, but lmbda > 0 and seq_kd train "
                "on completions generated during training, which no cache has seen: drop teacher_cache to distil "
                "online, or set lmbda=0 and seq_kd=False"
            )


def _json_mapping(name: str, value: Any, example: str) -> Any:
    """A field given as a JSON string (on the command line), parsed; anything else as it is. "none" (or JSON's
    null) is no mapping: it turns off a recipe's setting."""
    if not isinstance(value, str):
        return value
    if value.strip().lower() == "none":
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{name} must be a JSON mapping such as '{example}'; could not parse {value!r}: {error}"
        ) from None


def checked_trainer_args(
    args: DistillationConfig | None, model: nn.Module | None, kwargs: dict[str, Any]
) -> DistillationConfig:
    """`DistillationTrainer`'s config (a default one for None), after refusing what the trainer does not apply."""
    args = DistillationConfig() if args is None else args
    if not isinstance(args, DistillationConfig):
        raise TypeError(
            f"DistillationTrainer takes a DistillationConfig as args, not {type(args).__name__}: build "
            "hf_distill.DistillationConfig(**your_training_arguments, losses={...})"
        )
    if model is None:
        raise ValueError("pass the student as model=...; DistillationTrainer does not support model_init")
    if args.label_smoothing_factor:
        raise ValueError(
            "label_smoothing_factor is not applied by DistillationTrainer (soft targets already smooth the "
            "labels); set it to 0"
        )
    if kwargs.get("compute_loss_func") is not None:
        raise ValueError("compute_loss_func is not used by DistillationTrainer; register a loss with register_loss")
    return args

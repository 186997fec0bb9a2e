"""Stages 1 and 2: the teacher (loaded, or trained first when it has no task head) and the student.

teachers = prepare_teachers(args.teacher_settings, config, data)   # {name: (teacher, where it came from)}
student, layer_map = build_student(teacher, layers=[0, 2, 4, 7, 9, 11])
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    Trainer,
)

from ..config import DistillationConfig
from ..pruning import layer_stack, prune_width, pruned_config, width_importance
from ..quantization import prepare_int8_training
from ..saving import staged_folder
from ..trainer import DistillationTrainer
from .data import PreparedData
from .settings import (
    CAUSAL_LM,
    IMAGE_CLASSIFICATION,
    MASKED_LM,
    TEXT_CLASSIFICATION,
    StudentSettings,
    TeacherSettings,
)
from .sources import resolve_model

logger = logging.getLogger(__name__)

AUTO_CLASSES = {
    TEXT_CLASSIFICATION: AutoModelForSequenceClassification,
    MASKED_LM: AutoModelForMaskedLM,
    IMAGE_CLASSIFICATION: AutoModelForImageClassification,
    CAUSAL_LM: AutoModelForCausalLM,
}
#: Written next to a teacher trained by the pipeline: what it was trained from, so a rerun can reuse it.
TEACHER_RECORD = "hf_distill_teacher.json"


def stage_args(config: DistillationConfig, output_dir: str, **changes: Any) -> DistillationConfig:
    """A copy of `config` for one training stage: its own checkpoint folder, and no Hub pushes from the Trainer
    (the pipeline pushes the finished student itself). Columns are kept: `prepare_data` leaves only model inputs,
    and image splits are transformed on the fly from their `image` column."""
    return dataclasses.replace(
        config, output_dir=output_dir, push_to_hub=False, remove_unused_columns=False, **changes
    )


def label_kwargs(data: PreparedData) -> dict[str, Any]:
    if data.label_names is None:
        return {}
    return {
        "num_labels": len(data.label_names),
        "id2label": dict(enumerate(data.label_names)),
        "label2id": {name: index for index, name in enumerate(data.label_names)},
    }


def tokenizer_ids(data: PreparedData) -> dict[str, Any]:
    """For a causal LM built from a config: the vocabulary size and special token ids of its tokenizer, unless the
    config gives them."""
    if data.task != CAUSAL_LM:
        return {}
    tokenizer = data.processor
    return {
        "vocab_size": len(tokenizer),
        **{f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")},
    }


def _load_kwargs(data: PreparedData, attn_implementation: str | None) -> dict[str, Any]:
    kwargs = label_kwargs(data)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


def _teacher_record(args: TeacherSettings, config: DistillationConfig, data: PreparedData) -> dict[str, Any]:
    """What a teacher trained here was trained from: its own settings and those of the data it was trained on."""
    prepared = data.settings  # None for a PreparedData built by hand: its data facts are then unknown
    return {
        "teacher": args.teacher,
        "teacher_config": args.teacher_config,
        "task": args.task,
        "dataset": getattr(prepared, "dataset", None),
        "dataset_config_name": getattr(prepared, "dataset_config_name", None),
        "train_examples": len(data.teacher_train),
        "max_length": getattr(prepared, "max_length", None),
        # The tokens it was trained on: a teacher with its own tokenizer (--teacher_processor) is another teacher.
        "tokenizer": getattr(prepared, "teacher_processor", None),
        "mlm_probability": getattr(prepared, "mlm_probability", None),
        "image_size": getattr(prepared, "image_size", None),
        "labels": data.label_names,
        "epochs": args.num_train_epochs,
        "learning_rate": args.learning_rate,
        "new_weights_only": args.train_new_weights_only,
        "batch_size": config.per_device_train_batch_size,
        "sampling": config.train_sampling_strategy,
        "seed": config.seed,
    }


def prepare_teacher(
    settings: TeacherSettings,
    config: DistillationConfig,
    data: PreparedData,
    attn_implementation: str | None = None,
    trained_dir: str | None = None,
) -> tuple[PreTrainedModel, str]:
    """Load the teacher, or train it first when it has no trained head for the task.

    A teacher whose checkpoint lacks task-head weights (the load report lists them as missing), or one built
    from `teacher_config`, is fine-tuned on the training split and saved in `<output_dir>/teacher` with a
    record of its settings; a later run with the same settings loads it from there instead of training again.

    Returns the teacher (in eval mode) and where it came from (a Hub id or folder, for the model card).
    `trained_dir` is where a teacher trained here is kept (default `<output_dir>/teacher`).
    """
    args = TeacherSettings.of(settings)
    trained_dir = trained_dir or os.path.join(config.output_dir, "teacher")
    record = _teacher_record(args, config, data)
    record_path = os.path.join(trained_dir, TEACHER_RECORD)
    if os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as handle:
            if json.load(handle) == json.loads(json.dumps(record)):
                logger.info("Reusing the teacher trained earlier in %s", trained_dir)
                teacher = AUTO_CLASSES[args.task].from_pretrained(
                    trained_dir, use_safetensors=True, **_load_kwargs(data, attn_implementation)
                )
                return teacher.eval(), trained_dir
        logger.warning("%s was trained with other settings; training the teacher again", trained_dir)

    teacher, missing = load_initial_teacher(args, config, data, attn_implementation)
    if not missing:
        return teacher.eval(), args.teacher

    logger.warning(
        "The teacher has untrained weights (%s); training it first for %s epochs (the record in %s lets later runs "
        "reuse it)",
        ", ".join(sorted(missing)[:6]) + (" ..." if len(missing) > 6 else ""),
        args.num_train_epochs,
        trained_dir,
    )
    teacher_args = stage_args(
        config,
        os.path.join(config.output_dir, "checkpoints", "teacher"),
        num_train_epochs=args.num_train_epochs,
        learning_rate=args.learning_rate,
        max_steps=-1,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )
    teacher.train()
    if args.train_new_weights_only and args.teacher_config is None:
        for name, parameter in teacher.named_parameters():
            parameter.requires_grad_(name in missing)
    Trainer(
        model=teacher,
        args=teacher_args,
        train_dataset=data.teacher_train,
        data_collator=data.train_collator,
        processing_class=data.processor,
    ).train()
    teacher.requires_grad_(True)
    # The record goes in last: a record in the folder means a whole teacher beside it.
    save_atomically(trained_dir, lambda folder: _save_teacher(teacher, data, record, folder), last=(TEACHER_RECORD,))
    return teacher.eval(), trained_dir


def prepare_teachers(
    settings: TeacherSettings, config: DistillationConfig, data: PreparedData, attn_implementation: str | None = None
) -> dict[str, tuple[PreTrainedModel, str]]:
    """`prepare_teacher` for each of several teachers (`teachers`), in order: `{name: (teacher, source)}`,
    each trained one kept in `<output_dir>/teachers/<name>`. One teacher is called "teacher" and kept in
    `teacher_dir` (default `<output_dir>/teacher`)."""
    args = TeacherSettings.of(settings)
    if not args.teachers:
        return {"teacher": prepare_teacher(args, config, data, attn_implementation, args.teacher_dir)}
    prepared = {}
    for name, path in args.teachers.items():
        logger.info("Teacher %r: %s", name, path)
        one = dataclasses.replace(args, teacher=path)
        trained_dir = os.path.join(config.output_dir, "teachers", name)
        prepared[name] = prepare_teacher(one, config, data, attn_implementation, trained_dir)
    return prepared


def load_initial_teacher(
    settings: TeacherSettings, config: DistillationConfig, data: PreparedData, attn_implementation: str | None = None
) -> tuple[PreTrainedModel, list[str]]:
    """The teacher as its checkpoint (or `teacher_config`) gives it, before any training here, and the names of
    the weights that were freshly initialised (seeded with `config.seed`).

    Besides being where teacher training starts, this is what a baseline built "without the teacher" starts
    from: the pretrained layers, not the ones the pipeline fine-tuned.
    """
    args = TeacherSettings.of(settings)
    auto_class = AUTO_CLASSES[args.task]
    kwargs = _load_kwargs(data, attn_implementation)
    torch.manual_seed(config.seed)
    if args.teacher_config is not None:
        teacher_config = AutoConfig.for_model(**{**tokenizer_ids(data), **args.teacher_config, **kwargs})
        return auto_class.from_config(teacher_config), ["every weight (built from teacher_config)"]
    # The pipeline reports the missing (task-head) weights itself, with what it does about them (prepare_teacher).
    return load_reporting_missing(
        auto_class, resolve_model(args.teacher), trust_remote_code=config.teacher_trust_remote_code, **kwargs
    )


def load_reporting_missing(auto_class, source: str, **kwargs: Any) -> tuple[PreTrainedModel, list[str]]:
    """`auto_class.from_pretrained(source)` (safetensors only) with transformers' load report silenced, and the
    names of the weights the checkpoint lacked, for the caller to say what it does about them."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = auto_class.from_pretrained(source, use_safetensors=True, output_loading_info=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, info["missing_keys"]


def _save_teacher(teacher: PreTrainedModel, data: PreparedData, record: dict[str, Any], folder: str) -> None:
    teacher.save_pretrained(folder)
    data.processor.save_pretrained(folder)
    with open(os.path.join(folder, TEACHER_RECORD), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)


def save_atomically(folder: str, write, last: tuple[str, ...] = ()) -> None:
    """Run `write(staging_folder)`, then move what it wrote into `folder`, the weights and then `last` at the end,
    so that a crash never leaves a half-written file under `folder` ([`hf_distill.saving.staged_folder`])."""
    with staged_folder(folder, last) as staging:
        write(staging)


def default_student_layers(teacher_depth: int, student_depth: int | None = None) -> list[int]:
    """`student_depth` teacher layers spread evenly from the first to the last (half the depth by default).

    For 12 -> 6 this gives 0, 2, 4, 7, 9, 11: the layers DistilBERT's research code keeps.
    """
    student_depth = student_depth or max(1, teacher_depth // 2)
    if not 0 < student_depth <= teacher_depth:
        raise ValueError(
            f"student_num_layers must lie in 1..{teacher_depth} (the teacher's depth), got {student_depth}: pass "
            f"--student_num_layers N with N <= {teacher_depth}, or --student_layers with the teacher layers to keep"
        )
    if student_depth == 1:
        return [teacher_depth - 1]
    return [round(i * (teacher_depth - 1) / (student_depth - 1)) for i in range(student_depth)]


def build_student(
    teacher: PreTrainedModel,
    layers: list[int] | None = None,
    num_layers: int | None = None,
) -> tuple[PreTrainedModel, list[list[int]]]:
    """A shallower copy of the teacher made of some of its layers (DistilBERT's initialisation).

    The student has the teacher's class and width; its embeddings, task head and the listed layers are copied
    (`layers[i]` becomes student layer i). Returns the student and the hidden-state layer map this implies
    (`[student, teacher]` pairs over hidden-state indices, 0 being the embedding output), which is the default
    `layer_map` of the pipeline's `hidden_state` losses.
    """
    prefix, teacher_layers = layer_stack(teacher)
    layers = list(layers) if layers is not None else default_student_layers(len(teacher_layers), num_layers)
    bad = [index for index in layers if not 0 <= index < len(teacher_layers)]
    if bad or not layers:
        raise ValueError(
            f"the student's layers must be teacher layers 0..{len(teacher_layers) - 1} (the teacher has "
            f"{len(teacher_layers)}), got {layers}: pass --student_layers with indices in that range, or "
            "--student_num_layers N for N layers spread evenly"
        )
    student_config = copy.deepcopy(teacher.config)
    student_config.num_hidden_layers = len(layers)
    student = type(teacher)(student_config)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    renumber = {source: target for target, source in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(1)) in renumber:
            state[f"{prefix}.{renumber[int(match.group(1))]}.{key[match.end() :]}"] = value
    result = student.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"copying teacher weights left {result.missing_keys or result.unexpected_keys} unmatched")
    layer_map = [[0, 0]] + [[target + 1, source + 1] for target, source in enumerate(layers)]
    return student, layer_map


def fresh_student(student_config: dict | str, data: PreparedData, task: str, seed: int) -> PreTrainedModel:
    """A randomly initialised student from a config: a Hub id or folder holding one, or a mapping with model_type."""
    kwargs = label_kwargs(data)
    if isinstance(student_config, dict):
        config = AutoConfig.for_model(**{**tokenizer_ids(data), **student_config, **kwargs})
    else:
        config = AutoConfig.from_pretrained(student_config, **kwargs)
    if task == IMAGE_CLASSIFICATION and data.image_size is not None and hasattr(config, "image_size"):
        config.image_size = data.image_size
    torch.manual_seed(seed)
    return AUTO_CLASSES[task].from_config(config)


def shape_student(
    student: PreTrainedModel, settings: StudentSettings, data: PreparedData, seed: int, quantize: bool = True
) -> PreTrainedModel:
    """The student built from the teacher's layers, given its kind: narrowed to `width` (the units that matter
    most on `calibration_examples` training examples), randomly re-initialised at that shape (`init == "random"`),
    and prepared for int8 training (`quantization`, when `quantize`)."""
    args = StudentSettings.of(settings)
    if args.width is not None and args.init == "teacher":
        batches = data.calibration_batches(args.calibration_examples)
        student = prune_width(student, width_importance(student, batches), **args.width)
    elif args.init == "random":
        config = student.config if args.width is None else pruned_config(student, **args.width)
        torch.manual_seed(seed)
        student = type(student)(config)
    if quantize and args.quantization == "int8":
        prepare_int8_training(student)
    return student


def distill(
    student,
    teacher,  # a model, or {name: model} for several
    data: PreparedData,
    config: DistillationConfig,
    output_dir: str,
    resume_from_checkpoint: str | bool | None = None,
    labeled_only: bool = False,
) -> DistillationTrainer:
    """Train `student` against `teacher` (None for a baseline whose losses need none) with `config`'s losses,
    checkpointing to `output_dir` (and resuming from `resume_from_checkpoint`: a folder, or True for the last), on
    the labeled examples and the transfer set, or (`labeled_only`) on the labeled examples alone."""
    own_tokens = teacher is not None and data.teacher_view is not None  # a teacher with another tokenizer
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=stage_args(config, output_dir),
        train_dataset=data.train if labeled_only else data.distill_train,
        # A masked-LM eval split is masked once, ahead of time; the training collator would mask it again.
        eval_dataset=None if data.task == MASKED_LM else data.eval,
        data_collator=data.train_collator,
        processing_class=data.processor,
        teacher_processing_class=data.teacher_view.processor if own_tokens else None,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer

"""Refinement: the student trained further on task labels after distillation, on the same task or another one.

Same task (`--refine_epochs N`): the distilled student trains N more epochs with `--refine_losses` (hard labels by
default, soft targets if asked), and the report shows it before and after.

Another task (`--refine_dataset D --refine_task T`), DistilBERT's flow: the student distilled as a masked LM on raw
text (general distillation) carries its layers into a model for task T, which is fine-tuned on D's labels; the
same architecture taken from the teacher's layers without the distillation stage is fine-tuned the same way, and
the report compares the two on D's held-out split.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tempfile
from typing import Any

import torch

from ..config import DistillationConfig
from ..losses import reads_teacher
from .arguments import PipelineArguments
from .data import PreparedData, prepare_data
from .evaluation import describe_models, evaluate_model
from .models import AUTO_CLASSES, distill, label_kwargs, load_reporting_missing, stage_args

logger = logging.getLogger(__name__)

HARD_LABELS_ONLY = {"hard_label": {"weight": 1.0}}


def refine_losses(args: PipelineArguments) -> dict[str, Any]:
    """The refinement stage's losses: `--refine_losses`, or the task labels alone."""
    return copy.deepcopy(args.refine_losses) if args.refine_losses else copy.deepcopy(HARD_LABELS_ONLY)


def refine_config(
    args: PipelineArguments, config: DistillationConfig, output_dir: str, losses: dict[str, Any]
) -> DistillationConfig:
    """The distillation settings with refinement's own epochs, learning rate and `losses`, and no teacher cache."""
    return stage_args(
        config,
        output_dir,
        losses=losses,
        num_train_epochs=args.refine_epochs,
        max_steps=-1,
        learning_rate=args.refine_learning_rate or config.learning_rate,
        teacher_cache=None,
    )


def refine(
    student,
    teacher,
    data: PreparedData,
    args: PipelineArguments,
    config: DistillationConfig,
    output_dir: str,
    losses: dict[str, Any] | None = None,
):
    """Train `student` further on `data`'s labeled examples with the refinement settings and `losses` (default
    `refine_losses(args)`); returns the trainer. `teacher` is used only when one of the losses reads it."""
    settings = refine_config(args, config, output_dir, refine_losses(args) if losses is None else losses)
    given = teacher if reads_teacher(settings.losses) else None
    return distill(student, given, data, settings, output_dir, labeled_only=True)


def carry_to_task(model, task: str, data: PreparedData, seed: int):
    """`model`'s weights in a model for `task` (for `data`'s labels): its layers carry over, the new task's head
    starts random (seeded), as `from_pretrained` does for any checkpoint without that head."""
    with tempfile.TemporaryDirectory(prefix="hf_distill-carry-") as scratch:
        model.save_pretrained(scratch)
        torch.manual_seed(seed)
        # The new head's weights are missing by design: said below.
        carried, missing = load_reporting_missing(AUTO_CLASSES[task], scratch, **label_kwargs(data))
    logger.info("The %s model starts from the student's layers; new: %s", task, ", ".join(sorted(missing)))
    return carried


def task_arguments(args: PipelineArguments) -> PipelineArguments:
    """The arguments of the refinement task's data: its data set, task and sample cap, nothing of the first
    stage's transfer sets or augmentation."""
    return dataclasses.replace(
        args,
        task=args.refine_task,
        dataset=args.refine_dataset,
        dataset_config_name=None,
        eval_split=None,
        max_train_samples=args.refine_max_train_samples,
        max_eval_samples=None,
        teacher_max_train_samples=args.refine_max_train_samples,
        transfer_dataset=None,
        word_replacement_mlm=None,
        image_augmentation_copies=None,
        refine_dataset=None,
        refine_epochs=0.0,
    )


def refine_on_task(
    args: PipelineArguments, config: DistillationConfig, distilled, undistilled
) -> dict[str, dict[str, Any]]:
    """DistilBERT's flow, second stage: `distilled` (the general-distilled student) and `undistilled` (the same
    architecture from the teacher's layers, never distilled) each carried into `args.refine_task` and fine-tuned
    on `args.refine_dataset` the same way; their accuracy, size and latency on its held-out split."""
    task_args = task_arguments(args)
    data = prepare_data(task_args, config.seed)
    models = {}
    for name, model in (("distilled, then refined", distilled), ("refined without distillation", undistilled)):
        carried = carry_to_task(model, args.refine_task, data, config.seed)
        folder = os.path.join(config.output_dir, "checkpoints", "refine-" + name.split(",")[0].split()[0])
        models[name] = refine(carried, None, data, args, config, folder).model
    results = {
        name: evaluate_model(model, data, config.per_device_eval_batch_size, name) for name, model in models.items()
    }
    for name, description in describe_models(models, data, args.latency_batch_sizes, args.latency_repeats).items():
        results[name].update(description)
    return {"task": args.refine_task, "dataset": args.refine_dataset, "train_examples": len(data.train),
            "results": results, "models": models, "processor": data.processor}  # fmt: skip

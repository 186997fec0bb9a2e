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
import logging
import os
import tempfile
from typing import Any

import torch

from ..config import DistillationConfig
from ..losses import reads_teacher
from .data import PreparedData, prepare_data
from .evaluation import describe_models, evaluate_model
from .models import AUTO_CLASSES, distill, label_kwargs, load_reporting_missing, stage_args
from .settings import DataSettings, MeasurementSettings, RefinementSettings

logger = logging.getLogger(__name__)

HARD_LABELS_ONLY = {"hard_label": {"weight": 1.0}}


def refine_losses(settings: RefinementSettings) -> dict[str, Any]:
    """The refinement stage's losses: `--refine_losses`, or the task labels alone."""
    losses = RefinementSettings.of(settings).losses
    return copy.deepcopy(losses) if losses else copy.deepcopy(HARD_LABELS_ONLY)


def refine_config(
    settings: RefinementSettings, config: DistillationConfig, output_dir: str, losses: dict[str, Any]
) -> DistillationConfig:
    """The distillation settings with refinement's own epochs, learning rate and `losses`, and no teacher cache."""
    settings = RefinementSettings.of(settings)
    return stage_args(
        config,
        output_dir,
        losses=losses,
        num_train_epochs=settings.epochs,
        max_steps=-1,
        learning_rate=settings.learning_rate or config.learning_rate,
        teacher_cache=None,
    )


def refine(
    student,
    teacher,
    data: PreparedData,
    settings: RefinementSettings,
    config: DistillationConfig,
    output_dir: str,
    losses: dict[str, Any] | None = None,
):
    """Train `student` further on `data`'s labeled examples with the refinement settings and `losses` (default
    `refine_losses(settings)`); returns the trainer. `teacher` is used only when one of the losses reads it."""
    losses = refine_losses(settings) if losses is None else losses
    settings = refine_config(settings, config, output_dir, losses)
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


#: What the refinement task's data keeps of the first stage's data settings: how examples are read and encoded.
CARRIED_DATA_SETTINGS = ("train_split", "text_column", "label_column", "image_column", "max_length", "processor",
                         "image_size")  # fmt: skip


def task_data_settings(settings: RefinementSettings, data: DataSettings) -> DataSettings:
    """The data settings of the refinement task: its data set, task and sample cap, the first stage's splits,
    columns and encoding, nothing of its transfer sets or augmentation."""
    settings = RefinementSettings.of(settings)
    carried = {name: getattr(DataSettings.of(data), name) for name in CARRIED_DATA_SETTINGS}
    return DataSettings(
        task=settings.task,
        dataset=settings.dataset,
        max_train_samples=settings.max_train_samples,
        teacher_max_train_samples=settings.max_train_samples,
        **carried,
    )


def refine_on_task(
    settings: RefinementSettings,
    data_settings: DataSettings,
    measurement: MeasurementSettings,
    config: DistillationConfig,
    distilled,
    undistilled,
) -> dict[str, dict[str, Any]]:
    """DistilBERT's flow, second stage: `distilled` (the general-distilled student) and `undistilled` (the same
    architecture from the teacher's layers, never distilled) each carried into `settings.task` and fine-tuned
    on `settings.dataset` the same way; their accuracy, size and latency on its held-out split."""
    settings, measurement = RefinementSettings.of(settings), MeasurementSettings.of(measurement)
    data = prepare_data(task_data_settings(settings, data_settings), config.seed)
    models = {}
    for name, model in (("distilled, then refined", distilled), ("refined without distillation", undistilled)):
        carried = carry_to_task(model, settings.task, data, config.seed)
        folder = os.path.join(config.output_dir, "checkpoints", "refine-" + name.split(",")[0].split()[0])
        models[name] = refine(carried, None, data, settings, config, folder).model
    results = {
        name: evaluate_model(model, data, config.per_device_eval_batch_size, name) for name, model in models.items()
    }
    batch_sizes, repeats = list(measurement.latency_batch_sizes), measurement.latency_repeats
    for name, description in describe_models(models, data, batch_sizes, repeats).items():
        results[name].update(description)
    return {"task": settings.task, "dataset": settings.dataset, "train_examples": len(data.train),
            "results": results, "models": models, "processor": data.processor}  # fmt: skip

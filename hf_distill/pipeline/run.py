"""The whole pipeline, stage by stage: data, teacher, student, distill, evaluate, report, save, push.

Run it from the command line (`hf-distill --recipe NAME`) or call `run_pipeline(args, config)`
from a notebook; each stage it calls is a public function of `hf_distill.pipeline`.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import time
from typing import Any

import torch
import transformers
from transformers import set_seed

from ..config import DistillationConfig
from ..losses import build_losses, needs_attention_maps
from ..quantization import to_int8
from ..teacher_sources import EMA_TEACHER
from . import causal, refinement
from .arguments import PipelineArguments, UsageError
from .data import PreparedData, fix_training_masks, prepare_data
from .evaluation import describe_models, evaluate_model
from .models import (
    build_student,
    distill,
    fresh_student,
    load_initial_teacher,
    prepare_teachers,
    shape_student,
    stage_args,
)
from .report import build_report, model_card, push_student, save_student, teacher_row, write_report
from .settings import CAUSAL_LM, StudentSettings, TeacherSettings
from .sources import check_model_source

logger = logging.getLogger(__name__)


def losses_with_layer_map(
    losses: dict[str, Any], layer_map: list[list[int]] | None, teacher: str | None = None
) -> dict[str, Any]:
    """Give `hidden_state` and `attention` terms without a `layer_map` the one the student was built with (from the
    teacher `teacher`, with several: terms that follow another teacher keep their own)."""
    if layer_map is None:
        return losses
    filled = copy.deepcopy(losses)
    for term, spec in filled.items():
        if teacher is not None and spec.get("teacher", teacher) != teacher:
            continue
        kind = spec.get("type", term)
        if kind == "hidden_state" and "layer_map" not in spec:
            spec["layer_map"] = layer_map
        elif kind == "attention" and "layer_map" not in spec:
            spec["layer_map"] = [pair for pair in layer_map if pair[0] > 0]  # blocks only, numbered from 1
    return filled


def born_again_losses(losses: dict[str, Any]) -> dict[str, Any]:
    """The losses of a born-again generation: the same terms, reading the one teacher (the generation before, of the
    student's own depth), so without `teacher` names; a hidden-state or attention term keeps a layer map only when it
    pairs the last layers ([[-1, -1]]), which holds between equal depths, and otherwise pairs layer by layer."""
    again = copy.deepcopy(losses)
    for spec in again.values():
        spec.pop("teacher", None)
        if spec.get("layer_map") not in (None, [[-1, -1]]):
            spec.pop("layer_map")
    return again


def make_student(settings: StudentSettings, teacher, data: PreparedData, seed: int, quantize: bool = True):
    """The student and its layer map: a fresh model from `config`, or one built from teacher layers (then
    narrowed, re-initialised or, when `quantize`, prepared for int8 by `shape_student`)."""
    args = StudentSettings.of(settings)
    if args.config is not None:
        return fresh_student(args.config, data, args.task, seed), None
    student, layer_map = build_student(teacher, layers=args.layers, num_layers=args.num_layers)
    return shape_student(student, args, data, seed, quantize), layer_map


def undistilled_student(
    student: StudentSettings, teachers: TeacherSettings, config: DistillationConfig, data, teacher, source, attention
):
    """The student as it is before any distillation, in floating point: the baseline's start, and in DistilBERT's
    flow the model refined without the distillation stage. Without the teacher means without what it learnt here
    too: a student built from teacher layers starts from the checkpoint's pretrained layers, not from the ones
    the teacher stage fine-tuned (`source`: where the teacher came from)."""
    if student.config is not None or source == teachers.teacher:
        initial = teacher  # a fresh student ignores it; an untouched checkpoint is the teacher itself
    else:
        initial = load_initial_teacher(teachers, config, data, attention)[0]
    set_seed(config.seed)
    return make_student(student, initial, data, config.seed, quantize=False)[0]


def is_teachers_shape(settings: StudentSettings, student, teacher) -> bool:
    """Whether the student is the teacher's own network (every layer, every unit, the teacher's weights): then
    the int8 student's baseline is the teacher quantized after training, with no training of its own."""
    return (
        settings.config is None
        and settings.width is None
        and settings.init == "teacher"
        and student.config.num_hidden_layers == teacher.config.num_hidden_layers
    )


def run_pipeline(args: PipelineArguments, config: DistillationConfig, recipe: str | None = None) -> dict[str, Any]:
    """Run every stage and return the report (also written to `<output_dir>/report.{json,md,png}`).

    Each stage receives its group of `args` ([`hf_distill.pipeline.settings`]); this function alone reads them all.
    """
    timings, started = {}, time.perf_counter()
    data_settings, teacher_settings = args.data_settings, args.teacher_settings
    student_settings, stage = args.student_settings, args.distillation_settings
    refining, measuring = args.refinement_settings, args.measurement_settings
    several = teacher_settings.teachers  # {name: path} with several teachers, else None

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        timings[stage] = round(now - since, 1)
        logger.info("Stage %s took %.1f s", stage, now - since)
        return now

    # Before any stage: a teacher or student that is not found is a usage error.
    for name, source in (several or {"": teacher_settings.teacher}).items():
        check_model_source(source, f"--teacher {name}=" if name else "--teacher")
    if isinstance(student_settings.config, str):
        check_model_source(student_settings.config, "--student_config")
    previous = os.path.join(config.output_dir, "report.json")
    if os.path.isfile(previous) and not args.overwrite_output_dir:
        raise UsageError(
            f"{config.output_dir} already holds a run ({previous}): pass --overwrite_output_dir true to replace its "
            "report and student (a teacher trained there is reused), or choose another --output_dir"
        )
    set_seed(config.seed)
    clock = time.perf_counter()
    data = prepare_data(
        data_settings, config.seed, word_replacement_dir=os.path.join(config.output_dir, "word-replacement")
    )
    clock = lap("data", clock)

    attention = "eager" if needs_attention_maps(build_losses(config.losses)) else None
    # A teacher with its own tokenizer trains on the same text in its tokens (`PreparedData.teacher_view`).
    prepared = prepare_teachers(teacher_settings, config, data.for_teacher(), attn_implementation=attention)
    teachers = {name: teacher for name, (teacher, _) in prepared.items()}
    # The first teacher is the one the student is built from (and the only one, usually).
    teacher, teacher_source = next(iter(prepared.values()))
    clock = lap("teacher", clock)

    set_seed(config.seed)
    student, layer_map = make_student(student_settings, teacher, data, config.seed)
    losses = losses_with_layer_map(config.losses, layer_map, next(iter(several)) if several else None)
    distill_config = stage_args(config, config.output_dir, losses=losses)
    clock = lap("student", clock)

    checkpoints = os.path.join(config.output_dir, "checkpoints", "distill")
    # A teacher cache holds the teacher's outputs for one masking of each example: fix it (same seed every run).
    distill_data = data if config.teacher_cache is None else fix_training_masks(data, config.seed)
    given = teachers if several else teacher
    if stage.ema_teacher:  # the student's own moving average, of its depth: layer maps as between equal depths
        given, losses = EMA_TEACHER, born_again_losses(config.losses)
        distill_config = stage_args(config, config.output_dir, losses=losses)
    trainer = distill(student, given, distill_data, distill_config, checkpoints, config.resume_from_checkpoint)
    clock = lap("distill", clock)

    models = {teacher_row(name, several): model for name, model in teachers.items()}
    # Born-again generations (Furlanello et al., 2018): each next student, of the same architecture, learns from the
    # one before, frozen; "student" is the last, earlier ones are reported as "generation k".
    for generation in range(2, stage.generations + 1):
        models[f"generation {generation - 1}"] = trainer.model
        set_seed(config.seed)
        fresh, _ = make_student(student_settings, teacher, data, config.seed)
        born_again = stage_args(config, config.output_dir, losses=born_again_losses(config.losses), teacher_cache=None)
        folder = os.path.join(config.output_dir, "checkpoints", f"generation-{generation}")
        trainer = distill(fresh, trainer.model, data, born_again, folder)
        clock = lap(f"generation {generation}", clock)
    int8 = student_settings.quantization == "int8"
    steps = {"student": trainer.state.global_step}
    if refining.on_the_same_task:  # refinement on the task labels, after distillation
        models["student before refinement"] = to_int8(trainer.model) if int8 else copy.deepcopy(trainer.model)
        refine_losses = losses_with_layer_map(refinement.refine_losses(refining), layer_map)
        folder = os.path.join(config.output_dir, "checkpoints", "refine")
        refined = refinement.refine(trainer.model, given, data, refining, config, folder, refine_losses)
        steps = {"student": steps["student"] + refined.state.global_step, "refinement": refined.state.global_step}
        clock = lap("refine", clock)
    # An int8 student is scored, timed and saved as the real int8 model, not the fake-quantized one it trained as.
    models["student"] = to_int8(trainer.model) if int8 else trainer.model
    if stage.baseline and int8 and is_teachers_shape(student_settings, trainer.model, teacher):
        models["baseline"], steps["baseline"] = to_int8(teacher), 0  # post-training quantization of the teacher
        clock = lap("baseline", clock)
    elif stage.baseline:
        # An int8 student's baseline trains in floating point and is quantized afterwards.
        baseline = undistilled_student(
            student_settings, teacher_settings, config, data, teacher, teacher_source, attention
        )
        # As many steps as the student took (refinement included): with a transfer set the student's epochs are
        # longer, and the baseline repeats its labeled examples to match.
        baseline_config = stage_args(
            config,
            config.output_dir,
            losses={"hard_label": {"weight": 1.0}},
            teacher_cache=None,
            max_steps=steps["student"],
            lmbda=0.0,  # the SFT baseline: the data's completions, never generated ones
            seq_kd=False,
        )
        baseline_trainer = distill(
            baseline,
            None,
            data,
            baseline_config,
            os.path.join(config.output_dir, "checkpoints", "baseline"),
            labeled_only=True,
        )
        models["baseline"] = to_int8(baseline_trainer.model) if int8 else baseline_trainer.model
        steps["baseline"] = baseline_trainer.state.global_step
        clock = lap("baseline", clock)

    batch_size = config.per_device_eval_batch_size
    views = {teacher_row(name, several): data.for_teacher() for name in teachers}  # each model's own tokens
    results = {
        name: evaluate_model(model, views.get(name, data), batch_size=batch_size, name=name)
        for name, model in models.items()
    }
    for name, description in describe_models(
        models, data, list(measuring.latency_batch_sizes), measuring.latency_repeats, measuring.latency_compiled,
        views,
    ).items():  # fmt: skip
        results[name].update(description)
    clock = lap("evaluate", clock)
    task_refinement = None
    if refining.on_another_task:  # DistilBERT's flow: general distillation here, then the labeled task
        undistilled = undistilled_student(
            student_settings, teacher_settings, config, data, teacher, teacher_source, attention
        )
        task_refinement = refinement.refine_on_task(
            refining, data_settings, measuring, config, trainer.model, undistilled
        )
        clock = lap("refine", clock)

    report = build_report(
        results,
        recipe=recipe,
        task=data_settings.task,
        teacher=teacher_settings.teacher,
        teacher_config=teacher_settings.teacher_config,
        teacher_used=teacher_source,
        teachers=None
        if not several
        else {name: {"given": several[name], "used": source} for name, (_, source) in prepared.items()},
        dataset=data_settings.dataset,
        train_examples=len(data.train),
        transfer_examples=data.transfer_examples,
        augmented_examples=data.augmented_examples,
        training_steps=steps,
        eval_examples=len(data.eval),
        generation_metric=causal.metric_name(data_settings.generation_metric, data_settings.dataset)
        if data_settings.task == CAUSAL_LM
        else None,
        completions={"lmbda": config.lmbda, "seq_kd": config.seq_kd} if config.lmbda > 0 or config.seq_kd else None,
        losses=losses,
        teacher_cache=config.teacher_cache,
        seed=config.seed,
        generations=stage.generations,
        ema_teacher=stage.ema_teacher,
        seeds_margin=measuring.seeds_margin,
        machine={
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        timings_s=timings,
    )
    if task_refinement is not None:
        report["refinement"] = {
            key: value for key, value in task_refinement.items() if key not in ("models", "processor")
        }
    classes = {row: type(model).__name__ for row, model in models.items()}
    card = model_card(report, recipe, data_settings.dataset, teacher_settings.teacher, losses, classes)
    student_dir = save_student(models["student"], data.processor, os.path.join(config.output_dir, "student"), card)
    if task_refinement is not None:
        refined = task_refinement["models"]["distilled, then refined"]
        report["refined_student_dir"] = save_student(
            refined, task_refinement["processor"], os.path.join(config.output_dir, "refined-student"), card
        )
    clock = lap("save", clock)
    if config.push_to_hub:
        repo_id = config.hub_model_id or os.path.basename(os.path.abspath(config.output_dir))
        report["pushed_to"] = push_student(
            student_dir, repo_id, token=config.hub_token, private=config.hub_private_repo
        )
        lap("push", clock)
    timings["total"] = round(time.perf_counter() - started, 1)
    report["student_dir"] = student_dir
    write_report(config.output_dir, report)
    return report

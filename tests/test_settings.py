"""The pipeline's settings grouped by stage: every flag has a home, and the stages read their group only."""

import ast
import dataclasses
from pathlib import Path

import pytest

from hf_distill.pipeline import PipelineArguments, prepare_data
from hf_distill.pipeline import settings as groups
from hf_distill.pipeline.refinement import task_data_settings

PIPELINE = Path(groups.__file__).parent
GROUPS = {
    "data_settings": groups.DataSettings,
    "teacher_settings": groups.TeacherSettings,
    "student_settings": groups.StudentSettings,
    "distillation_settings": groups.DistillationSettings,
    "refinement_settings": groups.RefinementSettings,
    "measurement_settings": groups.MeasurementSettings,
}
#: Flags that steer the run as a whole, read by `run_pipeline`, `run_seeds` or `run_student_kinds` themselves.
RUN_FLAGS = {"overwrite_output_dir", "seeds", "student_kinds", "student_kind_settings"}
#: The modules that orchestrate runs (and parse the command line): the only ones that may read PipelineArguments.
ORCHESTRATORS = {"arguments", "command_line", "run", "kinds", "seeds", "__init__", "settings"}


def flags_read(group) -> set[str]:
    return {group._flags.get(field.name, field.name) for field in dataclasses.fields(group)}


def test_every_flag_has_one_stage_or_is_a_run_setting():
    flags = {field.name for field in dataclasses.fields(PipelineArguments)}
    homes = {flag: [name for name, group in GROUPS.items() if flag in flags_read(group)] for flag in flags}
    homeless = sorted(flag for flag, names in homes.items() if not names and flag not in RUN_FLAGS)
    assert homeless == []
    # A flag is read by one stage, except what several stages must agree on: the task, and the teacher (whose
    # own tokenizer the data stage loads).
    shared = {flag: names for flag, names in homes.items() if len(names) > 1}
    assert set(shared) <= {"task", "teacher"}, shared


def test_the_groups_carry_the_flags_values():
    args = PipelineArguments(
        teacher="some/teacher",
        dataset="offline:rotten_tomatoes",
        word_replacement_mlm="teacher",
        teacher_num_train_epochs=2.0,
        student_num_layers=3,
        refine_epochs=1.0,
        refine_learning_rate=1e-4,
        latency_batch_sizes=[4],
        baseline=True,
    )
    data = args.data_settings
    assert (data.word_replacement_mlm, data.processor) == ("some/teacher", "some/teacher")  # 'teacher' resolved
    assert args.teacher_settings.num_train_epochs == 2.0 and args.student_settings.num_layers == 3
    assert args.refinement_settings.on_the_same_task and not args.refinement_settings.on_another_task
    assert args.refinement_settings.learning_rate == 1e-4
    assert args.measurement_settings.latency_batch_sizes == (4,) and args.distillation_settings.baseline
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.dataset = "other"  # a stage cannot change what another reads
    # A stage called with the whole arguments (as notebooks do) takes its group from them.
    assert groups.DataSettings.of(args) == data and groups.DataSettings.of(data) is data
    with pytest.raises(TypeError, match="expected TeacherSettings"):
        groups.TeacherSettings.of(data)


def test_refinement_data_keeps_the_encoding_and_drops_the_first_stages_extras():
    args = PipelineArguments(
        teacher="t",
        dataset="first",
        dataset_config_name="cfg",
        eval_split="validation",
        text_column="sentence",
        max_length=64,
        max_train_samples=10,
        max_eval_samples=5,
        transfer_dataset="more",
        refine_dataset="second",
        refine_epochs=1.0,
        refine_max_train_samples=7,
    )
    data = task_data_settings(args.refinement_settings, args.data_settings)
    assert (data.task, data.dataset, data.text_column, data.max_length) == (
        "text-classification",
        "second",
        "sentence",
        64,
    )
    assert (data.max_train_samples, data.teacher_max_train_samples) == (7, 7)
    assert (data.dataset_config_name, data.eval_split, data.max_eval_samples, data.transfer_dataset) == (None,) * 4


def test_a_word_replacement_teacher_without_a_checkpoint_is_refused_with_the_arguments():
    with pytest.raises(ValueError, match="no masked-LM head"):
        PipelineArguments(
            teacher_config={"model_type": "bert"}, processor="tok", dataset="d", word_replacement_mlm="teacher"
        )


def test_only_the_run_orchestrators_read_the_whole_arguments():
    readers = []
    for path in PIPELINE.glob("*.py"):
        if path.stem in ORCHESTRATORS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(node, ast.Name) and node.id == "PipelineArguments" for node in ast.walk(tree)):
            readers.append(path.stem)
        if any(isinstance(node, ast.alias) and node.name == "PipelineArguments" for node in ast.walk(tree)):
            readers.append(path.stem)
    assert readers == []


def test_prepare_data_takes_its_group_or_the_whole_arguments(tmp_path):
    from pipeline_assets import write_encoder_teacher, write_sentiment_dataset

    teacher = write_encoder_teacher(str(tmp_path / "teacher"))
    args = PipelineArguments(teacher=teacher, dataset=write_sentiment_dataset(str(tmp_path / "data")))
    from_group, from_args = prepare_data(args.data_settings, seed=1), prepare_data(args, seed=1)
    assert from_group.settings == args.data_settings
    assert from_group.train["input_ids"] == from_args.train["input_ids"]

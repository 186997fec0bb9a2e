"""What a user meets when something is off: a notebook cell run twice, a report whose ratio is undefined."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_distill import DistillationLoss, register_loss
from hf_distill.losses import available_losses
from hf_distill.losses.base import build_loss
from hf_distill.pipeline import report


def define(scale: float):
    """The same class statement each call, as a notebook cell that is run again (same module, same name)."""

    class NotebookLoss(DistillationLoss):
        student_outputs = teacher_outputs = frozenset({"logits"})

        def forward(self, student_outputs, teacher_outputs, inputs):
            return scale * (student_outputs.logits - teacher_outputs.logits).pow(2).sum()

    return NotebookLoss


def test_a_loss_registered_again_from_the_same_place_replaces_the_old_one_with_a_warning():
    first = register_loss("reliability_notebook_loss")(define(1.0))
    with pytest.warns(UserWarning, match="registered again"):
        second = register_loss("reliability_notebook_loss")(define(2.0))
    assert second is not first and "reliability_notebook_loss" in available_losses()
    _, loss = build_loss("reliability_notebook_loss", {})
    assert type(loss) is second


def test_another_class_under_a_taken_name_is_still_refused():
    class Other(DistillationLoss):
        def forward(self, student_outputs, teacher_outputs, inputs):
            return 0.0

    with pytest.raises(ValueError, match="a loss named 'soft_target' is already registered"):
        register_loss("soft_target")(Other)


def test_an_undefined_ratio_is_null_in_the_json_and_explained_in_the_report(tmp_path):
    results = {
        name: {"accuracy": accuracy, "parameters": 10, "size_bytes": 40, "latency_ms_batch_1": 1.0}
        for name, accuracy in (("teacher", 0.7), ("student", 0.72), ("baseline", 0.7))
    }
    built = report.build_report(results, task="text-classification", seeds_margin=None)
    assert math.isnan(built["summary"]["gap_closure"])  # the teacher and the baseline score alike
    report.write_report_files(tmp_path, built, report.report_lines(built), lambda path: open(path, "wb").close())

    def refuse(constant):
        raise AssertionError(f"{constant} in report.json")

    saved = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert saved["summary"]["gap_closure"] is None
    text = (tmp_path / "report.md").read_text()
    assert "gap closure ((student - baseline) / (teacher - baseline)): undefined (the teacher and the baseline" in text
    assert "nan" not in text.lower()


def cli_error(capsys, argv) -> str:
    """What `hf-distill argv` prints when it refuses: one line on stderr, exit status 2, nothing else."""
    from hf_distill.cli import main

    assert main(argv) == 2
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-distill: error: "), printed.err
    assert "Traceback" not in printed.err and "usage:" not in printed.out + printed.err
    return lines[0]


def test_a_misspelt_flag_names_the_nearest_one(capsys):
    line = cli_error(capsys, ["--recipe", "minilm-rotten-tomatoes", "--learnig_rate", "1e-4"])
    assert "unknown flags ['--learnig_rate']" in line and "did you mean --learning_rate or" in line


def test_a_value_of_the_wrong_type_names_its_flag_or_its_recipe_file(capsys, tmp_path):
    line = cli_error(capsys, ["--recipe", "minilm-rotten-tomatoes", "--student_num_layers", "three"])
    assert "argument --student_num_layers" in line and "invalid int value: 'three'" in line
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("teacher: offline:minilm-l6\ndataset: offline:rotten_tomatoes\nstudent_num_layers: three\n")
    line = cli_error(capsys, ["--recipe", str(recipe)])
    assert f"recipe {recipe}: student_num_layers: invalid int value: 'three'" in line


def test_an_unknown_recipe_or_recipe_key_names_the_nearest(capsys, tmp_path):
    line = cli_error(capsys, ["--recipe", "minilm-rotten-tomato"])
    assert "unknown recipe 'minilm-rotten-tomato' (did you mean minilm-rotten-tomatoes" in line
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("teacher: offline:minilm-l6\ndataset: offline:rotten_tomatoes\nlearnig_rate: 0.1\n")
    line = cli_error(capsys, ["--recipe", str(recipe)])
    assert "unknown keys ['learnig_rate']; learnig_rate (did you mean learning_rate or" in line


@pytest.mark.parametrize(
    "teacher, message",
    [
        ("./no-such-teacher", "--teacher './no-such-teacher': there is no such folder here; give the path"),
        ("my-teacher", "--teacher 'my-teacher': there is no such folder here, and the Hub lookup is off"),
    ],
)
def test_a_teacher_that_is_neither_here_nor_reachable_is_one_line_before_any_stage(capsys, tmp_path, teacher, message):
    argv = ["--recipe", "minilm-rotten-tomatoes", "--teacher", teacher, "--output_dir", str(tmp_path / "run")]
    assert message in cli_error(capsys, argv)
    assert not (tmp_path / "run").exists()  # refused before the data stage wrote anything


def test_a_folder_that_holds_a_run_is_refused_unless_told_to_overwrite(capsys, tmp_path):
    (tmp_path / "report.json").write_text("{}")
    line = cli_error(capsys, ["--recipe", "minilm-rotten-tomatoes", "--output_dir", str(tmp_path)])
    assert "already holds a run" in line and "--overwrite_output_dir true" in line


def test_an_empty_teacher_cache_path_is_refused_by_name():
    from hf_distill import DistillationConfig

    with pytest.raises(ValueError, match="teacher_cache is an empty path"):
        DistillationConfig(output_dir="out", teacher_cache="", use_cpu=True)


def test_on_a_cpu_under_bf16_the_teacher_keeps_its_weights_and_computes_in_bf16(tmp_path):
    from helpers import bert_classifier, config, text_dataset

    from hf_distill import DistillationTrainer

    teacher = bert_classifier(seed=1)
    seen = []
    teacher.classifier.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))
    trainer = DistillationTrainer(
        model=bert_classifier(seed=2, layers=2),
        teacher_model=teacher,
        args=config(tmp_path, {"soft_target": {}}, bf16=True, max_steps=1),
        train_dataset=text_dataset(8),
    )
    trainer.train()
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    assert seen == [torch.bfloat16]


def objective_trainer(output_dir, losses, **settings):
    from helpers import bert_classifier, config, text_dataset

    from hf_distill import DistillationTrainer

    return DistillationTrainer(
        model=bert_classifier(seed=2, layers=2, width=8, heads=2),
        teacher_model=bert_classifier(seed=1),
        args=config(output_dir, losses, save_strategy="steps", save_steps=2, **settings),
        train_dataset=text_dataset(16),
    )


WRITTEN_WITH = {"soft_target": {"weight": 1.0, "temperature": 2.0}, "hidden_state": {"weight": 1.0}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint at step 2 of a run with a soft target at T = 2 and a projected hidden-state term."""
    output = tmp_path_factory.mktemp("objective")
    objective_trainer(output, WRITTEN_WITH, max_steps=2).train()
    return output / "checkpoint-2"


@pytest.mark.parametrize(
    "losses, expected",
    [
        (
            {"soft_target": {"weight": 0.5, "temperature": 8.0}, "hidden_state": {"weight": 1.0}},
            ["losses['soft_target']['temperature']: 2.0 in the checkpoint, 8.0 now",
             "losses['soft_target']['weight']: 1.0 in the checkpoint, 0.5 now"],
        ),
        (
            {"soft_target": {"weight": 1.0, "temperature": 2.0}, "last": {"type": "hidden_state", "weight": 1.0}},
            ["losses['hidden_state']: {'weight': 1.0} in the checkpoint, absent now",
             "losses['last']: absent in the checkpoint, {'type': 'hidden_state', 'weight': 1.0} now"],
        ),
        (
            {**WRITTEN_WITH, "hidden_state": {"weight": 1.0, "layer_map": [[2, 4]]}},
            ["losses['hidden_state']['layer_map']: absent in the checkpoint, [[2, 4]] now"],
        ),
    ],
)  # fmt: skip
def test_resuming_with_another_objective_is_refused_naming_each_change(tmp_path, checkpoint, losses, expected):
    from hf_distill.objective import OBJECTIVE_NAME

    assert (checkpoint / OBJECTIVE_NAME).is_file()
    resumed = objective_trainer(tmp_path, losses, max_steps=4)
    with pytest.raises(ValueError, match="written with another objective") as refused:
        resumed.train(resume_from_checkpoint=str(checkpoint))
    for change in expected:
        assert change in str(refused.value)
    assert "resume_with_changed_objective=True" in str(refused.value)
    assert resumed.state.global_step == 0  # refused before any step


def test_a_changed_objective_on_purpose_loads_what_still_fits_and_names_the_rest(tmp_path, checkpoint, caplog):
    from safetensors.torch import load_file

    # Without the hidden-state term there is no projector: the optimizer's group for it does not fit.
    losses = {"soft_target": {"weight": 1.0, "temperature": 4.0}}
    resumed = objective_trainer(tmp_path, losses, max_steps=4, resume_with_changed_objective=True)
    starts = []
    resumed.add_callback(StudentAtStart(starts))
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    saved = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(starts[0][key], saved[key]) for key in saved)  # the student resumed from the checkpoint
    logged = caplog.text
    assert "losses['soft_target']['temperature']: 2.0 in the checkpoint, 4.0 now" in logged
    assert "The optimizer and scheduler start afresh" in logged


class StudentAtStart(__import__("transformers").TrainerCallback):
    """Keeps the student's weights when training begins (after a checkpoint is loaded)."""

    def __init__(self, kept):
        self.kept = kept

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.kept.append({key: value.detach().clone() for key, value in model.state_dict().items()})


@pytest.fixture
def built_cache(tmp_path):
    """A finished teacher cache of 32 classification examples, in shards of 16."""
    from helpers import bert_classifier, config, text_dataset

    from hf_distill import DistillationTrainer

    class SmallShards(DistillationTrainer):
        teacher_cache_shard_size = 16

    directory = tmp_path / "cache"
    SmallShards(
        model=bert_classifier(seed=2, layers=2),
        teacher_model=bert_classifier(seed=1),
        args=config(tmp_path / "build", {"soft_target": {}}, teacher_cache=str(directory)),
        train_dataset=text_dataset(32),
    )
    return directory


def trainer_from_cache(tmp_path, directory, **settings):
    from helpers import bert_classifier, config, text_dataset

    from hf_distill import DistillationTrainer

    return DistillationTrainer(
        model=bert_classifier(seed=2, layers=2),
        args=config(tmp_path / "read", {"soft_target": {}}, teacher_cache=str(directory), **settings),
        train_dataset=text_dataset(32),
    )


def overwrite_logits(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors["logits"] = torch.full_like(tensors["logits"], 3.0)  # finite, plausible, wrong
    save_file(tensors, path)


def flip_one_byte(path):
    with open(path, "r+b") as handle:
        handle.seek(-3, 2)
        byte = handle.read(1)
        handle.seek(-3, 2)
        handle.write(bytes([byte[0] ^ 0x01]))


def truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(40)


@pytest.mark.parametrize(
    "damage, message",
    [
        (overwrite_logits, "does not hold the bytes it was written with"),
        (flip_one_byte, "does not hold the bytes it was written with"),
        (truncate, "is not a whole safetensors file"),
        (lambda path: path.unlink(), "is missing"),
    ],
)
def test_a_damaged_shard_is_an_error_naming_it_before_any_step(tmp_path, built_cache, damage, message):
    shard = built_cache / "shard-000000000-000000016.safetensors"
    damage(shard)
    with pytest.raises(ValueError, match=message) as refused:
        trainer_from_cache(tmp_path, built_cache)
    assert str(shard) in str(refused.value) and "the build resumes" in str(refused.value)


def test_a_damaged_later_shard_is_caught_before_its_examples_are_read_and_by_verify(tmp_path, built_cache):
    from hf_distill.cache import TeacherCache

    overwrite_logits(built_cache / "shard-000000016-000000032.safetensors")
    trainer = trainer_from_cache(tmp_path, built_cache)  # the first shard, checked at construction, is intact
    with pytest.raises(ValueError, match="shard-000000016-000000032.safetensors does not hold the bytes"):
        trainer.train()
    with pytest.raises(ValueError, match="shard-000000016-000000032"):
        TeacherCache(str(built_cache)).verify()
    with pytest.raises(ValueError, match="shard-000000016-000000032"):
        trainer_from_cache(tmp_path / "again", built_cache, teacher_cache_verify=True)


def test_a_damaged_record_is_an_error_naming_it(tmp_path, built_cache):
    record = built_cache / "cache.json"
    record.write_text(record.read_text() + "}")
    with pytest.raises(ValueError, match=f"{record} is not valid JSON"):
        trainer_from_cache(tmp_path, built_cache)


@pytest.mark.parametrize("task", ["classifier", "masked-lm"])
def test_with_dropout_a_cache_reproduces_online_training(tmp_path, task):
    """Building the models' probes and the cache draws nothing from the streams dropout and shuffling use."""
    from helpers import bert_classifier, bert_masked_lm, config, masked_lm_dataset, text_dataset

    from hf_distill import DistillationTrainer

    dropout = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    if task == "classifier":
        make = lambda seed, **c: bert_classifier(seed, **dropout, **c)  # noqa: E731
        data, losses = text_dataset(24), {"soft_target": {}, "hard_label": {}, "hidden_state": {}}
    else:
        make = lambda seed, **c: bert_masked_lm(seed, **dropout, **c)  # noqa: E731
        data, losses = masked_lm_dataset(24), {"soft_target": {}, "hard_label": {}}
    runs = {}
    for name, cache in (("online", None), ("building", "cache"), ("reading", "cache")):
        trainer = DistillationTrainer(
            model=make(2, layers=2, width=8, heads=2),
            teacher_model=None if name == "reading" else make(1),
            args=config(
                tmp_path / name,
                losses,
                max_steps=4,
                teacher_cache=cache and str(tmp_path / cache),
                teacher_cache_top_k=0,
            ),  # fmt: skip
            train_dataset=data,
        )
        trainer.train()
        runs[name] = trainer
    logs = {name: [log for log in run.state.log_history if "loss" in log] for name, run in runs.items()}
    for name in ("building", "reading"):
        for expected, actual in zip(logs["online"], logs[name], strict=True):
            for term in (*losses, "loss"):
                assert actual[term] == pytest.approx(expected[term], rel=1e-6, abs=1e-6), (name, term)
        for key, value in runs["online"].model.state_dict().items():
            torch.testing.assert_close(runs[name].model.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("dataset", ["./no-such-data", "someone/no-such-data"])
def test_a_data_set_that_is_neither_here_nor_reachable_is_one_line(capsys, tmp_path, dataset):
    from pipeline_assets import write_encoder_teacher

    teacher = write_encoder_teacher(str(tmp_path / "encoder"))
    capsys.readouterr()  # what writing the teacher printed
    argv = ["--recipe", "minilm-rotten-tomatoes", "--teacher", teacher, "--dataset", dataset,
            "--output_dir", str(tmp_path / "run")]  # fmt: skip
    line = cli_error(capsys, argv)
    assert f"could not load the data set {dataset!r}" in line and "the Hub lookup is off" in line


def test_after_damage_a_rebuild_keeps_the_intact_shards_and_rebuilds_the_rest(tmp_path, built_cache, caplog):
    from helpers import bert_classifier, config, text_dataset
    from safetensors.torch import load_file

    from hf_distill import DistillationTrainer

    first, second = (built_cache / f"shard-{a:09d}-{b:09d}.safetensors" for a, b in ((0, 16), (16, 32)))
    intact, original = first.read_bytes(), load_file(second)
    overwrite_logits(second)
    with pytest.raises(ValueError, match=r"Delete .*cache.json and build again .*: the build resumes") as refused:
        trainer_from_cache(tmp_path, built_cache, teacher_cache_verify=True)
    assert str(second) in str(refused.value)
    (built_cache / "cache.json").unlink()  # as the message says
    with caplog.at_level("INFO"):
        DistillationTrainer(
            model=bert_classifier(seed=2, layers=2),
            teacher_model=bert_classifier(seed=1),
            args=config(
                tmp_path / "rebuild", {"soft_target": {}}, teacher_cache=str(built_cache), teacher_cache_verify=True
            ),  # fmt: skip
            train_dataset=text_dataset(32),
        )
    assert "Resuming the teacher cache" in caplog.text and "at example 16 of 32" in caplog.text
    assert first.read_bytes() == intact  # kept as it was
    for name, tensor in load_file(second).items():  # rebuilt: the teacher's outputs again
        torch.testing.assert_close(tensor, original[name], msg=name)

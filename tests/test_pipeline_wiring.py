"""The pipeline's wiring, checked by what each stage is handed: which weights each model starts from, which model
teaches which, and that what the report says of the saved student is what the student does.

Every call of the training stage (`hf_distill.pipeline.distill`, from the run and from refinement) is recorded with
the weights of its student and teacher as they arrive and of the student as it leaves.
"""

from __future__ import annotations

import os

import pytest
import torch
from datasets import load_from_disk
from pipeline_assets import write_encoder_teacher, write_masked_lm_teacher, write_sentiment_dataset, write_text_files
from safetensors.torch import load_file
from test_pipeline import FAST, run
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from hf_distill import DistillationTrainer
from hf_distill.pipeline import models as pipeline_models
from hf_distill.pipeline import refinement
from hf_distill.pipeline import run as pipeline_run


def weights(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def record_stages(monkeypatch) -> list[dict]:
    """Each call of the training stage, in order: where it trains, what it was given and what it returned."""
    calls, real = [], pipeline_models.distill

    def recording(student, teacher, data, config, output_dir, resume_from_checkpoint=None, labeled_only=False):
        call = {"folder": os.path.basename(output_dir), "student_start": weights(student), "teacher": teacher,
                "teacher_start": weights(teacher) if isinstance(teacher, torch.nn.Module) else None}  # fmt: skip
        trainer = real(student, teacher, data, config, output_dir, resume_from_checkpoint, labeled_only)
        call.update(trainer=trainer, student_end=weights(trainer.model))
        calls.append(call)
        return trainer

    for module in (pipeline_run, refinement):  # each holds the stage under its own name
        monkeypatch.setattr(module, "distill", recording)
    return calls


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"{what}: {key}"


def layers_of(state: dict[str, torch.Tensor], prefix: str, layers: list[int]) -> dict[str, torch.Tensor]:
    """The embeddings and the listed encoder layers of `state` (keys under `prefix`), renumbered 0, 1, ..."""
    picked = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if rest.startswith("embeddings."):
            picked[rest] = value
        elif rest.startswith("encoder.layer."):
            index, tail = rest[len("encoder.layer.") :].split(".", 1)
            if int(index) in layers:
                picked[f"encoder.layer.{layers.index(int(index))}.{tail}"] = value
    return picked


SENTIMENT = ["--recipe", "minilm-rotten-tomatoes", "--student_layers", "0", "3", "--max_train_samples", "24",
             "--teacher_max_train_samples", "24", *FAST]  # fmt: skip


@pytest.fixture(scope="module")
def sentiment_runs(tmp_path_factory):
    """Two runs into one folder: the first trains the headless encoder's teacher, distils two born-again
    generations and a baseline; the second reuses the saved teacher."""
    root = tmp_path_factory.mktemp("wiring")
    encoder = write_encoder_teacher(str(root / "encoder"))
    data = write_sentiment_dataset(str(root / "data"))
    output = str(root / "run")
    common = ["--teacher", encoder, "--dataset", data, "--output_dir", output, *SENTIMENT]
    runs = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = record_stages(monkeypatch)
        report, _ = run([*common, "--generations", "2", "--baseline", "true"])
        runs["first"] = (report, list(calls))
        calls.clear()
        report, _ = run([*common, "--baseline", "false", "--overwrite_output_dir", "true"])
        runs["second"] = (report, list(calls))
    return {"encoder": encoder, "data": data, "output": output, **runs}


def test_the_baseline_starts_from_the_checkpoint_and_the_student_from_the_trained_teacher(sentiment_runs):
    _, calls = sentiment_runs["first"]
    assert [call["folder"] for call in calls] == ["distill", "generation-2", "baseline"]
    checkpoint = load_file(os.path.join(sentiment_runs["encoder"], "model.safetensors"))
    trained_teacher = load_file(os.path.join(sentiment_runs["output"], "teacher", "model.safetensors"))
    from_checkpoint = layers_of({f"bert.{key}": value for key, value in checkpoint.items()}, "bert.", [0, 3])
    from_trained = layers_of(trained_teacher, "bert.", [0, 3])
    # The teacher stage moved every layer the student takes, so the two starts are told apart.
    assert all(not torch.equal(from_trained[key], value) for key, value in from_checkpoint.items() if "layer." in key)
    baseline, student = calls[2], calls[0]
    assert baseline["teacher"] is None
    assert_same(layers_of(baseline["student_start"], "bert.", [0, 1]), from_checkpoint, "baseline start")
    assert_same(layers_of(student["student_start"], "bert.", [0, 1]), from_trained, "student start")
    # The student also starts with the trained teacher's task head (the baseline's is new).
    for key in ("classifier.weight", "classifier.bias"):
        assert torch.equal(student["student_start"][key], trained_teacher[key])


def test_generation_two_learns_from_generation_one_as_trained_and_starts_where_it_did(sentiment_runs):
    report, calls = sentiment_runs["first"]
    first, second = calls[0], calls[1]
    assert second["teacher"] is first["trainer"].model
    assert_same(second["teacher_start"], first["student_end"], "generation 2's teacher")
    assert any(not torch.equal(first["student_end"][k], v) for k, v in first["student_start"].items())
    assert_same(second["student_start"], first["student_start"], "generation 2's start")
    assert report["results"]["generation 1"]["parameters"] == report["results"]["student"]["parameters"]


def test_a_teacher_loaded_from_its_folder_is_the_saved_one_tensor_for_tensor(sentiment_runs):
    report, calls = sentiment_runs["second"]
    folder = os.path.join(sentiment_runs["output"], "teacher")
    assert report["teacher_used"] == folder
    assert_same(calls[0]["teacher_start"], load_file(os.path.join(folder, "model.safetensors")), "loaded teacher")
    first_report, first_calls = sentiment_runs["first"]
    assert_same(calls[0]["teacher_start"], first_calls[0]["teacher_start"], "the teacher the first run trained")
    assert report["results"]["teacher"]["accuracy"] == first_report["results"]["teacher"]["accuracy"]


def test_the_reported_accuracy_is_that_of_the_saved_student_evaluated_independently(sentiment_runs):
    report, _ = sentiment_runs["second"]
    folder = os.path.join(sentiment_runs["output"], "student")
    student = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    held_out = load_from_disk(sentiment_runs["data"])["test"]
    hits = 0
    with torch.no_grad():
        for example in held_out:  # one at a time: no padding, no collator
            logits = student(**tokenizer(example["text"], return_tensors="pt")).logits
            hits += int(logits.argmax(-1).item() == example["label"])
    assert report["eval_examples"] == len(held_out) == 12
    assert report["results"]["student"]["accuracy"] == hits / len(held_out)


class RecordingTrainer(DistillationTrainer):
    """Keeps the student's parameters after every optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.student_after_steps = []
        trainer = self

        class Keep(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                trainer.student_after_steps.append(
                    {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
                )

        self.add_callback(Keep())


def test_the_moving_average_teacher_is_the_average_of_the_students_steps(tmp_path, monkeypatch):
    momentum = 0.9
    calls = record_stages(monkeypatch)
    monkeypatch.setattr(pipeline_models, "DistillationTrainer", RecordingTrainer)
    run(["--teacher", write_encoder_teacher(str(tmp_path / "encoder")), "--dataset",
         write_sentiment_dataset(str(tmp_path / "data")), "--output_dir", str(tmp_path / "run"), *SENTIMENT,
         "--baseline", "false", "--ema_teacher", "true", "--ema_momentum", str(momentum)])  # fmt: skip
    (call,) = calls
    assert call["teacher"] == "ema"
    trainer = call["trainer"]
    steps = trainer.student_after_steps
    assert len(steps) == trainer.state.global_step == 3
    average = {name: value.clone() for name, value in call["student_start"].items() if name in steps[0]}
    for after in steps:
        for name in average:
            average[name] = momentum * average[name] + (1 - momentum) * after[name]
    teacher = dict(trainer.teachers["teacher"].reference.named_parameters())
    for name, value in average.items():
        torch.testing.assert_close(teacher[name].detach(), value, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.allclose(teacher[name], steps[-1][name]) for name in average)  # not the student itself


def test_the_distilbert_flows_arms_start_from_the_distilled_student_and_from_the_teachers_layers(
    tmp_path, monkeypatch
):
    teacher = write_masked_lm_teacher(str(tmp_path / "teacher"), layers=4)
    calls = record_stages(monkeypatch)
    run(["--recipe", "distilbert", "--teacher", teacher, "--dataset", write_text_files(str(tmp_path / "text")),
         "--output_dir", str(tmp_path / "run"), "--student_layers", "0", "3", "--max_length", "16",
         "--gradient_accumulation_steps", "1", "--baseline", "false",
         "--refine_dataset", write_sentiment_dataset(str(tmp_path / "reviews")), "--refine_epochs", "1",
         "--refine_max_train_samples", "24", *FAST])  # fmt: skip
    general, distilled_arm, undistilled_arm = calls
    assert [call["folder"] for call in calls] == ["distill", "refine-distilled", "refine-refined"]
    assert distilled_arm["teacher"] is None and undistilled_arm["teacher"] is None
    # The carried weights: the general-distilled student's, as it left its stage; and the teacher's layers 0 and 3.
    distilled = layers_of(general["student_end"], "bert.", [0, 1])
    assert_same(layers_of(distilled_arm["student_start"], "bert.", [0, 1]), distilled, "distilled arm")
    original = layers_of(load_file(os.path.join(teacher, "model.safetensors")), "bert.", [0, 3])
    assert_same(layers_of(undistilled_arm["student_start"], "bert.", [0, 1]), original, "undistilled arm")
    assert any(not torch.equal(distilled[key], original[key]) for key in original)

"""Refinement after distillation: on the same task (before and after in the report), and DistilBERT's flow."""

from __future__ import annotations

import os

import pytest
from pipeline_assets import write_masked_lm_teacher, write_sentiment_dataset, write_text_files
from test_pipeline import FAST, read_card, run, tiny_sentiment_run
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from hf_distill.losses import reads_teacher
from hf_distill.pipeline import PipelineArguments, refinement


def test_refinement_on_the_same_task_reports_the_student_before_and_after(tmp_path):
    losses = '{"hard_label": {"weight": 1.0}, "soft_target": {"weight": 1.0, "temperature": 2.0}}'
    result, output = tiny_sentiment_run(
        tmp_path, "--refine_epochs", "2", "--refine_learning_rate", "1e-4", "--refine_losses", losses,
        "--baseline", "true",
    )  # fmt: skip
    rows = result["results"]
    assert list(rows) == ["teacher", "student before refinement", "student", "baseline"]
    steps = result["training_steps"]
    # 24 labeled snippets in batches of 8: 3 steps an epoch, 1 epoch distilling and 2 refining; the baseline as many.
    assert (steps["refinement"], steps["student"], steps["baseline"]) == (6, 9, 9)
    markdown = open(os.path.join(output, "report.md")).read()
    assert "| student before refinement |" in markdown and "trained 6 more steps on the labels" in markdown


def test_refinement_reads_the_teacher_only_when_a_loss_does(tmp_path, monkeypatch):
    given = []
    original = refinement.refine

    def spy(student, teacher, *args, **kwargs):
        given.append(teacher)
        return original(student, teacher, *args, **kwargs)

    monkeypatch.setattr(refinement, "refine", spy)
    tiny_sentiment_run(tmp_path, "--refine_epochs", "1")
    assert given and given[0] is not None  # the run's teacher is handed over; hard_label alone never reads it
    settings = refinement.refine_config(
        PipelineArguments(teacher="t", dataset="d", refine_epochs=1),
        _config(tmp_path),
        str(tmp_path),
        refinement.HARD_LABELS_ONLY,
    )
    assert settings.num_train_epochs == 1 and settings.teacher_cache is None
    assert not reads_teacher({"hard_label": {"weight": 1.0}})
    assert reads_teacher({"soft_target": {"weight": 1.0}})


def _config(tmp_path):
    from helpers import config

    return config(tmp_path, learning_rate=3e-4)


def test_distilbert_flow_general_distillation_then_the_labeled_task(tmp_path):
    teacher = write_masked_lm_teacher(str(tmp_path / "teacher"), layers=4)
    files = write_text_files(str(tmp_path / "text"))
    reviews = write_sentiment_dataset(str(tmp_path / "reviews"))
    output = str(tmp_path / "run")
    result, _ = run(["--recipe", "distilbert", "--teacher", teacher, "--dataset", files, "--output_dir", output,
                     "--student_layers", "0", "3", "--max_length", "16", "--gradient_accumulation_steps", "1",
                     "--baseline", "false", "--refine_dataset", reviews, "--refine_epochs", "2",
                     "--refine_max_train_samples", "24", *FAST])  # fmt: skip
    stage = result["refinement"]
    assert stage["task"] == "text-classification" and stage["train_examples"] == 24
    assert list(stage["results"]) == ["distilled, then refined", "refined without distillation"]
    for row in stage["results"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["latency_ms_batch_1"] > 0
    # The general-distilled student stays a masked LM; the refined one is a classifier with its layers.
    assert AutoModelForMaskedLM.from_pretrained(os.path.join(output, "student")).config.num_hidden_layers == 2
    refined = AutoModelForSequenceClassification.from_pretrained(os.path.join(output, "refined-student"))
    assert refined.config.num_hidden_layers == 2 and refined.config.id2label == {0: "bad", 1: "good"}
    markdown = open(os.path.join(output, "report.md")).read()
    assert "## Refinement on reviews (text-classification, 24 labeled examples)" in markdown
    assert "| refined without distillation |" in markdown
    front_matter, _ = read_card(os.path.join(output, "refined-student"))
    assert set(front_matter["hf_distill"]["refinement"]["accuracy"]) == set(stage["results"])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"refine_epochs": -1}, "refine_epochs must be >= 0"),
        ({"refine_dataset": "d2"}, "needs --refine_epochs > 0"),
        ({"refine_dataset": "d2", "refine_epochs": 1, "refine_task": "masked-lm"}, "refine_task must be"),
        (
            {"refine_dataset": "d2", "refine_epochs": 1, "refine_losses": {"soft_target": {"weight": 1.0}}},
            "only terms that read no teacher",
        ),
        ({"refine_losses": "hard"}, "refine_losses must be a mapping"),
    ],
)
def test_refinement_that_cannot_apply_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        PipelineArguments(teacher="t", dataset="d", **settings)

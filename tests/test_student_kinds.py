"""The pipeline's student kinds: narrower (pruned from the teacher or random), and int8 (quantization-aware)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from test_pipeline import tiny_sentiment_run
from transformers import AutoModelForSequenceClassification

from hf_distill.pipeline import PipelineArguments
from hf_distill.pipeline import models as pipeline_models

# Only the int8 students need torchao (the `quantization` extra); width, initialisation and refusals do not.
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="int8 students need torchao")

WIDTH_8 = ["--student_width", '{"hidden_size": 8, "intermediate_size": 16}']


def test_a_width_pruned_student_and_its_baseline_have_the_pruned_widths(tmp_path, monkeypatch):
    ranked = []
    importance = pipeline_models.width_importance
    monkeypatch.setattr(
        pipeline_models,
        "width_importance",
        lambda model, batches: ranked.append(batches) or importance(model, batches),
    )
    result, output = tiny_sentiment_run(tmp_path, *WIDTH_8, "--calibration_examples", "10", "--baseline", "true")
    student = AutoModelForSequenceClassification.from_pretrained(os.path.join(output, "student"))
    assert (student.config.hidden_size, student.config.num_attention_heads, student.config.intermediate_size) == (
        8,
        2,
        16,
    )
    assert student.config.num_hidden_layers == 2
    rows = result["results"]
    assert rows["student"]["parameters"] == rows["baseline"]["parameters"] < rows["teacher"]["parameters"] / 2
    # Ranked once for the student and once for the baseline, each on the first 10 training examples.
    assert [sum(len(batch["input_ids"]) for batch in batches) for batches in ranked] == [10, 10]
    assert result["losses"]["hidden_state"]["layer_map"]  # the layers' pairs still hold; projectors bridge 8 -> 16


def test_random_initialisation_gives_the_same_shape_without_the_teachers_weights(tmp_path):
    teacher_dir = tmp_path / "pruned"
    pruned, pruned_output = tiny_sentiment_run(teacher_dir, *WIDTH_8, "--num_train_epochs", "0.01")
    random, random_output = tiny_sentiment_run(
        tmp_path / "random", *WIDTH_8, "--student_init", "random", "--num_train_epochs", "0.01"
    )
    one, two = (
        AutoModelForSequenceClassification.from_pretrained(os.path.join(folder, "student"))
        for folder in (pruned_output, random_output)
    )
    assert pruned["results"]["student"]["parameters"] == random["results"]["student"]["parameters"]
    shape = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")
    assert [getattr(one.config, key) for key in shape] == [getattr(two.config, key) for key in shape] == [8, 2, 16, 2]
    assert not torch.allclose(one.bert.embeddings.word_embeddings.weight, two.bert.embeddings.word_embeddings.weight)


@needs_torchao
def test_an_int8_student_of_the_teachers_shape_against_post_training_quantization(tmp_path):
    result, output = tiny_sentiment_run(
        tmp_path, "--student_quantization", "int8", "--student_num_layers", "4", "--baseline", "true"
    )
    student = AutoModelForSequenceClassification.from_pretrained(os.path.join(output, "student"))
    query = student.bert.encoder.layer[0].attention.self.query.weight
    assert type(query).__name__ == "Int8Tensor"
    assert student.config.quantization_config.quant_method == "torchao"
    rows = result["results"]
    # The baseline is the teacher quantized after training: no steps of its own.
    assert result["training_steps"]["baseline"] == 0
    assert rows["student"]["size_bytes"] < 0.5 * rows["teacher"]["size_bytes"]
    assert rows["student"]["size_bytes"] == rows["baseline"]["size_bytes"]
    assert 0.0 <= rows["student"]["accuracy"] <= 1.0 and 0.0 <= rows["baseline"]["accuracy"] <= 1.0


@needs_torchao
def test_a_shallower_int8_students_baseline_trains_then_is_quantized(tmp_path):
    result, output = tiny_sentiment_run(tmp_path, "--student_quantization", "int8", "--baseline", "true")
    assert result["training_steps"]["baseline"] == result["training_steps"]["student"] > 0
    rows = result["results"]
    assert rows["baseline"]["size_bytes"] == rows["student"]["size_bytes"] < 0.5 * rows["teacher"]["size_bytes"]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"student_width": {"hidden": 8}}, "student_width must be a mapping of hidden_size"),
        ({"student_init": "zeros"}, "student_init must be 'teacher' or 'random'"),
        ({"student_quantization": "int4"}, "student_quantization must be 'int8'"),
        ({"student_width": {"hidden_size": 8}, "student_config": {"model_type": "bert"}}, "give one or the other"),
        ({"student_quantization": "int8", "task": "masked-lm"}, "int8 students are for classification"),
        ({"student_quantization": "int8", "generations": 2}, "full-precision teacher"),
        ({"calibration_examples": 0}, "calibration_examples must be >= 1"),
    ],
)
def test_student_kinds_that_cannot_apply_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        PipelineArguments(teacher="t", dataset="d", **settings)


def test_none_turns_off_a_recipes_width_and_quantization():
    args = PipelineArguments(teacher="t", dataset="d", student_width="none", student_quantization="none")
    assert (args.student_width, args.student_quantization) == (None, None)


def test_each_student_kind_reads_its_own_teacher_cache(tmp_path):
    from hf_distill.pipeline import parse_args
    from hf_distill.pipeline.kinds import kind_run, kind_settings

    argv = ["--recipe", "letters-cross-tokenizer", "--output_dir", str(tmp_path), "--teacher_cache", "cache"]
    args, config, _ = parse_args(argv)
    runs = {kind: kind_run(args, config, kind, settings)[1] for kind, settings in kind_settings(args, config).items()}
    assert {kind: run.teacher_cache for kind, run in runs.items()} == {
        kind: os.path.join("cache", kind) for kind in ("gold_last", "gold_first", "uld")
    }
    assert kind_run(*parse_args(argv[:-2])[:2], "uld", {})[1].teacher_cache is None


def kinds_run(tmp_path, *flags):
    """The quick-start recipe on a tiny encoder, comparing student kinds: (report, output folder)."""
    from pipeline_assets import write_encoder_teacher, write_sentiment_dataset
    from test_pipeline import FAST

    from hf_distill.pipeline import parse_args, run_seeds, run_student_kinds

    output = str(tmp_path / "kinds")
    argv = ["--recipe", "minilm-rotten-tomatoes", "--teacher", write_encoder_teacher(str(tmp_path / "encoder")),
            "--dataset", write_sentiment_dataset(str(tmp_path / "data")), "--output_dir", output,
            "--student_num_layers", "2", "--max_train_samples", "24", "--teacher_max_train_samples", "24",
            *flags, *FAST]  # fmt: skip
    args, config, recipe = parse_args(argv)
    if args.seeds:
        return run_seeds(args, config, args.seeds, recipe), output
    return run_student_kinds(args, config, recipe), output


KIND_SETTINGS = '{"width": {"student_width": {"hidden_size": 8}, "max_steps": 2}, "int8": {"student_num_layers": 4}}'


@pytest.mark.slow  # three kinds and their baselines, end to end; each kind's pieces are tested on their own above
@needs_torchao
def test_student_kinds_side_by_side_on_one_teacher(tmp_path, monkeypatch):
    trained = []
    original = pipeline_models.Trainer
    monkeypatch.setattr(pipeline_models, "Trainer", lambda *a, **k: trained.append(1) or original(*a, **k))
    report, output = kinds_run(
        tmp_path, "--student_kinds", "layers", "width", "int8", "--student_kind_settings", KIND_SETTINGS
    )
    assert len(trained) == 1  # the teacher trained once, in <output_dir>/teacher, and reused by every kind
    assert os.path.isdir(os.path.join(output, "teacher")) and not os.path.exists(
        os.path.join(output, "width", "teacher")
    )
    assert list(report["results"]) == [
        "teacher", "layers", "layers baseline", "width", "width baseline", "int8", "int8 baseline"
    ]  # fmt: skip
    load = AutoModelForSequenceClassification.from_pretrained
    assert load(os.path.join(output, "layers", "student")).config.num_hidden_layers == 2
    assert load(os.path.join(output, "width", "student")).config.hidden_size == 8
    int8 = load(os.path.join(output, "int8", "student"))
    assert (
        int8.config.num_hidden_layers == 4
        and type(int8.bert.encoder.layer[0].output.dense.weight).__name__ == "Int8Tensor"
    )
    kinds = report["kinds"]
    assert kinds["width"]["training_steps"]["student"] == 2  # the kind's own training setting
    assert kinds["int8"]["training_steps"]["baseline"] == 0  # post-training quantization of the teacher
    markdown = open(os.path.join(output, "report.md")).read()
    assert "| int8 baseline |" in markdown and "post-training quantization" in markdown
    assert "labels alone for" in markdown
    assert open(os.path.join(output, "report.png"), "rb").read(4) == b"\x89PNG"


@pytest.mark.slow  # several pipelines over seeds
@needs_torchao
def test_student_kinds_over_seeds_give_each_kinds_spread(tmp_path):
    report, output = kinds_run(
        tmp_path, "--student_kinds", "layers", "int8", "--seeds", "1", "2", "--num_train_epochs", "0.34"
    )
    assert report["seeds"] == [1, 2] and list(report["kinds"]) == ["layers", "int8"]
    layers = report["kinds"]["layers"]
    assert len(layers["results"]["student"]["accuracy"]["values"]) == 2
    assert os.path.isdir(os.path.join(output, "seed-2", "int8", "student"))
    markdown = open(os.path.join(output, "report.md")).read()
    assert "# Student kinds over 2 seeds" in markdown and "| int8 baseline |" in markdown


@pytest.mark.parametrize(
    "settings, message",
    [
        ("{}", "have no settings"),
        ('{"width": {"hidden_size": 8}}', "neither a student setting"),
    ],
)
def test_student_kinds_that_cannot_run_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        kinds_run(tmp_path, "--student_kinds", "width", "--student_kind_settings", settings)


def test_a_kind_with_bad_settings_is_refused_before_any_kind_trains(tmp_path, monkeypatch):
    from hf_distill.pipeline import kinds

    monkeypatch.setattr(kinds, "run_pipeline", lambda *args: pytest.fail("a kind trained before all were checked"))
    settings = '{"width": {"student_width": {"hidden_size": 8, "heads": 2}}}'
    with pytest.raises(ValueError, match="student_width must be a mapping"):
        kinds_run(tmp_path, "--student_kinds", "layers", "width", "--student_kind_settings", settings)


def test_kinds_over_seeds_compare_each_kind_with_the_first_on_both_accuracies_paired_by_seed():
    """Made-up per-seed reports of two kinds: the combined table carries the sampled accuracy, and each kind is set
    against the first, paired by seed, with the difference called beyond noise only past twice the spread."""
    from hf_distill.pipeline.kinds import combine_kinds_over_seeds, kinds_seeds_report_lines

    def run(greedy: float, sampled: float) -> dict:
        row = {"accuracy": greedy, "sampled_accuracy": sampled, "perplexity": 3.0, "parameters": 10, "size_bytes": 40}
        teacher = {**row, "accuracy": 1.0, "sampled_accuracy": 0.9, "parameters": 20, "size_bytes": 80}
        return {
            "results": {"teacher": teacher, "student": row},
            "summary": {"retention": greedy, "size_ratio": 0.5},
            "training_steps": {"student": 3},
            "timings_s": {"total": 1.0},
            "student_dir": "run/student",
        }

    # sampled: kd 0.70/0.72/0.71, on-policy 0.80/0.81/0.83 (+10, +9, +12); greedy: both 1.0 on every seed
    kd, on_policy = [(1.0, 0.70), (1.0, 0.72), (1.0, 0.71)], [(1.0, 0.80), (1.0, 0.81), (1.0, 0.83)]
    reports = [
        {"kinds": {"kd": run(*a), "on_policy": run(*b)}, "timings_s": {"kd": 1.0, "on_policy": 1.0}}
        for a, b in zip(kd, on_policy, strict=True)
    ]
    combined = combine_kinds_over_seeds(reports, [1, 2, 3])
    text = "\n".join(kinds_seeds_report_lines(combined))
    assert "sampled_accuracy (mean ± std)" in text
    assert "| on_policy | 100.00% ± 0.00% | 81.33% ± 1.53% |" in text
    assert (
        "- sampled_accuracy, each kind's student - kd's, paired by seed (points): on_policy +10.33 ± 1.53 (beyond"
        in text
    )
    assert "- accuracy, each kind's student - kd's, paired by seed (points): on_policy +0.00 ± 0.00\n" in text + "\n"

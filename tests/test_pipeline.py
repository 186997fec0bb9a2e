"""The pipeline behind scripts/distill.py, end to end on tiny local models and data, one test per recipe kind."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from datasets import load_from_disk
from pipeline_assets import (
    TINY_VIT,
    write_encoder_teacher,
    write_image_dataset,
    write_masked_lm_teacher,
    write_sentiment_dataset,
    write_text_files,
)
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from hf_distill import text_augmentation
from hf_distill.card import CARD_KEYS
from hf_distill.pipeline import PipelineArguments, parse_args, report, run_pipeline, run_seeds
from hf_distill.pipeline import models as pipeline_models
from hf_distill.pipeline import run as pipeline_run

# Small enough for seconds on two CPU cores; the numbers are checked for shape and consistency, not quality.
FAST = [
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--num_train_epochs", "1",
    "--teacher_num_train_epochs", "1", "--latency_repeats", "1", "--latency_batch_sizes", "1", "4",
    "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
    "--disable_tqdm", "true", "--seed", "0",
]  # fmt: skip


class FakeHub:
    """Stands in for `HfApi`: records the calls and keeps a copy of each uploaded folder under `root`."""

    calls: list = []
    root: str = ""

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        FakeHub.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, repo_id, folder_path, commit_message):
        FakeHub.calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, os.path.join(FakeHub.root, repo_id), dirs_exist_ok=True)
        return f"local://{repo_id}"


def run(argv):
    args, config, recipe = parse_args(argv)
    return run_pipeline(args, config, recipe), config


def check_report(output_dir, with_baseline, smaller_student=True):
    with open(os.path.join(output_dir, "report.json"), encoding="utf-8") as handle:
        saved = json.load(handle)
    models = ["teacher", "student"] + (["baseline"] if with_baseline else [])
    assert sorted(saved["results"]) == sorted(models)
    for name in models:
        row = saved["results"][name]
        assert "" not in row and "epoch" not in row  # metrics only, each under its own name
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["latency_ms_batch_1"] > 0 and row["latency_ms_batch_4"] > 0
    teacher, student = saved["results"]["teacher"], saved["results"]["student"]
    assert (student["parameters"] < teacher["parameters"]) == smaller_student
    if teacher["accuracy"]:
        assert saved["summary"]["retention"] == pytest.approx(student["accuracy"] / teacher["accuracy"])
    if with_baseline:
        baseline = saved["results"]["baseline"]["accuracy"]
        gap = teacher["accuracy"] - baseline
        if gap:
            expected = (student["accuracy"] - baseline) / gap
            assert saved["summary"]["gap_closure"] == pytest.approx(expected)
    with open(os.path.join(output_dir, "report.md"), encoding="utf-8") as handle:
        markdown = handle.read()
    assert all(f"| {name} |" in markdown for name in models)
    with open(os.path.join(output_dir, "report.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    return saved


def read_card(folder):
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    front_matter = yaml.safe_load(text.split("---")[1])
    return front_matter, text


def test_text_classification_trains_a_headless_teacher_once_then_reuses_it(tmp_path, monkeypatch):
    teacher = write_encoder_teacher(str(tmp_path / "encoder"))
    data = write_sentiment_dataset(str(tmp_path / "data"))
    monkeypatch.setattr(report, "HfApi", FakeHub)
    FakeHub.calls, FakeHub.root = [], str(tmp_path / "hub")
    output = str(tmp_path / "run")
    argv = ["--recipe", "minilm-rotten-tomatoes", "--teacher", teacher, "--dataset", data, "--output_dir", output,
            "--student_num_layers", "2", "--max_train_samples", "24", "--teacher_max_train_samples", "24",
            "--push_to_hub", "true", "--hub_model_id", "me/tiny-student", *FAST]  # fmt: skip
    first, config = run(argv)

    # Stage 1: the encoder had no classifier, so the teacher was trained first and kept with a record.
    assert os.path.isfile(os.path.join(output, "teacher", "model.safetensors"))
    assert os.path.isfile(os.path.join(output, "teacher", pipeline_models.TEACHER_RECORD))
    assert first["teacher_used"] == os.path.join(output, "teacher")
    saved = check_report(output, with_baseline=True)
    assert saved["losses"]["hidden_state"]["distance"] == "cosine"

    # Stage 6: the student loads with plain Auto classes; the card records teacher, losses, data and metrics.
    student_dir = os.path.join(output, "student")
    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 2
    assert student.config.id2label == {0: "bad", 1: "good"}
    assert AutoTokenizer.from_pretrained(student_dir)("wab wac")["input_ids"] == [2, 6, 7, 3]  # [CLS] wab wac [SEP]
    assert not os.path.exists(student_dir + ".tmp")
    front_matter, text = read_card(student_dir)
    assert "distillation" in front_matter["tags"] and "recipe:minilm-rotten-tomatoes" in front_matter["tags"]
    # A card may be pushed: local folders are named by their folder name, never their path here.
    assert front_matter["hf_distill"]["teacher"] == "encoder" and str(tmp_path) not in text
    assert "base_model" not in front_matter  # a local folder is no Hub id
    assert "whose task head was trained here first" in text
    assert "AutoModelForSequenceClassification.from_pretrained" in text
    assert front_matter["hf_distill"]["losses"]["soft_target"] == {"weight": 0.5, "temperature": 2.0}
    assert front_matter["hf_distill"]["dataset"] == "data"
    # One card schema: the keys of a DistillationTrainer's card, with the run's own facts filled in.
    card_facts = front_matter["hf_distill"]
    assert tuple(card_facts) == CARD_KEYS and card_facts["teacher_class"] == "BertForSequenceClassification"
    assert card_facts["parameter_ratio"] == saved["summary"]["parameter_ratio"] and card_facts["recipe"]
    assert f"{saved['results']['student']['accuracy']:.4f}" in text
    assert f"{saved['results']['student']['parameters']:,}" in text

    # --push_to_hub: one repo, one commit of model, tokenizer and card, to the Hub stand-in.
    assert FakeHub.calls == [
        ("create_repo", "me/tiny-student", None),
        ("upload_folder", "me/tiny-student", "Upload distilled student"),
    ]
    pushed = sorted(os.listdir(os.path.join(FakeHub.root, "me/tiny-student")))
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(pushed)
    assert first["pushed_to"] == "local://me/tiny-student"

    # A second run with the same settings reuses the trained teacher instead of training it again.
    class NoTraining:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the teacher was trained again")

    monkeypatch.setattr(pipeline_models, "Trainer", NoTraining)
    second, _ = run([*argv, "--push_to_hub", "false", "--baseline", "false", "--overwrite_output_dir", "true"])
    assert second["teacher_used"] == os.path.join(output, "teacher")
    assert second["results"]["teacher"]["accuracy"] == first["results"]["teacher"]["accuracy"]


def test_masked_lm_distilbert_recipe_on_text_files(tmp_path):
    teacher = write_masked_lm_teacher(str(tmp_path / "teacher"), layers=4)
    files = write_text_files(str(tmp_path / "text"))
    output = str(tmp_path / "run")
    result, _ = run(["--recipe", "distilbert", "--teacher", teacher, "--dataset", files, "--output_dir", output,
                     "--student_layers", "0", "3", "--max_length", "16", "--gradient_accumulation_steps", "1",
                     "--baseline", "true", *FAST])  # fmt: skip
    # The teacher had its head: used as it is, nothing trained first.
    assert result["teacher_used"] == teacher and not os.path.exists(os.path.join(output, "teacher"))
    check_report(output, with_baseline=True)
    for name in ("teacher", "student", "baseline"):
        perplexity = result["results"][name]["perplexity"]
        assert 1.0 < perplexity < 10 * 64  # exp(cross-entropy) over a 64-token vocabulary, untrained-ish models
    # DistilBERT's losses with the published weights.
    assert result["losses"]["soft_target"] == {"weight": 5.0, "temperature": 2.0}
    assert result["losses"]["hard_label"] == {"weight": 2.0}
    assert result["losses"]["hidden_state"]["weight"] == 1.0
    student = AutoModelForMaskedLM.from_pretrained(os.path.join(output, "student"))
    assert student.config.num_hidden_layers == 2
    front_matter, _ = read_card(os.path.join(output, "student"))
    assert "perplexity" in front_matter["metrics"]


def test_image_recipe_trains_a_vit_teacher_from_a_config_and_a_fresh_mobilenet(tmp_path):
    data = write_image_dataset(str(tmp_path / "images"))
    output = str(tmp_path / "run")
    result, _ = run(["--recipe", "vit-fashion-mnist", "--dataset", data, "--output_dir", output,
                     "--teacher_config", json.dumps(TINY_VIT), "--image_size", "32",
                     "--student_config", json.dumps({"model_type": "mobilenet_v2", "depth_multiplier": 0.35}),
                     "--max_train_samples", "27", "--teacher_max_train_samples", "27", *FAST])  # fmt: skip
    assert os.path.isfile(os.path.join(output, "teacher", "model.safetensors"))
    check_report(output, with_baseline=True, smaller_student=False)  # a 16-wide ViT is smaller than any MobileNet
    student_dir = os.path.join(output, "student")
    student = AutoModelForImageClassification.from_pretrained(student_dir)
    assert type(student).__name__ == "MobileNetV2ForImageClassification"
    assert student.config.id2label == {0: "dark", 1: "grey", 2: "light"}
    processor = AutoImageProcessor.from_pretrained(student_dir)
    assert processor.size == {"height": 32, "width": 32}
    teacher_ms, student_ms = (result["results"][name]["latency_ms_batch_1"] for name in ("teacher", "student"))
    assert result["summary"]["speedup_batch_1"] == pytest.approx(teacher_ms / student_ms)


def test_teacher_cache_flag_builds_once_then_reuses_with_fixed_masks(tmp_path, monkeypatch):
    teacher = write_masked_lm_teacher(str(tmp_path / "teacher"), layers=4)
    files = write_text_files(str(tmp_path / "text"))
    cache = str(tmp_path / "teacher-cache")
    argv = ["--recipe", "distilbert", "--teacher", teacher, "--dataset", files, "--student_layers", "0", "3",
            "--max_length", "16", "--gradient_accumulation_steps", "1", "--baseline", "true",
            "--teacher_cache", cache, *FAST]  # fmt: skip
    first, _ = run([*argv, "--output_dir", str(tmp_path / "first")])
    assert os.path.isfile(os.path.join(cache, "cache.json")) and first["teacher_cache"] == cache

    def no_build(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr("hf_distill.cache.training.build_teacher_cache", no_build)
    second, _ = run([*argv, "--output_dir", str(tmp_path / "second")])
    # The same fixed masks every run, so the cache is accepted and training repeats exactly.
    for metric in ("accuracy", "perplexity"):
        assert second["results"]["student"][metric] == pytest.approx(first["results"]["student"][metric], rel=1e-6)
    check_report(str(tmp_path / "second"), with_baseline=True)


def test_two_teachers_from_a_recipe_one_student_and_a_report_of_both(tmp_path):
    deep = write_masked_lm_teacher(str(tmp_path / "deep"), layers=4)
    shallow = write_masked_lm_teacher(str(tmp_path / "shallow"), layers=2)
    files = write_text_files(str(tmp_path / "text"))
    recipe = tmp_path / "two-teachers.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "masked-lm", "dataset": files, "teacher": {"deep": deep, "shallow": shallow},
        "teacher_weights": {"deep": 2.0, "shallow": 1.0}, "student_layers": [0, 3], "max_length": 16,
        "losses": {"soft_target": {"weight": 5.0, "temperature": 2.0}, "hard_label": {"weight": 2.0},
                   "hidden_state": {"weight": 1.0, "distance": "cosine", "teacher": "deep"},
                   "hidden_shallow": {"type": "hidden_state", "weight": 1.0, "teacher": "shallow",
                                      "layer_map": [[2, 2]]}},
    }))  # fmt: skip
    output = str(tmp_path / "run")
    result, config = run(["--recipe", str(recipe), "--output_dir", output, "--baseline", "true", *FAST])
    assert config.teacher_weights == {"deep": 2.0, "shallow": 1.0}
    assert list(result["results"]) == ["teacher deep", "teacher shallow", "student", "baseline"]
    assert result["teachers"] == {
        "deep": {"given": deep, "used": deep},
        "shallow": {"given": shallow, "used": shallow},
    }
    # The student is built from the first teacher, whose layer map its own hidden-state term gets.
    assert result["losses"]["hidden_state"]["layer_map"] == [[0, 0], [1, 1], [2, 4]]
    assert result["losses"]["hidden_shallow"]["layer_map"] == [[2, 2]]
    rows = result["results"]
    best = max(rows["teacher deep"]["accuracy"], rows["teacher shallow"]["accuracy"])
    if best:
        assert result["summary"]["retention"] == pytest.approx(rows["student"]["accuracy"] / best)
    markdown = open(os.path.join(output, "report.md")).read()
    assert "| teacher deep |" in markdown and "| teacher shallow |" in markdown
    front_matter, text = read_card(os.path.join(output, "student"))
    assert [t["name"] for t in front_matter["hf_distill"]["teachers"]] == ["deep", "shallow"]
    assert f"{rows['teacher shallow']['parameters']:,} parameters" in text and "2 teachers" in text


def test_several_teachers_on_the_command_line_are_name_path_pairs():
    args, _, _ = parse_args(["--task", "masked-lm", "--dataset", "d", "--teacher", "a=path/one", "b=org/two",
                             "--output_dir", "out"])  # fmt: skip
    assert args.teachers == {"a": "path/one", "b": "org/two"} and args.teacher == "path/one"
    single, _, _ = parse_args(["--task", "masked-lm", "--dataset", "d", "--teacher", "org/model", "--output_dir", "o"])
    assert single.teacher == "org/model" and single.teachers is None
    with pytest.raises(ValueError, match="name=path pairs"):
        parse_args(["--task", "masked-lm", "--dataset", "d", "--teacher", "a=one", "two", "--output_dir", "o"])


def tiny_sentiment_run(tmp_path, *flags):
    """The quick-start recipe on a tiny headless encoder and 24 snippets, with `flags` added; (report, output)."""
    teacher = write_encoder_teacher(str(tmp_path / "encoder"))
    data = write_sentiment_dataset(str(tmp_path / "data"))
    output = str(tmp_path / "run")
    result, _ = run(["--recipe", "minilm-rotten-tomatoes", "--teacher", teacher, "--dataset", data,
                     "--output_dir", output, "--student_num_layers", "2", "--max_train_samples", "24",
                     "--teacher_max_train_samples", "24", "--baseline", "false", *flags, *FAST])  # fmt: skip
    return result, output


def test_born_again_generations_each_learn_from_the_one_before(tmp_path):
    result, output = tiny_sentiment_run(tmp_path, "--generations", "2")
    assert list(result["results"]) == ["teacher", "generation 1", "student"]
    assert result["generations"] == 2 and "generation 2" in result["timings_s"]
    assert os.path.isdir(os.path.join(output, "checkpoints", "generation-2"))
    first, last = result["results"]["generation 1"], result["results"]["student"]
    assert first["parameters"] == last["parameters"]  # the same architecture
    markdown = open(os.path.join(output, "report.md")).read()
    assert "| generation 1 |" in markdown and "born-again generations: 2" in markdown
    assert (
        AutoModelForSequenceClassification.from_pretrained(os.path.join(output, "student")).config.num_hidden_layers
        == 2
    )


def test_the_pipeline_distils_a_student_from_its_own_moving_average(tmp_path):
    result, output = tiny_sentiment_run(tmp_path, "--ema_teacher", "true", "--ema_momentum", "0.9")
    assert result["ema_teacher"] is True and "layer_map" not in result["losses"]["hidden_state"]
    assert "moving average of its own weights" in open(os.path.join(output, "report.md")).read()


def test_help_lists_the_strategies_options(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    usage = capsys.readouterr().out
    for option in ("--teacher_weights", "--trainable_teachers", "--trainable_teacher_learning_rate",
                   "--save_trained_teachers", "--ema_teacher", "--ema_momentum", "--generations"):  # fmt: skip
        assert option in usage, option
    assert "name=path pairs" in usage


def test_a_transfer_set_of_unused_examples_and_a_baseline_of_as_many_steps(tmp_path):
    result, output = tiny_sentiment_run(
        tmp_path, "--max_train_samples", "12", "--transfer_dataset", "unused", "--baseline", "true"
    )
    assert (result["train_examples"], result["transfer_examples"]) == (12, 24)  # 36 training snippets in all
    # 36 examples in batches of 8 for the student, 12 labeled ones repeated for the baseline: 5 steps each.
    assert result["training_steps"] == {"student": 5, "baseline": 5}
    assert "12 labeled examples and 24 without labels" in open(os.path.join(output, "report.md")).read()
    assert read_card(os.path.join(output, "student"))[0]["hf_distill"]["transfer_examples"] == 24


@pytest.mark.slow  # the pipeline end to end; test_text_augmentation checks the saved set, its reuse and the inputs
def test_word_replacement_copies_join_the_transfer_set_and_are_reused(tmp_path, monkeypatch):
    mlm = write_masked_lm_teacher(str(tmp_path / "mlm"))
    flags = ["--max_train_samples", "12", "--transfer_dataset", "unused", "--transfer_max_samples", "4",
             "--word_replacement_mlm", mlm, "--word_replacement_copies", "2", "--word_replacement_rate", "1",
             "--baseline", "true"]  # fmt: skip
    result, output = tiny_sentiment_run(tmp_path, *flags)
    # 12 labeled snippets, 4 unused ones and 2 copies of each labeled one; the baseline repeats the 12 labeled ones.
    assert (result["train_examples"], result["transfer_examples"], result["augmented_examples"]) == (12, 28, 24)
    assert result["training_steps"] == {"student": 5, "baseline": 5}  # 40 examples in batches of 8
    assert "24 of the examples without labels are augmented copies" in open(os.path.join(output, "report.md")).read()
    assert read_card(os.path.join(output, "student"))[0]["hf_distill"]["augmented_examples"] == 24
    copies = load_from_disk(os.path.join(output, "word-replacement"))["text"]
    originals = load_from_disk(str(tmp_path / "data"))["train"]["text"]
    assert len(copies) == 24 and not set(copies) & set(originals)  # at rate 1 every word is replaced
    assert {len(copy.split()) for copy in copies} <= {len(text.split()) for text in originals}  # word for word

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the saved copies should have been reused")

    monkeypatch.setattr(text_augmentation, "replacement_candidates", no_rebuild)
    again, _ = tiny_sentiment_run(tmp_path, *flags, "--overwrite_output_dir", "true")  # same folder, texts, settings
    assert again["augmented_examples"] == 24


def test_fixed_augmented_image_copies_serve_a_teacher_cache(tmp_path):
    data = write_image_dataset(str(tmp_path / "images"))
    copies = json.dumps({"copies": 2, "crop_scale": [0.5, 1.0], "flip": True})
    result, _ = run(["--recipe", "vit-fashion-mnist", "--dataset", data, "--output_dir", str(tmp_path / "run"),
                     "--teacher_config", json.dumps(TINY_VIT), "--image_size", "32",
                     "--student_config", json.dumps({"model_type": "mobilenet_v2", "depth_multiplier": 0.35}),
                     "--max_train_samples", "12", "--image_augmentation_copies", copies,
                     "--teacher_cache", str(tmp_path / "cache"), "--image_augmentation", "none",
                     "--baseline", "false", *FAST])  # fmt: skip
    assert (result["train_examples"], result["transfer_examples"], result["augmented_examples"]) == (12, 24, 24)
    assert result["training_steps"] == {"student": 4}  # 36 images in full batches of 8
    record = json.load(open(tmp_path / "cache" / "cache.json"))
    assert record["dataset"]["num_examples"] == 36  # the teacher's outputs for the originals and each fixed copy
    with pytest.raises(ValueError, match="augments images, but the task is text-classification"):
        PipelineArguments(teacher="t", dataset="d", image_augmentation_copies={"copies": 2, "flip": True})
    with pytest.raises(ValueError, match="copies must be an integer >= 1"):
        PipelineArguments(
            teacher="t", dataset="d", task="image-classification", image_augmentation_copies='{"copies": 0}'
        )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--word_replacement_mlm", "teacher"], "no trained masked-LM head"),  # the headless encoder teacher
        (["--word_replacement_mlm", "ENCODER"], "no trained masked-LM head"),
        (["--word_replacement_rate", "0", "--word_replacement_mlm", "MLM"], "rate must be in"),
        (["--word_replacement_mlm", "MLM", "--task", "masked-lm"], "not masked-lm"),
    ],
)
def test_word_replacement_that_cannot_apply_is_refused_before_training(tmp_path, flags, message, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("refused too late: a stage after the data ran")

    monkeypatch.setattr(pipeline_run, "prepare_teachers", no_training)
    named = {
        "ENCODER": write_encoder_teacher(str(tmp_path / "encoder")),
        "MLM": write_masked_lm_teacher(str(tmp_path / "mlm")),
    }
    with pytest.raises(ValueError, match=message):
        tiny_sentiment_run(tmp_path, *[named.get(flag, flag) for flag in flags])


def test_an_image_transfer_set_from_another_data_set(tmp_path):
    data = write_image_dataset(str(tmp_path / "images"))
    extra = write_image_dataset(str(tmp_path / "more-images"), size=16)
    result, _ = run(["--recipe", "vit-fashion-mnist", "--dataset", data, "--output_dir", str(tmp_path / "run"),
                     "--teacher_config", json.dumps(TINY_VIT), "--image_size", "32",
                     "--student_config", json.dumps({"model_type": "mobilenet_v2", "depth_multiplier": 0.35}),
                     "--max_train_samples", "27", "--transfer_dataset", extra, "--transfer_max_samples", "10",
                     "--baseline", "false", *FAST])  # fmt: skip
    assert (result["train_examples"], result["transfer_examples"]) == (27, 10)
    assert result["training_steps"] == {"student": 4}  # 37 images in full batches of 8 (the recipe drops the last)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--transfer_dataset", "unused", "--max_train_samples", "100"], "none is left over"),
        (["--transfer_dataset", "DATA", "--transfer_split", "test"], "would leak the test set"),
        (["--transfer_dataset", "DATA", "--transfer_split", "dev"], "has no 'dev' split"),
        (["--transfer_dataset", "ONE_SPLIT", "--dataset", "ONE_SPLIT"], "carved from it"),
    ],
)
def test_transfer_sets_that_cannot_apply_are_refused_by_the_data_stage(tmp_path, flags, message):
    data = write_sentiment_dataset(str(tmp_path / "data"))
    argv = ["--recipe", "minilm-rotten-tomatoes", "--teacher", write_encoder_teacher(str(tmp_path / "encoder")),
            "--dataset", data, "--output_dir", str(tmp_path / "run"), *FAST]  # fmt: skip
    one_split = str(tmp_path / "one-split")  # a single split: the held-out examples are carved from it
    load_from_disk(data)["train"].save_to_disk(one_split)
    named = {"DATA": data, "ONE_SPLIT": one_split}
    with pytest.raises(ValueError, match=message):
        run(argv + [named.get(flag, flag) for flag in flags])


def test_transfer_set_arguments_that_cannot_apply_are_refused():
    with pytest.raises(ValueError, match="set --max_train_samples"):
        PipelineArguments(teacher="t", dataset="d", transfer_dataset="unused")
    with pytest.raises(ValueError, match="add the extra text to --dataset"):
        PipelineArguments(teacher="t", dataset="d", task="masked-lm", transfer_dataset="unused", max_train_samples=9)


def test_none_turns_off_a_recipes_transfer_set_and_augmentation():
    args, _, _ = parse_args(["--recipe", "minilm-rotten-tomatoes-transfer", "--word_replacement_mlm", "m"])
    assert (args.transfer_dataset, args.word_replacement_mlm) == ("unused", "m")
    off = ["--transfer_dataset", "none", "--word_replacement_mlm", "none"]
    args, _, _ = parse_args(["--recipe", "minilm-rotten-tomatoes-transfer", *off])
    assert (args.transfer_dataset, args.word_replacement_mlm) == (None, None)


@pytest.mark.slow  # three pipelines; test_student_kinds' seeds test and the margin-line test cover the spread report
def test_several_seeds_give_one_report_of_means_and_spreads(tmp_path):
    output = str(tmp_path / "run")
    teacher = write_encoder_teacher(str(tmp_path / "encoder"))
    data = write_sentiment_dataset(str(tmp_path / "data"))
    argv = ["--recipe", "minilm-rotten-tomatoes", "--teacher", teacher, "--dataset", data, "--output_dir", output,
            "--student_num_layers", "2", "--max_train_samples", "24", "--teacher_max_train_samples", "24", *FAST,
            "--seeds", "0", "1"]  # fmt: skip
    args, config, recipe = parse_args(argv)
    combined = run_seeds(args, config, args.seeds, recipe)
    runs = [json.load(open(os.path.join(output, f"seed-{seed}", "report.json"))) for seed in (0, 1)]
    assert [run["seed"] for run in runs] == [0, 1]
    for name in ("teacher", "student", "baseline"):
        values = [run["results"][name]["accuracy"] for run in runs]
        figure = combined["results"][name]["accuracy"]
        assert figure["values"] == values and figure["mean"] == pytest.approx(sum(values) / 2)
        assert figure["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    margins = [100 * (run["results"]["student"]["accuracy"] - run["results"]["baseline"]["accuracy"]) for run in runs]
    assert combined["summary"]["student_minus_baseline_points"]["values"] == pytest.approx(margins)
    margin = combined["summary"]["student_minus_baseline_points"]
    assert combined["summary"]["margin_beyond_two_std"] == (margin["mean"] > 2 * margin["std"])
    assert json.load(open(os.path.join(output, "report.json")))["seeds"] == [0, 1]
    markdown = open(os.path.join(output, "report.md")).read()
    assert "over 2 seeds" in markdown and "| seed 0 | seed 1 |" in markdown and "student - baseline:" in markdown
    assert os.path.getsize(os.path.join(output, "report.png")) > 0
    with pytest.raises(ValueError, match="distinct"):
        parse_args([*argv[:-2], "1", "1"])


def test_the_report_says_whether_the_margin_is_beyond_what_seeds_vary_it_by():
    results = {"teacher": {"accuracy": 0.80}, "student": {"accuracy": 0.77}, "baseline": {"accuracy": 0.75}}
    measured = {"mean": 1.93, "std": 0.95, "seeds": [1, 2, 3]}
    beyond = report.margin_line(results, measured)
    assert beyond.startswith("- student - baseline: +2.00 points; seeds vary it by 0.95 points")
    assert "(seeds 1, 2, 3: +1.93 ± 0.95, docs/results.md)" in beyond and beyond.endswith("beyond twice that (1.90)")
    within = report.margin_line({**results, "student": {"accuracy": 0.76}}, measured)
    assert within.startswith("- student - baseline: +1.00 points") and "within twice that" in within
    assert report.margin_line(results, None).endswith("run with --seeds 1 2 3 to see what seeds vary it by")
    parsed = PipelineArguments(teacher="t", dataset="d", seeds_margin='{"mean": 1, "std": 0.5, "seeds": [1, 2]}')
    assert parsed.seeds_margin == {"mean": 1, "std": 0.5, "seeds": [1, 2]}
    with pytest.raises(ValueError, match="seeds_margin must be a mapping"):
        PipelineArguments(teacher="t", dataset="d", seeds_margin='{"mean": 1}')

"""Recipes and the command line: parsing, overrides, errors, student building and the offline data sources."""

from __future__ import annotations

import dataclasses
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bert_masked_lm
from pipeline_assets import (
    write_encoder_teacher,
    write_image_dataset,
    write_masked_lm_teacher,
    write_mobilenet_config,
    write_sentiment_dataset,
    write_text_files,
    write_vit_processor,
)
from safetensors.torch import load_file

from hf_distill.pipeline import (
    PipelineArguments,
    available_recipes,
    build_student,
    default_student_layers,
    load_initial_teacher,
    load_recipe,
    losses_with_layer_map,
    make_student,
    parse_args,
    prepare_data,
)
from hf_distill.pipeline.sources import asset_dir, hub_id, load_raw_dataset

ROOT = Path(__file__).resolve().parents[1]
WORDNET_DIR = asset_dir("HF_DISTILL_WORDNET_DIR")
FASHION_MNIST_DIR = asset_dir("HF_DISTILL_FASHION_MNIST_DIR")

PIPELINE_FIELDS = {field.name for field in dataclasses.fields(PipelineArguments)}
RECIPES = [
    "distilbert",
    "letters-cross-tokenizer",
    "letters-on-policy",
    "minilm-distilbert-flow",
    "minilm-mlm",
    "minilm-rotten-tomatoes",
    "minilm-rotten-tomatoes-kinds",
    "minilm-rotten-tomatoes-transfer",
    "vit-fashion-mnist",
    "vit-mobilenet",
]


def test_every_recipe_is_listed_with_a_description_and_parses(tmp_path):
    recipes = available_recipes()
    assert sorted(recipes) == RECIPES
    for name, description in recipes.items():
        assert description, f"{name} has no '# description' first line"
        args, config, recipe = parse_args(["--recipe", name, "--output_dir", str(tmp_path)])
        settings = load_recipe(name)
        assert recipe == name
        for key, value in settings.items():
            parsed = getattr(args, key) if key in PIPELINE_FIELDS else getattr(config, key)
            # TrainingArguments turns some strings into enums ("no" -> IntervalStrategy.NO) and "none" into []
            assert parsed == value or getattr(parsed, "value", None) == value or (value, parsed) == ("none", []), key


def test_the_published_settings_are_in_the_recipes():
    distilbert = load_recipe("distilbert")
    assert distilbert["teacher"] == "bert-base-uncased"
    # Half the depth by default: for bert-base the layers DistilBERT keeps (test_default_student_layers_...).
    assert "student_layers" not in distilbert and "student_num_layers" not in distilbert
    assert distilbert["losses"]["soft_target"] == {"weight": 5.0, "temperature": 2.0}
    assert distilbert["losses"]["hard_label"] == {"weight": 2.0}
    assert distilbert["losses"]["hidden_state"]["distance"] == "cosine"
    assert distilbert["mlm_probability"] == 0.15 and distilbert["learning_rate"] == 5e-4
    vision = load_recipe("vit-mobilenet")
    assert (vision["teacher"], vision["student_config"], vision["dataset"]) == (
        "merve/beans-vit-224",
        "google/mobilenet_v2_1.4_224",
        "beans",
    )
    assert vision["losses"] == {"hard_label": {"weight": 0.5}, "soft_target": {"weight": 0.5, "temperature": 5.0}}
    assert vision["num_train_epochs"] == 30


def test_command_line_flags_override_the_recipe(tmp_path):
    args, config, _ = parse_args(
        ["--recipe", "distilbert", "--output_dir", str(tmp_path), "--learning_rate", "1e-3", "--max_length", "64",
         "--losses", '{"soft_target": {"weight": 1.0, "temperature": 4.0}}', "--student_layers", "0", "11"]
    )  # fmt: skip
    assert config.learning_rate == 1e-3 and args.max_length == 64
    assert config.losses == {"soft_target": {"weight": 1.0, "temperature": 4.0}}
    assert args.student_layers == [0, 11]
    assert config.gradient_accumulation_steps == 50  # untouched recipe values stay


def test_unknown_recipe_and_unknown_keys_fail_with_the_valid_names(tmp_path):
    with pytest.raises(
        ValueError,
        match="unknown recipe 'nope'; choose one of: distilbert, letters-cross-tokenizer, letters-on-policy",
    ):
        parse_args(["--recipe", "nope"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: x\ndataset: y\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rat'\].*learning_rate"):
        parse_args(["--recipe", str(bad)])
    with pytest.raises(ValueError, match="unknown flags \\['--no_such_flag'\\]"):
        parse_args(["--recipe", "distilbert", "--no_such_flag", "1"])


@pytest.mark.slow  # a fresh interpreter; tests/test_console.py runs one in the default suite
def test_help_lists_the_recipes():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "distill.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for name, description in available_recipes().items():
        assert name in result.stdout and description[:40] in " ".join(result.stdout.split())
    assert "--teacher " in result.stdout and "--learning_rate" in result.stdout and "--baseline" in result.stdout


def test_default_student_layers_follow_distilbert():
    assert default_student_layers(12) == [0, 2, 4, 7, 9, 11]
    assert default_student_layers(6) == [0, 2, 5]
    assert default_student_layers(6, 3) == [0, 2, 5]
    with pytest.raises(ValueError, match="student_num_layers must lie in 1..6"):
        default_student_layers(6, 7)


def test_build_student_copies_the_chosen_layers_and_embeddings():
    teacher = bert_masked_lm(layers=4)
    student, layer_map = build_student(teacher, layers=[1, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert layer_map == [[0, 0], [1, 2], [2, 4]]
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for key in ("bert.embeddings.word_embeddings.weight", "cls.predictions.transform.dense.weight"):
        assert torch.equal(student_state[key], teacher_state[key])
    for target, source in enumerate([1, 3]):
        for suffix in ("attention.self.query.weight", "output.dense.bias"):
            assert torch.equal(
                student_state[f"bert.encoder.layer.{target}.{suffix}"],
                teacher_state[f"bert.encoder.layer.{source}.{suffix}"],
            )
    assert student.cls.predictions.decoder.weight is student.bert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="must be teacher layers 0..3 .*--student_layers"):
        build_student(teacher, layers=[0, 4])


def test_layer_map_from_the_build_fills_only_terms_without_one():
    losses = {
        "hidden_state": {"weight": 1.0},
        "last": {"type": "hidden_state", "layer_map": [[-1, -1]]},
        "attention": {"weight": 1.0},
        "soft_target": {"weight": 1.0},
    }
    filled = losses_with_layer_map(losses, [[0, 0], [1, 1], [2, 4]])
    assert filled["hidden_state"]["layer_map"] == [[0, 0], [1, 1], [2, 4]]
    assert filled["last"]["layer_map"] == [[-1, -1]]
    assert filled["attention"]["layer_map"] == [[1, 1], [2, 4]]
    assert "layer_map" not in filled["soft_target"] and "layer_map" not in losses["hidden_state"]


def test_distilbert_recipe_builds_its_student_from_a_local_twelve_layer_teacher(tmp_path):
    teacher_dir = write_masked_lm_teacher(str(tmp_path / "teacher"), layers=12)
    files = write_text_files(str(tmp_path / "text"))
    args, config, _ = parse_args(
        ["--recipe", "distilbert", "--teacher", teacher_dir, "--dataset", files, "--output_dir", str(tmp_path)]
    )
    data = prepare_data(args, config.seed)
    teacher = bert_masked_lm(layers=12)
    student, layer_map = make_student(args, teacher, data, config.seed)
    assert student.config.num_hidden_layers == 6
    assert [pair[1] - 1 for pair in layer_map[1:]] == [0, 2, 4, 7, 9, 11]


def test_eval_split_is_masked_once_and_the_same_every_time(tmp_path):
    teacher_dir = write_masked_lm_teacher(str(tmp_path / "teacher"))
    files = write_text_files(str(tmp_path / "text"), lines=200)
    args, config, _ = parse_args(
        ["--recipe", "minilm-mlm", "--teacher", teacher_dir, "--dataset", files, "--output_dir", str(tmp_path)]
    )
    first = prepare_data(args, seed=3).eval
    second = prepare_data(args, seed=3).eval
    assert first["input_ids"] == second["input_ids"] and first["labels"] == second["labels"]
    labels = [label for row in first["labels"] for label in row]
    masked = sum(label != -100 for label in labels)
    assert 0.05 < masked / len(labels) < 0.3  # ~15% of the tokens, specials excluded
    rows = [(ids, lab) for ids, lab in zip(first["input_ids"], first["labels"], strict=True)]
    mask_token = 4
    replaced = sum(i == mask_token for ids, lab in rows for i, t in zip(ids, lab, strict=True) if t != -100)
    assert 0.6 < replaced / masked < 0.95  # 80% of the chosen tokens become [MASK]


@pytest.mark.slow  # reads whole offline data sets
@pytest.mark.skipif(not WORDNET_DIR.is_dir(), reason="Debian wordnet-base and fortunes are not installed")
def test_offline_text_sources_hold_what_the_packages_ship():
    reviews = load_raw_dataset("offline:rotten_tomatoes")
    assert len(reviews["train"]) + len(reviews["test"]) == 7403 + 5405
    assert reviews["train"].features["label"].names == ["rotten", "fresh"]
    raw = load_raw_dataset("offline:wordnet_fortunes")
    texts = list(raw["train"]["text"]) + list(raw["test"]["text"])
    assert len(texts) > 117_000 + 14_000  # every synset's gloss and every fortune
    assert not any("\x08" in text for text in texts)  # overstrike backspaces are stripped


@pytest.mark.slow  # reads whole offline data sets
@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist is not installed")
def test_offline_fashion_mnist_matches_the_published_split():
    data = load_raw_dataset("offline:fashion_mnist")
    assert (len(data["train"]), len(data["test"])) == (60_000, 10_000)
    first = data["train"][0]
    assert first["image"].size == (28, 28) and first["label"] == 9  # the first training image is an ankle boot


def test_model_cards_name_hub_ids_only(tmp_path):
    assert (
        hub_id("bert-base-uncased") == "bert-base-uncased" and hub_id("merve/beans-vit-224") == "merve/beans-vit-224"
    )
    assert hub_id("offline:minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("offline:fashion_mnist") == "zalando-datasets/fashion_mnist"
    assert hub_id("offline:wordnet_fortunes") is None
    assert hub_id(str(tmp_path)) is None and hub_id(str(tmp_path / "*.txt")) is None


def test_unknown_offline_source_lists_the_known_ones():
    with pytest.raises(ValueError, match="offline:rotten_tomatoes, offline:fashion_mnist, offline:wordnet_fortunes"):
        load_raw_dataset("offline:imdb")


def test_vit_mobilenet_recipe_builds_a_fresh_student_from_a_config_folder(tmp_path):
    config_dir = write_mobilenet_config(str(tmp_path / "mobilenet"))
    data_dir = write_image_dataset(str(tmp_path / "images"))
    args, config, _ = parse_args(
        ["--recipe", "vit-mobilenet", "--student_config", config_dir, "--dataset", data_dir,
         "--processor", write_vit_processor(str(tmp_path / "processor")), "--output_dir", str(tmp_path)]
    )  # fmt: skip
    data = prepare_data(args, config.seed)
    student, layer_map = make_student(args, None, data, config.seed)
    assert layer_map is None
    assert type(student).__name__ == "MobileNetV2ForImageClassification"
    assert student.config.depth_multiplier == 0.35 and student.config.num_labels == 3
    again, _ = make_student(args, None, data, config.seed)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), again.parameters(), strict=True))


def test_the_baseline_starts_from_the_checkpoint_not_the_teacher_trained_here(tmp_path):
    teacher_dir = write_encoder_teacher(str(tmp_path / "encoder"))
    data_dir = write_sentiment_dataset(str(tmp_path / "data"))
    args, config, _ = parse_args(
        ["--recipe", "minilm-rotten-tomatoes", "--teacher", teacher_dir, "--dataset", data_dir,
         "--output_dir", str(tmp_path / "run")]
    )  # fmt: skip
    data = prepare_data(args, config.seed)
    initial, missing = load_initial_teacher(args, config, data)
    # The encoder was saved without a pooler, so pooler and classifier are new.
    assert sorted(missing) == [
        "bert.pooler.dense.bias",
        "bert.pooler.dense.weight",
        "classifier.bias",
        "classifier.weight",
    ]
    checkpoint = load_file(os.path.join(teacher_dir, "model.safetensors"))
    for key, value in checkpoint.items():
        assert torch.equal(initial.state_dict()["bert." + key.removeprefix("bert.")], value), key


def test_distilbert_recipe_halves_any_teacher_and_bad_depths_name_the_flags(tmp_path):
    teacher_dir = write_masked_lm_teacher(str(tmp_path / "teacher"), layers=4)
    files = write_text_files(str(tmp_path / "text"))
    argv = ["--recipe", "distilbert", "--teacher", teacher_dir, "--dataset", files, "--output_dir", str(tmp_path)]
    args, config, _ = parse_args(argv)
    data = prepare_data(args, config.seed)
    student, layer_map = make_student(args, bert_masked_lm(layers=4), data, config.seed)
    assert student.config.num_hidden_layers == 2 and [pair[1] for pair in layer_map] == [0, 1, 4]
    for flags, message in (
        (["--student_layers", "0", "2", "4", "7"], r"teacher layers 0..3 .* --student_layers .* --student_num_layers"),
        (["--student_num_layers", "6"], r"1..4 .* --student_num_layers N with N <= 4, or --student_layers"),
    ):
        args, config, _ = parse_args([*argv, *flags])
        with pytest.raises(ValueError, match=message):
            make_student(args, bert_masked_lm(layers=4), data, config.seed)


def _write_idx(path: Path, array: np.ndarray, header: int) -> None:
    with gzip.open(path, "wb") as handle:
        handle.write(bytes(header) + array.astype(np.uint8).tobytes())


def test_offline_data_sets_are_read_from_the_folders_the_environment_names(tmp_path, monkeypatch):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images, 16)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.array([9, 0, 3]), 8)
    monkeypatch.setenv("HF_DISTILL_FASHION_MNIST_DIR", str(tmp_path))
    data = load_raw_dataset("offline:fashion_mnist")
    assert data["test"]["label"] == [9, 0, 3]
    assert np.array_equal(np.array(data["train"][1]["image"]), images[1])
    monkeypatch.setenv("HF_DISTILL_WORDNET_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base.*set HF_DISTILL_WORDNET_DIR"):
        load_raw_dataset("offline:wordnet_fortunes")

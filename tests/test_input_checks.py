"""Bad pairs and degenerate data are refused before the first step, each with an error that names the fix."""

from __future__ import annotations

import logging

import pytest
from helpers import (
    bert_classifier,
    bert_config,
    config,
    image_dataset,
    mobilenet_classifier,
    text_dataset,
    vit_classifier,
)
from pipeline_assets import SPECIAL, WORDS, write_masked_lm_teacher, write_text_files
from transformers import BertForTokenClassification, BertTokenizer, ViTImageProcessor

from hf_distill import DistillationTrainer
from hf_distill.pipeline import parse_args, prepare_data

LOSSES = {"hard_label": {"weight": 0.5}, "soft_target": {"weight": 0.5, "temperature": 2.0}}


def build(tmp_path, student=None, teacher=None, losses=LOSSES, **kwargs):
    overrides = kwargs.pop("args", {})
    return DistillationTrainer(
        model=student or bert_classifier(1, layers=2),
        teacher_model=teacher if teacher is not None else bert_classifier(0),
        args=config(tmp_path, losses, **overrides),
        **{"train_dataset": text_dataset(), **kwargs},
    )


def tokenizer(words, **special) -> BertTokenizer:
    return BertTokenizer(vocab={token: index for index, token in enumerate(SPECIAL + words)}, **special)


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    # A larger teacher vocabulary may extend the student's: only the two tokenizers can tell (tests/test_vocabulary.py).
    with pytest.raises(
        ValueError, match=r"vocabulary has 120 entries and the student's 100.*teacher_processing_class"
    ):
        build(tmp_path, bert_classifier(1, layers=2, vocab_size=100), bert_classifier(0, vocab_size=120))
    # Without soft targets too: hidden states of a teacher reading other words are no target either.
    with pytest.raises(ValueError, match="for two different tokenizers, distil a causal LM with the uld or gold loss"):
        build(tmp_path, bert_classifier(1, vocab_size=120), bert_classifier(0, vocab_size=100),
              losses={"hidden_state": {"weight": 1.0}})  # fmt: skip


def test_tokenizers_that_differ_are_refused_when_both_are_known(tmp_path):
    teacher_dir = str(tmp_path / "teacher")
    bert_classifier(0).save_pretrained(teacher_dir)
    tokenizer(WORDS).save_pretrained(teacher_dir)
    build(tmp_path, teacher=teacher_dir, processing_class=tokenizer(WORDS))  # the same tokenizer: accepted
    with pytest.raises(ValueError, match=r"map tokens to ids differently .*the uld or gold loss"):
        build(tmp_path, teacher=teacher_dir, processing_class=tokenizer(list(reversed(WORDS))))
    with pytest.raises(ValueError, match=r"special tokens: pad_token_id 1 \(student\) vs 0 \(teacher\)"):
        build(tmp_path, teacher=teacher_dir, processing_class=tokenizer(WORDS, pad_token="[UNK]"))


def test_image_processors_that_prepare_pixels_otherwise_are_named_in_a_warning(tmp_path, caplog):
    teacher_dir = str(tmp_path / "vit")
    vit_classifier(0).save_pretrained(teacher_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        teacher_dir
    )
    imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    student_processor = ViTImageProcessor(size={"height": 32, "width": 32}, **imagenet)
    with caplog.at_level(logging.WARNING, logger="hf_distill.checks"):
        build(tmp_path, mobilenet_classifier(1), teacher_dir, train_dataset=image_dataset(), processing_class=student_processor)  # fmt: skip
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "image_mean" in warning and "image_std" in warning and "pass the teacher's image processor" in warning
    assert "; size" not in warning and "(size" not in warning  # the sizes agree: not named


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        (text_dataset().select([]), {}, r"the training set is empty"),
        (
            text_dataset(3),
            {"dataloader_drop_last": True},
            r"3 examples, fewer than one batch of 4 .*dataloader_drop_last",
        ),
        (
            text_dataset().map(lambda row: {"label": row["label"] * 2}),
            {},
            r"labels from 0 to 2, but the model predicts 2",
        ),
    ],
    ids=["empty", "smaller-than-a-batch", "labels-out-of-range"],
)
def test_degenerate_training_data_is_refused(tmp_path, data, overrides, message):
    with pytest.raises(ValueError, match=message):
        build(tmp_path, train_dataset=data, args=overrides)


def test_an_eval_set_without_the_model_inputs_of_the_training_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"eval set lacks the columns \['attention_mask'\]"):
        build(tmp_path, eval_dataset=text_dataset(8).remove_columns("attention_mask"))
    build(tmp_path, eval_dataset=text_dataset(8).remove_columns("label"))  # labels are optional in evaluation


def test_out_of_range_token_labels_are_refused_and_minus_100_is_ignored(tmp_path):
    student, teacher = BertForTokenClassification(bert_config(layers=2)), BertForTokenClassification(bert_config())
    rows = text_dataset(8, labels=False)
    labels = [[-100] + [1] * (len(ids) - 1) for ids in rows["input_ids"]]
    build(tmp_path, student, teacher, train_dataset=rows.add_column("labels", labels))
    labels[3][2] = 5
    with pytest.raises(ValueError, match=r"labels from 1 to 5"):
        build(tmp_path, student, teacher, train_dataset=rows.add_column("labels", labels))


def test_a_masked_lm_text_file_with_no_line_of_text_is_refused(tmp_path):
    teacher = write_masked_lm_teacher(str(tmp_path / "teacher"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n" * 20)
    args, config_, _ = parse_args(["--recipe", "distilbert", "--teacher", teacher, "--dataset", str(blank),
                                   "--output_dir", str(tmp_path / "run")])  # fmt: skip
    with pytest.raises(ValueError, match=r"has no line of text .*non-empty lines"):
        prepare_data(args, config_.seed)
    args, config_, _ = parse_args(["--recipe", "distilbert", "--teacher", teacher, "--dataset",
                                   write_text_files(str(tmp_path / "text")), "--output_dir", str(tmp_path / "run")])  # fmt: skip
    assert len(prepare_data(args, config_.seed).train) > 0

"""A DistillationTrainer's model card (create_model_card, also run by push_to_hub) records the distillation."""

from __future__ import annotations

import pytest
from helpers import bert_classifier, config, text_dataset
from huggingface_hub import ModelCard

from hf_distill import DistillationTrainer
from hf_distill.card import CARD_KEYS, distillation_metadata

LOSSES = {"soft_target": {"weight": 0.5, "temperature": 3.0}, "hard_label": {"weight": 0.5}}


def parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def card_of(trainer) -> ModelCard:
    trainer.create_model_card(model_name="tiny-student")
    return ModelCard.load(f"{trainer.args.output_dir}/README.md")


def test_card_records_the_teacher_the_losses_and_the_compression(tmp_path):
    teacher, student = bert_classifier(seed=1), bert_classifier(seed=2, layers=2, width=8, heads=2)
    teacher.config._name_or_path = "org/tiny-teacher"  # as from_pretrained("org/tiny-teacher") would set it
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, LOSSES), train_dataset=text_dataset()
    )
    trainer.train()
    card = card_of(trainer)
    facts = card.data.hf_distill
    assert {"distillation", "hf_distill"} <= set(card.data.tags)
    assert facts["teacher"] == "org/tiny-teacher" and facts["teacher_class"] == "BertForSequenceClassification"
    assert facts["teacher_parameters"] == parameters(teacher)
    assert facts["student_parameters"] == parameters(student)
    assert facts["parameter_ratio"] == parameters(student) / parameters(teacher)
    assert facts["losses"] == LOSSES and facts["teacher_cache"] is False
    # The pipeline's card has the same keys (tests/test_pipeline.py); what only a pipeline run knows is None here.
    assert tuple(facts) == CARD_KEYS and facts["recipe"] is None and facts["teachers"] is None
    assert "## Distillation" in card.text and "`soft_target`, weight 0.5: temperature 3.0" in card.text
    assert f"| student | `BertForSequenceClassification` | {parameters(student):,} |" in card.text
    assert "tiny-student" in card.text  # the Trainer's own card is kept above
    card_again = card_of(trainer)  # written again (each push): one section, not two
    assert card_again.text.count("## Distillation") == 1


def test_card_of_a_run_from_a_cache_alone_names_the_cached_teacher(tmp_path):
    teacher = bert_classifier(seed=1)
    cache = str(tmp_path / "cache")
    first = DistillationTrainer(
        model=bert_classifier(seed=2, layers=2),
        teacher_model=teacher,
        args=config(tmp_path / "first", LOSSES, teacher_cache=cache),
        train_dataset=text_dataset(),
    )
    assert card_of(first).data.hf_distill["teacher_cache"] is True
    second = DistillationTrainer(
        model=bert_classifier(seed=2, layers=2),
        args=config(tmp_path / "second", LOSSES, teacher_cache=cache),
        train_dataset=text_dataset(),
    )
    facts = card_of(second).data.hf_distill
    assert facts["teacher_class"] == "BertForSequenceClassification"
    assert facts["teacher_parameters"] == parameters(teacher) and facts["teacher_cache"] is True


def test_a_teacher_loaded_from_a_local_folder_is_named_by_the_folder_never_its_path(tmp_path):
    folder = tmp_path / "private" / "my-teacher"
    bert_classifier(seed=1).save_pretrained(folder)
    trainer = DistillationTrainer(
        model=bert_classifier(seed=2, layers=2), teacher_model=str(folder), args=config(tmp_path / "out", LOSSES),
        train_dataset=text_dataset(),
    )  # fmt: skip
    card = card_of(trainer)
    assert card.data.hf_distill["teacher"] == "my-teacher"
    assert str(tmp_path) not in str(card)


def test_the_card_of_a_run_without_a_teacher_says_so(tmp_path):
    trainer = DistillationTrainer(model=bert_classifier(1, layers=2), train_dataset=text_dataset(8),
                                  args=config(tmp_path, {"hard_label": {}}, max_steps=1))  # fmt: skip
    trainer.train()
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "README.md")
    assert "Trained with hf_distill without a teacher" in card.text
    assert card.data.hf_distill["teacher"] is None and card.data.hf_distill["parameter_ratio"] is None


def test_the_card_metadata_refuses_a_key_outside_the_schema():
    student = {"name_or_path": None, "class": "S", "parameters": 10, "weight_bytes": 40}
    teachers = {"a": {"name_or_path": "org/a", "class": "T", "parameters": 40}, "b": {"name_or_path": "/x/b",
                "class": "T", "parameters": 20}}  # fmt: skip
    metadata = distillation_metadata(student, teachers, {}, from_cache=False, reference="b")
    assert metadata["parameter_ratio"] == 0.5 and [t["teacher"] for t in metadata["teachers"]] == ["org/a", "b"]
    assert distillation_metadata(student, teachers, {}, from_cache=False)["parameter_ratio"] == 0.25  # the largest
    with pytest.raises(TypeError, match="accuracy.*known: teacher"):
        distillation_metadata(student, teachers, {}, from_cache=False, accuracy=0.9)

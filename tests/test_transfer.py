"""Transfer sets: unlabeled examples learn from the teacher, hard_label counts the labeled ones only."""

import pytest
import torch
from datasets import ClassLabel, Dataset
from helpers import bert_classifier, config, text_dataset

from hf_distill import DistillationTrainer
from hf_distill.transfer import UNLABELED, with_transfer_set

LOSSES = {"hard_label": {"weight": 1.0}, "soft_target": {"weight": 1.0, "temperature": 2.0}}


def train_logs(trainer):
    return [log for log in trainer.state.log_history if "loss" in log]


def mixed_set() -> Dataset:
    """16 examples in order: 4 labeled, 4 unlabeled, 2 labeled + 2 unlabeled, 4 unlabeled; micro-batches of 4
    hold 4, 0, 2 and 0 labels, batches of 8 hold 4 and 2."""
    data = text_dataset(16, seed=3)
    labeled, unlabeled = data.select(range(6)), data.select(range(6, 16))
    mixed = with_transfer_set(labeled, unlabeled)
    order = [0, 1, 2, 3, 6, 7, 8, 9, 4, 5, 10, 11, 12, 13, 14, 15]
    return mixed.select(order)


def _train(tmp_path, dataset, **overrides):
    trainer = DistillationTrainer(
        model=bert_classifier(seed=2, layers=2, width=8, heads=2),
        teacher_model=bert_classifier(seed=1),
        args=config(
            tmp_path, LOSSES, train_sampling_strategy="sequential", optim="sgd", max_grad_norm=0.0, **overrides
        ),  # fmt: skip
        train_dataset=dataset,
    )
    trainer.train()
    return trainer


def test_with_transfer_set_marks_the_unlabeled_examples():
    labeled = Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}).cast_column(
        "label", ClassLabel(names=["n", "p"])
    )
    unlabeled = Dataset.from_dict({"text": ["c", "d", "e"], "label": [1, 1, 0]})  # its labels are dropped
    mixed = with_transfer_set(labeled, unlabeled)
    assert mixed["text"] == ["a", "b", "c", "d", "e"]
    assert mixed["label"] == [1, 0, UNLABELED, UNLABELED, UNLABELED]
    with pytest.raises(ValueError, match="differ from the labeled set's"):
        with_transfer_set(labeled, Dataset.from_dict({"sentence": ["c"]}))
    with pytest.raises(ValueError, match="no label column"):
        with_transfer_set(Dataset.from_dict({"text": ["a"]}), unlabeled)
    with pytest.raises(ValueError, match="not one class index per example"):
        with_transfer_set(Dataset.from_dict({"text": ["a"], "label": [0.5]}), unlabeled)


def test_hard_label_counts_labeled_examples_and_soft_target_counts_all(tmp_path):
    dataset = mixed_set()
    student, teacher = bert_classifier(seed=2, layers=2, width=8, heads=2), bert_classifier(seed=1)
    batch = {key: torch.tensor(dataset[:8][key]) for key in ("input_ids", "attention_mask", "label")}
    with torch.no_grad():
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labeled = batch["label"] != UNLABELED
    assert labeled.sum() == 4
    expected_hard = torch.nn.functional.cross_entropy(student_logits[labeled], batch["label"][labeled])
    log_student, log_teacher = (torch.log_softmax(x / 2.0, -1) for x in (student_logits, teacher_logits))
    expected_soft = (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean() * 4.0  # all 8 examples, T²

    first = train_logs(_train(tmp_path, dataset, max_steps=1, per_device_train_batch_size=8))[0]
    assert first["hard_label"] == pytest.approx(expected_hard.item(), rel=1e-5)
    assert first["soft_target"] == pytest.approx(expected_soft.item(), rel=1e-5)


def test_gradient_accumulation_is_exact_with_unlabeled_micro_batches(tmp_path):
    # Micro-batches of 4 hold 4, 0, 2 and 0 labels: the all-unlabeled ones add no hard-label gradient (and no NaN
    # from a mean over no labels), the others weigh each label as one batch of 8 would.
    dataset = mixed_set()
    big = _train(tmp_path / "big", dataset, max_steps=2, per_device_train_batch_size=8)
    accumulated = _train(
        tmp_path / "accumulated", dataset, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    for key, value in big.model.state_dict().items():
        torch.testing.assert_close(accumulated.model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    for a, b in zip(train_logs(big), train_logs(accumulated), strict=True):
        for term in LOSSES:
            assert a[term] == pytest.approx(b[term], rel=1e-4)

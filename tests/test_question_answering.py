"""Extractive question answering (DistilBERT's SQuAD setting): soft targets on the start and end distributions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import bert_classifier, bert_qa, config, qa_dataset
from transformers import AutoModelForQuestionAnswering, BertForQuestionAnswering

from hf_distill import DistillationTrainer
from hf_distill.losses import SoftTargetLoss

QA_LOSSES = {
    "soft_target": {"weight": 0.5, "temperature": 2.0},
    "hard_label": {"weight": 0.5},
    "hidden_state": {"weight": 1.0, "distance": "cosine", "layer_map": [[-1, -1]]},
}


def test_span_soft_target_is_the_mean_of_start_and_end_divergences_over_real_positions():
    loss = SoftTargetLoss(temperature=3.0)
    loss.setup(bert_qa(seed=2, layers=2), bert_qa(seed=1))
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor(qa_dataset(6).to_dict()["attention_mask"])

    def outputs(scale: float, shape: torch.Size = mask.shape):
        logits = torch.randn(2, *shape, generator=generator) * scale
        return SimpleNamespace(start_logits=logits[0], end_logits=logits[1])

    student, teacher = outputs(2.0), outputs(4.0)
    value = loss(student, teacher, {"attention_mask": mask})
    expected = 0.0
    for i, length in enumerate(mask.sum(1).tolist()):  # each example over its real positions, in float64
        for name in ("start_logits", "end_logits"):
            student_log_probs = F.log_softmax(getattr(student, name)[i, :length].double() / 3.0, -1)
            teacher_probs = F.softmax(getattr(teacher, name)[i, :length].double() / 3.0, -1)
            expected += 0.5 * 9.0 * (teacher_probs * (teacher_probs.log() - student_log_probs)).sum()
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)

    # Whatever the logits at padding positions, and however many there are, the value is the same.
    padded_mask = F.pad(mask, (0, 4))
    noisy = {side: outputs(50.0, padded_mask.shape) for side in ("student", "teacher")}
    for side, clean in (("student", student), ("teacher", teacher)):
        for name in ("start_logits", "end_logits"):
            logits = getattr(noisy[side], name)
            logits[padded_mask.bool()] = getattr(clean, name)[mask.bool()]
    padded_value = loss(noisy["student"], noisy["teacher"], {"attention_mask": padded_mask})
    torch.testing.assert_close(padded_value, value, rtol=1e-6, atol=1e-7)


def test_question_answering_distils_and_evaluates_with_span_labels(tmp_path):
    teacher = bert_qa(seed=1)
    seen_by_teacher = []
    teacher.register_forward_pre_hook(lambda _, args, kwargs: seen_by_teacher.append(set(kwargs)), with_kwargs=True)
    trainer = DistillationTrainer(
        model=bert_qa(seed=2, layers=2),
        teacher_model=teacher,
        args=config(tmp_path, QA_LOSSES, max_steps=3),
        train_dataset=qa_dataset(),
        eval_dataset=qa_dataset(8, seed=3),
    )
    assert trainer.label_names == ["start_positions", "end_positions"]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        expected = 0.5 * entry["soft_target"] + 0.5 * entry["hard_label"] + entry["hidden_state"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-4) and entry["soft_target"] > 0
    # The teacher is never handed the answer span (it would compute a loss of its own).
    assert seen_by_teacher and not any({"start_positions", "end_positions"} & keys for keys in seen_by_teacher)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_soft_target", "eval_hard_label", "eval_hidden_state"} <= set(metrics)
    predictions = trainer.predict(qa_dataset(8, seed=3))
    start_logits, end_logits = predictions.predictions
    assert start_logits.shape == end_logits.shape == (8, 12)

    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "student"))
    assert isinstance(reloaded, BertForQuestionAnswering)


def test_question_answering_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="two question-answering models"):
        DistillationTrainer(
            model=bert_qa(seed=2, layers=2),
            teacher_model=bert_classifier(seed=1),
            args=config(tmp_path, {"soft_target": {}}),
            train_dataset=qa_dataset(),
        )
    with pytest.raises(ValueError, match="use source 'hidden_state'"):
        DistillationTrainer(
            model=bert_qa(seed=2, layers=2),
            teacher_model=bert_qa(seed=1),
            args=config(tmp_path, {"relation": {"source": "logits"}}),
            train_dataset=qa_dataset(),
        )
    with pytest.raises(ValueError, match="add 'start_positions' and 'end_positions' columns"):
        DistillationTrainer(
            model=bert_qa(seed=2, layers=2),
            args=config(tmp_path, {"hard_label": {}}),
            train_dataset=qa_dataset().remove_columns(["start_positions", "end_positions"]),
        )
    # Labels that reach the batch under another name: refused at the first step, naming the span columns.
    with pytest.raises(ValueError, match="start_positions / end_positions"):
        DistillationTrainer(
            model=bert_qa(seed=2, layers=2),
            args=config(tmp_path, {"hard_label": {}}, max_steps=1),
            train_dataset=qa_dataset().remove_columns(["end_positions"]),
        ).train()

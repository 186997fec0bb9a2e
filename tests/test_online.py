"""Teachers that learn: mutual learning (trainable teachers) and a teacher that is a moving average of the student."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import bert_classifier, bert_masked_lm, config, masked_lm_dataset, text_dataset
from transformers import AutoModelForSequenceClassification, TrainerCallback

from hf_distill import DistillationTrainer

DML = {"hard_label": {"weight": 1.0}, "soft_target": {"weight": 1.0, "temperature": 2.0}}
SGD = dict(optim="sgd", max_grad_norm=0.0, learning_rate=0.2, lr_scheduler_type="constant")


def mutual(tmp_path, student, teacher, losses=DML, dataset=None, **overrides):
    settings = {**SGD, "trainable_teachers": ["teacher"], **overrides}
    return DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path, losses, **settings),
                               train_dataset=dataset if dataset is not None else text_dataset(8))  # fmt: skip


def test_one_step_of_two_peers_is_the_deep_mutual_learning_update(tmp_path):
    student, teacher = bert_classifier(2, layers=2), bert_classifier(1)
    by_hand = {"student": copy.deepcopy(student), "teacher": copy.deepcopy(teacher)}
    trainer = mutual(
        tmp_path, student, teacher, max_steps=1, per_device_train_batch_size=8, trainable_teacher_learning_rate=0.05
    )
    trainer.train()

    data = text_dataset(8)
    inputs = {key: torch.tensor(data[key]) for key in ("input_ids", "attention_mask")}
    labels = torch.tensor(data["label"])
    logits = {name: model(**inputs).logits for name, model in by_hand.items()}

    def peer_loss(own, other):  # CE(p_k, y) + T² KL(p_l ‖ p_k), the other peer detached
        target = F.softmax(other.detach() / 2.0, -1)
        kl = (target * (target.log() - F.log_softmax(own / 2.0, -1))).sum(-1).mean() * 4.0
        return F.cross_entropy(own, labels) + kl

    losses = {"student": peer_loss(logits["student"], logits["teacher"]),
              "teacher": peer_loss(logits["teacher"], logits["student"])}  # fmt: skip
    for name, learning_rate in (("student", 0.2), ("teacher", 0.05)):
        model = by_hand[name]
        gradients = torch.autograd.grad(losses[name], list(model.parameters()), allow_unused=True)
        with torch.no_grad():
            for parameter, gradient in zip(model.parameters(), gradients, strict=True):
                if gradient is not None:
                    parameter -= learning_rate * gradient
    trained = {"student": trainer.model, "teacher": trainer.teachers["teacher"].reference}
    for name, model in by_hand.items():
        for (key, expected), actual in zip(
            model.state_dict().items(), trained[name].state_dict().values(), strict=True
        ):
            torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5, msg=f"{name}.{key}")
    logged = trainer.state.log_history[0]
    assert {"hard_label", "soft_target", "teacher_hard_label", "teacher_soft_target"} <= set(logged)
    assert logged["teacher_hard_label"] == pytest.approx(F.cross_entropy(logits["teacher"], labels).item(), rel=1e-5)


def test_gradient_accumulation_is_exact_with_a_teacher_that_learns(tmp_path):
    losses = {**DML, "hidden_state": {"weight": 1.0}}
    runs = {}
    for name, batch, steps in (("big", 8, 1), ("accumulated", 4, 2)):
        runs[name] = mutual(tmp_path / name, bert_masked_lm(2, layers=2, width=8, heads=2), bert_masked_lm(1), losses,
                            masked_lm_dataset(16), max_steps=2, per_device_train_batch_size=batch,
                            gradient_accumulation_steps=steps)  # fmt: skip
        runs[name].train()
    for part in ("student", "teacher"):
        big, accumulated = (
            (run.model if part == "student" else run.teachers["teacher"].reference).state_dict()
            for run in (runs["big"], runs["accumulated"])
        )
        for key, value in big.items():
            torch.testing.assert_close(accumulated[key], value, atol=1e-6, rtol=1e-5, msg=f"{part}.{key}")


def test_a_learning_teacher_evaluates_and_saves_beside_the_student_on_request(tmp_path):
    trainer = mutual(tmp_path, bert_classifier(2, layers=2), bert_classifier(1), max_steps=2,
                     save_trained_teachers=True, max_grad_norm=1.0)  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate(text_dataset(8, seed=1))
    assert {"eval_teacher_hard_label", "eval_teacher_soft_target", "eval_soft_target"} <= set(metrics)
    trainer.save_model()
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert student.config.num_hidden_layers == 2
    teacher = AutoModelForSequenceClassification.from_pretrained(os.path.join(tmp_path, "teachers", "teacher"))
    for key, value in trainer.teachers["teacher"].reference.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[key], value, msg=key)
    assert teacher.config.num_hidden_layers == 4 and teacher.training is False


def test_what_a_learning_teacher_cannot_do_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="teacher cache stores fixed outputs"):
        mutual(tmp_path, bert_classifier(2, layers=2), bert_classifier(1), teacher_cache=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="trainable_teachers names \\['other'\\]"):
        mutual(tmp_path, bert_classifier(2, layers=2), bert_classifier(1), trainable_teachers=["other"])
    with pytest.raises(ValueError, match="no hard_label or soft_target term"):
        mutual(tmp_path, bert_classifier(2, layers=2), bert_classifier(1), losses={"relation": {}})


def test_the_moving_average_teacher_follows_its_formula(tmp_path):
    momentum = 0.6
    student = bert_classifier(2, layers=2)
    start = copy.deepcopy(student.state_dict())
    seen = []

    class Record(TrainerCallback):  # the student's weights after each optimizer step
        def on_step_end(self, args, state, control, **kwargs):
            seen.append({key: value.clone() for key, value in student.state_dict().items()})

    trainer = DistillationTrainer(model=student, teacher_model="ema", train_dataset=text_dataset(16),
                                  args=config(tmp_path, DML, max_steps=3, ema_momentum=momentum, **SGD),
                                  callbacks=[Record()])  # fmt: skip
    assert trainer.teachers["teacher"].model is not student
    trainer.train()
    average = dict(start)
    for weights in seen:
        average = {key: momentum * average[key] + (1 - momentum) * weights[key] for key in average}
    teacher = trainer.teachers["teacher"].reference
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, average[key], atol=1e-6, rtol=1e-5, msg=key)
    # It teaches: the soft-target term of the first step is zero (the copy agrees with the student), then not.
    steps = [log for log in trainer.state.log_history if "soft_target" in log]
    assert steps[0]["soft_target"] == pytest.approx(0.0, abs=1e-7) and steps[-1]["soft_target"] > 0


def test_deep_to_shallow_equals_its_formula_and_trains_exits_that_stay_out_of_the_student(tmp_path):
    from hf_distill.losses import DeepToShallowLoss

    student = bert_classifier(2, layers=3)
    loss = DeepToShallowLoss(layers=[1, -2], temperature=2.0, alpha=0.4, feature_weight=0.1)
    loss.term = "deep_to_shallow"
    loss.setup(student, None)
    assert loss.layers == [1, 2] and len(loss.exits) == 2
    data = text_dataset(6)
    inputs = {key: torch.tensor(data[key]) for key in ("input_ids", "attention_mask")}
    inputs["labels"] = torch.tensor(data["label"])
    outputs = student(**inputs, output_hidden_states=True)
    by_hand = 0.0
    final = outputs.hidden_states[-1][:, 0].detach()
    target = F.softmax(outputs.logits.detach() / 2.0, -1)
    for layer, head in zip([1, 2], loss.exits, strict=True):
        feature = outputs.hidden_states[layer][:, 0]
        logits = head(feature)
        kl = (target * (target.log() - F.log_softmax(logits / 2.0, -1))).sum(-1) * 4.0
        ce = F.cross_entropy(logits, inputs["labels"], reduction="none")
        by_hand = by_hand + (0.6 * ce + 0.4 * kl + 0.1 * (feature - final).pow(2).sum(-1)).sum()
    torch.testing.assert_close(loss(outputs, None, inputs), by_hand, atol=1e-5, rtol=1e-5)

    losses = {"hard_label": {"weight": 1.0}, "deep_to_shallow": {"weight": 1.0, "layers": [1, 2]}}
    trainer = DistillationTrainer(model=bert_classifier(2, layers=3), args=config(tmp_path, losses, max_steps=2),
                                  train_dataset=text_dataset(16))  # fmt: skip
    exits = {key: value.clone() for key, value in trainer.distillation_losses.state_dict().items()}
    trainer.train()
    assert "deep_to_shallow" in trainer.state.log_history[0]
    changed = trainer.distillation_losses.state_dict()
    assert any(not torch.equal(changed[key], value) for key, value in exits.items())  # the exits learnt
    trainer.save_model()
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert set(saved.state_dict()) == set(bert_classifier(0, layers=3).state_dict())


def test_deep_to_shallow_refuses_what_it_cannot_do():
    from hf_distill.losses import DeepToShallowLoss

    with pytest.raises(ValueError, match="needs 'layers'"):
        DeepToShallowLoss()
    loss = DeepToShallowLoss(layers=[4])
    with pytest.raises(ValueError, match="the last \\(4\\) is the teacher"):
        loss.setup(bert_classifier(0), None)
    with pytest.raises(ValueError, match="sequence and image classifiers"):
        DeepToShallowLoss(layers=[1]).setup(bert_masked_lm(0), None)

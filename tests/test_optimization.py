"""What the optimizer sees: gradient accumulation under plain SGD, clipping groups and weight-decay groups.

AdamW divides each gradient by its own running scale, so a gradient off by a uniform factor trains the same under
it; these tests use SGD, where a scale error moves the weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import bert_classifier, bert_masked_lm, config, masked_lm_dataset, text_dataset

from hf_distill import DistillationTrainer

SGD = dict(optim="sgd", lr_scheduler_type="constant", learning_rate=0.5)


def test_gradient_accumulation_under_sgd_without_clipping_matches_one_big_batch(tmp_path):
    losses = {
        "soft_target": {"weight": 1.0, "temperature": 2.0},
        "hard_label": {"weight": 1.0},
        "hidden_state": {"weight": 1.0},  # projected: widths 8 vs 16
    }
    dataset = masked_lm_dataset(16)
    runs = {}
    for name, batch, accumulation in (("big", 8, 1), ("accumulated", 4, 2), ("finer", 2, 4)):
        trainer = DistillationTrainer(
            model=bert_masked_lm(seed=2, layers=2, width=8, heads=2),
            teacher_model=bert_masked_lm(seed=1),
            args=config(
                tmp_path / name,
                losses,
                max_steps=2,
                max_grad_norm=0.0,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                **SGD,
            ),
            train_dataset=dataset,
        )
        trainer.train()
        runs[name] = trainer
    start = bert_masked_lm(seed=2, layers=2, width=8, heads=2).state_dict()
    big = runs["big"].model.state_dict()
    assert any((big[key] - start[key]).abs().max() > 1e-3 for key in big)  # the steps moved the weights
    for name in ("accumulated", "finer"):
        for key, value in big.items():
            torch.testing.assert_close(runs[name].model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
        for key, value in runs["big"].distillation_losses.state_dict().items():
            torch.testing.assert_close(runs[name].distillation_losses.state_dict()[key], value, atol=1e-6, rtol=1e-5)


def test_one_step_clips_student_and_projectors_together_a_learning_teacher_apart_and_decays_by_group(tmp_path):
    """One SGD step of a student with a projector and a teacher that learns (deep mutual learning), by hand:
    the student's and the projector's gradients are clipped as one vector, the teacher's on its own; weight decay
    applies to the student's and the teacher's weight matrices and embeddings, not to their biases and LayerNorms,
    and to every projector parameter (one group of their own)."""
    temperature, max_norm, weight_decay, learning_rate, teacher_learning_rate = 2.0, 0.05, 0.1, 0.5, 0.2
    losses = {
        "hard_label": {"weight": 1.0},
        "soft_target": {"weight": 1.0, "temperature": temperature},
        "hidden_state": {"weight": 1.0, "layer_map": [[-1, -1]]},  # 8 -> 16 wide: one projector
    }
    student, teacher = bert_classifier(seed=2, layers=2, width=8, heads=2), bert_classifier(seed=1)
    by_hand = {"student": copy.deepcopy(student), "teacher": copy.deepcopy(teacher)}
    dataset = text_dataset(8)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(
            tmp_path,
            losses,
            max_steps=1,
            per_device_train_batch_size=8,
            max_grad_norm=max_norm,
            weight_decay=weight_decay,
            trainable_teachers=["teacher"],
            trainable_teacher_learning_rate=teacher_learning_rate,
            **SGD,
        ),
        train_dataset=dataset,
    )
    projector = trainer.distillation_losses["hidden_state"].projectors[0]
    by_hand["projector"] = copy.deepcopy(projector)
    trainer.train()

    inputs = {key: torch.tensor(dataset[key]) for key in ("input_ids", "attention_mask")}
    labels, mask = torch.tensor(dataset["label"]), inputs["attention_mask"].float()
    outputs = {name: by_hand[name](**inputs, output_hidden_states=True) for name in ("student", "teacher")}

    def soft_target(own, other):  # T² KL(other ‖ own), the other model detached
        target = F.softmax(other.detach() / temperature, -1)
        return (target * (target.log() - F.log_softmax(own / temperature, -1))).sum(-1).mean() * temperature**2

    logits = {name: output.logits for name, output in outputs.items()}
    projected = by_hand["projector"](outputs["student"].hidden_states[-1])
    hidden = ((projected - outputs["teacher"].hidden_states[-1].detach()).pow(2).mean(-1) * mask).sum() / mask.sum()
    student_loss = F.cross_entropy(logits["student"], labels) + soft_target(logits["student"], logits["teacher"])
    teacher_loss = F.cross_entropy(logits["teacher"], labels) + soft_target(logits["teacher"], logits["student"])
    groups = {
        "student": (student_loss + hidden, [*by_hand["student"].parameters(), *by_hand["projector"].parameters()]),
        "teacher": (teacher_loss, list(by_hand["teacher"].parameters())),
    }
    gradients, scales = {}, {}
    for name, (loss, parameters) in groups.items():
        grads = torch.autograd.grad(loss, parameters, allow_unused=True, retain_graph=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads, strict=True)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scales[name] = min(1.0, max_norm / (norm.item() + 1e-6))
        gradients.update({id(p): g for p, g in zip(parameters, grads, strict=True)})
    assert scales["student"] < 1 and scales["teacher"] < 1  # both clipped
    student_alone = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(gradients[id(p)]) for p in by_hand["student"].parameters()])
    )
    assert max_norm / student_alone.item() != pytest.approx(scales["student"], rel=1e-3)  # the projector counts

    decayed = {
        "student": set(trainer.get_decay_parameter_names(by_hand["student"])),
        "teacher": set(trainer.get_decay_parameter_names(by_hand["teacher"])),
        "projector": {name for name, _ in by_hand["projector"].named_parameters()},
    }
    assert decayed["student"] and "bert.embeddings.LayerNorm.weight" not in decayed["student"]
    rates = {"student": learning_rate, "projector": learning_rate, "teacher": teacher_learning_rate}
    trained = {"student": trainer.model, "projector": projector, "teacher": trainer.teachers["teacher"].reference}
    for part, model in by_hand.items():
        scale = scales["teacher" if part == "teacher" else "student"]
        actual = dict(trained[part].named_parameters())
        for name, parameter in model.named_parameters():
            step = scale * gradients[id(parameter)] + (weight_decay * parameter if name in decayed[part] else 0.0)
            expected = parameter.detach() - rates[part] * step
            torch.testing.assert_close(actual[name].detach(), expected, atol=1e-6, rtol=1e-5, msg=f"{part}.{name}")

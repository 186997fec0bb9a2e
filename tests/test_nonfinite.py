"""NaN and infinity never train silently: each stops training before the optimizer step, naming its source."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import bert_classifier, bert_masked_lm, config, masked_lm_dataset, text_dataset

from hf_distill import DistillationLoss, DistillationTrainer, register_loss
from hf_distill.cache.teacher_cache import TeacherCache

LOSSES = {"hard_label": {"weight": 0.5}, "soft_target": {"weight": 0.5, "temperature": 2.0}}


def poison(module: torch.nn.Module, calls: set[int], value: float = float("nan")):
    """Make the module's output `value` on the given calls (counted from 0)."""
    seen = {"calls": 0}

    def hook(_module, _inputs, output):
        index, seen["calls"] = seen["calls"], seen["calls"] + 1
        if index in calls:
            return output * value  # keeps the graph: a student's NaN reaches its gradients too
        return output

    return module.register_forward_hook(hook)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_a_teacher_that_outputs_nan_stops_training_before_the_step_and_names_the_teacher(tmp_path):
    teacher, student = bert_classifier(0), bert_classifier(1, layers=2)
    poison(teacher.classifier, {2})  # the third teacher forward: the first micro-batch of optimizer step 2
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, LOSSES, gradient_accumulation_steps=2),
        train_dataset=text_dataset(),
    )  # fmt: skip
    assert trainer.args.logging_nan_inf_filter  # the Trainer's default, which hid the NaN before
    before = {}
    original_step = trainer.check_finite_step

    def remember_then_check():
        if trainer.state.global_step == 1:
            before.update(weights(trainer.model))
        original_step()

    trainer.check_finite_step = remember_then_check
    with pytest.raises(FloatingPointError) as raised:
        trainer.train()
    message = str(raised.value)
    assert "optimizer step 2" in message and "the teacher's logits" in message
    assert "float16" in message  # the likely cause, and what to do about it
    assert trainer.state.global_step == 1
    for name, value in trainer.model.state_dict().items():  # step 2 was not applied
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    trainer.save_model(str(tmp_path / "student"))  # the student is still finite, so it may be saved
    assert os.path.isfile(tmp_path / "student" / "model.safetensors")


def test_a_nan_student_names_the_terms_and_an_infinite_gradient_names_the_parameter(tmp_path):
    teacher, student = bert_classifier(0), bert_classifier(1, layers=2)
    handle = poison(student.classifier, {0})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path, LOSSES),
                                  train_dataset=text_dataset())  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"step 1: .*'the hard_label term'.*'the soft_target term'") as raised:
        trainer.train()
    assert "temperature" in str(raised.value) and "teacher's" not in str(raised.value).split("Likely")[0]
    handle.remove()

    student = bert_classifier(1, layers=2)
    student.classifier.weight.register_hook(lambda gradient: torch.full_like(gradient, float("inf")))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path, LOSSES, max_grad_norm=0),
                                  train_dataset=text_dataset())  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"the gradients of classifier.weight") as raised:
        trainer.train()
    assert "learning_rate" in str(raised.value) and "term" not in str(raised.value).split("Likely")[0]


@register_loss("overflowing_term")
class OverflowingTerm(DistillationLoss):
    """A term that overflows at its second call."""

    calls = 0

    def forward(self, student_outputs, teacher_outputs, inputs):
        OverflowingTerm.calls += 1
        value = student_outputs.logits.sum() * 0
        return value + (float("inf") if OverflowingTerm.calls == 2 else 0.0)


def test_a_term_of_ones_own_is_named_and_check_finite_false_trains_on(tmp_path):
    losses = {**LOSSES, "overflowing_term": {"weight": 1.0}}
    OverflowingTerm.calls = 0
    trainer = DistillationTrainer(model=bert_classifier(1, layers=2), teacher_model=bert_classifier(0),
                                  args=config(tmp_path, losses), train_dataset=text_dataset())  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"step 2: .*'the overflowing_term term'.*'the total loss'"):
        trainer.train()
    OverflowingTerm.calls = 0
    unchecked = DistillationTrainer(model=bert_classifier(1, layers=2), teacher_model=bert_classifier(0),
                                    args=config(tmp_path, losses, check_finite=False), train_dataset=text_dataset())  # fmt: skip
    unchecked.train()  # the opt-out: the Trainer's own behaviour
    assert unchecked.state.global_step == 4


def test_a_student_with_nan_weights_is_never_written(tmp_path):
    student = bert_classifier(1, layers=2)
    trainer = DistillationTrainer(model=student, teacher_model=bert_classifier(0), args=config(tmp_path, LOSSES),
                                  train_dataset=text_dataset())  # fmt: skip
    with torch.no_grad():
        student.classifier.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"not saving the model .* classifier.bias"):
        trainer.save_model(str(tmp_path / "student"))
    assert not (tmp_path / "student").exists()


def test_building_a_cache_refuses_non_finite_teacher_outputs_at_their_example(tmp_path):
    teacher, student = bert_masked_lm(0), bert_masked_lm(1, layers=2)
    data = masked_lm_dataset(24)
    seen = {}
    teacher.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.update(ids=kwargs.get("input_ids")), with_kwargs=True
    )
    marked = torch.tensor(data[8]["input_ids"])

    def overflow(_module, _inputs, output):  # the prediction head overflows on the batch of examples 8..15
        ids = seen["ids"]
        if ids is None or ids.shape[0] != 8 or not torch.equal(ids[0], marked):
            return output
        output = output.clone()
        output[-1] = float("inf")  # the last counted row: example 15's last masked token
        return output

    teacher.cls.register_forward_hook(overflow)
    cache = str(tmp_path / "cache")
    args = config(tmp_path, {"soft_target": {"weight": 1.0}}, teacher_cache=cache, teacher_cache_top_k=0,
                  per_device_eval_batch_size=8)  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"training examples \[15\] hold NaN or infinite") as raised:
        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    assert "float16" in str(raised.value)
    assert not TeacherCache.is_finished(cache)
    assert "shard-000000000-000000008.safetensors" in os.listdir(cache)  # the whole batch before is kept

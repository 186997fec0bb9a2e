"""The vocabulary projection left to the losses (`fused_token_logits`), and convolutional models in channels-last."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    VOCAB,
    bert_masked_lm,
    config,
    image_dataset,
    masked_lm_dataset,
    mobilenet_classifier,
    vit_classifier,
)
from test_logit_rows import causal_lm_dataset, gpt2
from transformers import AutoModelForImageClassification

from hf_distill import DistillationTrainer
from hf_distill.logit_rows import ProjectedRows, output_head, supports_deferred
from hf_distill.losses import projected_rows_loss, rows_per_chunk
from hf_distill.losses.functional import soft_target_loss

LOSSES = {
    # A chunk of 7 rows: every batch spans several chunks, the last one partial.
    "soft_target": {"weight": 1.0, "temperature": 2.0, "divergence": "jsd", "chunk_size": 7},
    "hard_label": {"weight": 0.5},
    "hidden_state": {"weight": 1.0, "distance": "cosine", "layer_map": [[-1, -1]]},
}
PAIRS = {
    "masked_lm": (lambda: bert_masked_lm(seed=1), lambda: bert_masked_lm(seed=2, layers=2), masked_lm_dataset),
    "causal_lm": (lambda: gpt2(seed=1, layers=4), lambda: gpt2(seed=2), causal_lm_dataset),
}


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_fused_logits_train_exactly_like_projected_rows_and_never_hold_vocabulary_rows(tmp_path, pair):
    make_teacher, make_student, make_data = PAIRS[pair]
    runs, head_outputs = {}, {}
    for fused in (True, False):
        student, teacher = make_student(), make_teacher()
        shapes = head_outputs[fused] = []
        for model in (student, teacher):
            output_head(model).register_forward_hook(lambda _m, _a, output, shapes=shapes: shapes.append(output.shape))
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config(tmp_path / str(fused), LOSSES, max_steps=4, fused_token_logits=fused),
            train_dataset=make_data(),
        )
        plan = trainer.logit_rows
        assert plan.defers("student") is fused and plan.defers("teacher") is fused
        shapes.clear()  # the plan's probes
        trainer.train()
        runs[fused] = trainer
    # Fused, the projection's forward returns the hidden states of the counted rows: nothing vocabulary-wide.
    assert head_outputs[True] and all(shape[-1] != VOCAB for shape in head_outputs[True])
    assert all(shape[-1] == VOCAB for shape in head_outputs[False])
    fused, projected = runs[True], runs[False]
    for a, b in zip(fused.state.log_history, projected.state.log_history, strict=True):
        for term in (*LOSSES, "loss"):
            if term in b:
                assert a[term] == pytest.approx(b[term], rel=1e-5, abs=1e-7), term
    for key, value in projected.model.state_dict().items():
        torch.testing.assert_close(fused.model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    # Afterwards the projection is the model's own again, and evaluation sees full logits.
    head = output_head(fused.model)
    assert "forward" not in vars(head) and not head._forward_pre_hooks
    metrics = fused.evaluate(PAIRS[pair][2](8))
    expected = projected.evaluate(PAIRS[pair][2](8))["eval_soft_target"]
    assert metrics["eval_soft_target"] == pytest.approx(expected, rel=1e-5)


def test_projected_rows_loss_has_the_value_and_gradients_of_the_projected_logits():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 8, generator=generator, requires_grad=True)
    weight = torch.randn(50, 8, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True)
    targets = torch.randn(23, 50, generator=generator)

    def row_loss(rows, start, end):
        return soft_target_loss(rows, targets[start:end], 2.0, "forward_kl", reduction="sum")

    expected = row_loss(torch.nn.functional.linear(hidden, weight, bias), 0, 23)
    expected_grads = torch.autograd.grad(expected * 3.0, (hidden, weight, bias))
    value = projected_rows_loss(ProjectedRows(hidden, weight, bias), row_loss, chunk_size=5)
    grads = torch.autograd.grad(value * 3.0, (hidden, weight, bias))  # backward scales the stored gradients
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradient wanted: the same value, nothing stored
        torch.testing.assert_close(projected_rows_loss(ProjectedRows(hidden, weight, bias), row_loss, 5), expected)
    assert rows_per_chunk(50257) == 83 and rows_per_chunk(30522) == 137 and rows_per_chunk(10**7) == 16


def scaled_logits(model):
    """`model`, changing its projection's output before returning it (as logit soft-capping does)."""

    def scale(_module, _args, outputs):
        outputs["logits"] = outputs.logits * 2.0
        return outputs

    model.register_forward_hook(scale)
    return model


def test_a_model_that_changes_its_logits_keeps_its_projection(tmp_path):
    student = scaled_logits(gpt2(seed=2))
    assert supports_deferred(gpt2(seed=2)) and not supports_deferred(student)
    trainer = DistillationTrainer(
        model=student, teacher_model=gpt2(seed=1, layers=4), args=config(tmp_path, LOSSES, max_steps=2),
        train_dataset=causal_lm_dataset(),
    )  # fmt: skip
    assert trainer.logit_rows.student and not trainer.logit_rows.defers("student")
    assert trainer.logit_rows.defers("teacher")  # the plain GPT-2 teacher still is
    trainer.train()
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)


def test_an_override_that_reads_the_logits_gets_projected_rows(tmp_path):
    class Reading(DistillationTrainer):
        def compute_distillation_loss(self, student_outputs, teacher_outputs, inputs):
            assert isinstance(student_outputs.logits, torch.Tensor)
            assert isinstance(teacher_outputs.logits, torch.Tensor)
            return super().compute_distillation_loss(student_outputs, teacher_outputs, inputs)

    trainer = Reading(
        model=gpt2(seed=2), teacher_model=gpt2(seed=1, layers=4), args=config(tmp_path, LOSSES, max_steps=2),
        train_dataset=causal_lm_dataset(),
    )  # fmt: skip
    assert trainer.logit_rows.student and not trainer.logit_rows.defers("student")
    trainer.train()


def test_convolutional_models_train_in_channels_last_and_save_in_the_usual_layout(tmp_path):
    student, teacher = mobilenet_classifier(seed=2), vit_classifier(seed=1)
    reference = mobilenet_classifier(seed=2)
    losses = {"soft_target": {"temperature": 2.0}, "hard_label": {}}
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, losses, max_steps=2), train_dataset=image_dataset()
    )
    convolution = student.mobilenet_v2.conv_stem.first_conv.convolution.weight
    assert convolution.is_contiguous(memory_format=torch.channels_last) and not convolution.is_contiguous()
    # A ViT's one convolution (the patch embedding) is a small part of it: left alone.
    assert teacher.vit.embeddings.patch_embeddings.projection.weight.is_contiguous()
    pixels = torch.randn(2, 3, 32, 32)
    student.eval(), reference.eval()
    with torch.no_grad():  # the layout changes how the numbers are stored, not what they are
        torch.testing.assert_close(student(pixel_values=pixels).logits, reference(pixel_values=pixels).logits)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "student")).eval()
    assert reloaded.mobilenet_v2.conv_stem.first_conv.convolution.weight.is_contiguous()
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, student(pixel_values=pixels).logits)
    kept = mobilenet_classifier(seed=2)
    DistillationTrainer(
        model=kept, teacher_model=teacher, args=config(tmp_path / "off", losses, channels_last=False),
        train_dataset=image_dataset(),
    )  # fmt: skip
    assert kept.mobilenet_v2.conv_stem.first_conv.convolution.weight.is_contiguous()

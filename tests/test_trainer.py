"""DistillationTrainer end to end on tiny random models: a few steps each, CPU, offline."""

import os

import numpy as np
import pytest
import torch
from helpers import (
    VOCAB,
    bert_classifier,
    bert_masked_lm,
    config,
    image_dataset,
    masked_lm_dataset,
    mobilenet_classifier,
    text_dataset,
    vit_classifier,
)
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from hf_distill import DistillationLoss, DistillationTrainer, register_loss
from hf_distill.trained_parts import LOSS_STATE_NAME

CLASSIFICATION_LOSSES = {
    "hard_label": {"weight": 0.5},
    "soft_target": {"weight": 0.5, "temperature": 3.0},
    "hidden_state": {"weight": 1.0, "distance": "mse"},
    "relation": {"weight": 2.0, "method": "similarity"},
    "attention": {"weight": 1.0, "heads": "relations", "num_relation_heads": 2},
}


def accuracy(eval_prediction):
    return {"accuracy": float((eval_prediction.predictions.argmax(-1) == eval_prediction.label_ids).mean())}


def train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_loss_is_weighted_sum(trainer, losses):
    logs = train_logs(trainer)
    assert logs, "no training logs"
    for entry in logs:
        expected = sum(spec.get("weight", 1.0) * entry[term] for term, spec in losses.items())
        assert entry["loss"] == pytest.approx(expected, rel=1e-4)


def test_sequence_classification_logs_every_term_and_keeps_the_teacher_frozen(tmp_path):
    teacher = bert_classifier(seed=1)
    student = bert_classifier(seed=2, layers=2, width=8, heads=2)
    teacher_before = {name: value.clone() for name, value in teacher.state_dict().items()}
    student_before = {name: value.clone() for name, value in student.state_dict().items()}
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, CLASSIFICATION_LOSSES),
        train_dataset=text_dataset(),
        eval_dataset=text_dataset(16, seed=1),
        compute_metrics=accuracy,
    )
    trainer.train()
    assert_loss_is_weighted_sum(trainer, CLASSIFICATION_LOSSES)
    assert len(train_logs(trainer)) == 4

    metrics = trainer.evaluate()
    for term in CLASSIFICATION_LOSSES:
        assert np.isfinite(metrics[f"eval_{term}"])
    evaluation = text_dataset(16, seed=1)
    batch = {key: torch.tensor(evaluation[key]) for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        predicted = trainer.model.eval()(**batch).logits.argmax(-1)
    assert metrics["eval_accuracy"] == pytest.approx(
        (predicted == torch.tensor(evaluation["label"])).float().mean().item()
    )
    expected_eval = sum(spec["weight"] * metrics[f"eval_{term}"] for term, spec in CLASSIFICATION_LOSSES.items())
    assert metrics["eval_loss"] == pytest.approx(expected_eval, rel=1e-4)

    # The teacher: frozen, in eval mode, out of the optimizer, bit-identical after training.
    assert not trainer.teacher_model.training
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in trainer.teacher_model.parameters()}
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    # The student and the projectors did train.
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert optimized >= {id(p) for p in trainer.distillation_losses.parameters()}
    assert len(trainer.distillation_losses["hidden_state"].projectors) == 2


def test_masked_lm_distilbert_style(tmp_path):
    losses = {
        "soft_target": {"weight": 5.0, "temperature": 2.0},
        "hard_label": {"weight": 2.0},
        "hidden_state": {"weight": 1.0, "distance": "cosine", "layer_map": [[-1, -1]]},
    }
    teacher, student = bert_masked_lm(seed=1), bert_masked_lm(seed=2, layers=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, losses),
        train_dataset=masked_lm_dataset(),
        eval_dataset=masked_lm_dataset(8, seed=1),
    )
    assert trainer.distillation_losses["soft_target"].token_level
    assert trainer.distillation_losses["hidden_state"].pairs == [(2, 4)]
    trainer.train()
    assert_loss_is_weighted_sum(trainer, losses)
    metrics = trainer.evaluate()
    # Same-width models: no projector for the cosine term, so nothing but the student trains.
    assert len(list(trainer.distillation_losses.parameters())) == 0
    # eval_hidden_state is 1 - cos(student, teacher) of the last hidden states, over the real tokens of the set.
    evaluation = masked_lm_dataset(8, seed=1)
    batch = {key: torch.tensor(evaluation[key]) for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        last = [m.eval()(**batch, output_hidden_states=True).hidden_states[-1] for m in (trainer.model, teacher)]
    cosine = torch.nn.functional.cosine_similarity(*last, dim=-1)[batch["attention_mask"].bool()]
    assert metrics["eval_hidden_state"] == pytest.approx((1 - cosine).mean().item(), rel=1e-4)


def test_image_classification_vit_teacher_mobilenet_student(tmp_path):
    losses = {
        "hard_label": {"weight": 0.5},
        "soft_target": {"weight": 0.5, "temperature": 5.0},
        "feature_map": {"weight": 1.0, "student_module": "mobilenet_v2.layer.12", "teacher_layer": -1},
        "relation": {"weight": 1.0, "method": "distance", "source": "hidden_state"},
    }
    teacher, student = vit_classifier(seed=1), mobilenet_classifier(seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, losses),
        train_dataset=image_dataset(),
        eval_dataset=image_dataset(8, seed=1),
        compute_metrics=accuracy,
    )
    projector = trainer.distillation_losses["feature_map"].projector
    assert projector.out_channels == teacher.config.hidden_size
    before = projector.weight.detach().clone()
    trainer.train()
    assert_loss_is_weighted_sum(trainer, losses)  # the four terms combine (each is pinned in test_loss_values.py)
    assert not torch.equal(projector.weight, before)
    metrics = trainer.evaluate()
    assert {"eval_feature_map", "eval_relation", "eval_hard_label"} <= set(metrics)
    # The trained student's soft-target term on the eval set, by hand: T² KL(teacher ‖ student) at T = 5.
    pixels = image_dataset(8, seed=1).with_format("torch")[:]["pixel_values"]
    with torch.no_grad():
        student_logits, teacher_logits = (
            m.eval()(pixel_values=pixels).logits.double() for m in (trainer.model, teacher)
        )
    target = torch.softmax(teacher_logits / 5.0, -1)
    kl = (target * (target.log() - torch.log_softmax(student_logits / 5.0, -1))).sum(-1) * 25.0
    assert metrics["eval_soft_target"] == pytest.approx(kl.mean().item(), rel=1e-4)


def test_attention_maps_with_different_head_counts(tmp_path):
    losses = {"attention": {"weight": 1.0, "heads": "average", "distance": "kl"}}
    teacher = bert_classifier(seed=1, attn_implementation="eager")
    student = bert_classifier(seed=2, layers=2, heads=2, attn_implementation="eager")
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, losses), train_dataset=text_dataset()
    )
    trainer.train()
    assert all(entry["attention"] > 0 for entry in train_logs(trainer))


def _run(tmp_path, model, teacher, losses, dataset, **overrides):
    trainer = DistillationTrainer(
        model=model, teacher_model=teacher, args=config(tmp_path, losses, **overrides), train_dataset=dataset
    )
    trainer.train()
    return trainer


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    losses = {
        "soft_target": {"weight": 1.0, "temperature": 2.0},
        "hard_label": {"weight": 1.0},
        "hidden_state": {"weight": 1.0},  # projected: widths 8 vs 16
    }
    dataset = masked_lm_dataset(16)
    # Micro-batches of 4 hold different numbers of masked and real tokens, so averaging per micro-batch
    # would weigh tokens unequally; only global normalisation makes the two runs agree.
    labels = torch.tensor(dataset["labels"])
    masked_per_micro_batch = (labels != -100).view(4, 4, -1).sum((1, 2))
    assert len(set(masked_per_micro_batch.tolist())) > 1

    runs = {}
    for name, batch, accumulation in (("big", 8, 1), ("accumulated", 4, 2)):
        trainer = _run(
            tmp_path / name,
            bert_masked_lm(seed=2, layers=2, width=8, heads=2),
            bert_masked_lm(seed=1),
            losses,
            dataset,
            max_steps=2,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        runs[name] = trainer
    big, accumulated = (runs[name].model.state_dict() for name in ("big", "accumulated"))
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], atol=1e-6, rtol=1e-5, msg=key)
    for key, value in runs["big"].distillation_losses.state_dict().items():
        torch.testing.assert_close(
            runs["accumulated"].distillation_losses.state_dict()[key], value, atol=1e-6, rtol=1e-5
        )
    for a, b in zip(train_logs(runs["big"]), train_logs(runs["accumulated"]), strict=True):
        for term in losses:
            assert a[term] == pytest.approx(b[term], rel=1e-4)


def test_resume_restores_projectors_and_matches_an_uninterrupted_run(tmp_path):
    losses = {"hard_label": {"weight": 1.0}, "hidden_state": {"weight": 1.0}, "soft_target": {"weight": 1.0}}
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3)
    full = _run(
        tmp_path / "full",
        bert_classifier(seed=2, layers=2, width=8, heads=2),
        bert_classifier(seed=1),
        losses,
        text_dataset(),
        **settings,
    )

    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / LOSS_STATE_NAME).is_file()
    assert not any("projector" in key for key in load_file(checkpoint / "model.safetensors"))
    assert not os.path.exists(str(checkpoint / LOSS_STATE_NAME) + ".tmp")

    resumed = DistillationTrainer(
        model=bert_classifier(seed=9, layers=2, width=8, heads=2),  # other weights: all must come from the checkpoint
        teacher_model=bert_classifier(seed=1),
        args=config(tmp_path / "resumed", losses, **settings),
        train_dataset=text_dataset(),
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_loss_is_weighted_sum(resumed, losses)  # the first log after resuming averages the right steps
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    for key, value in full.distillation_losses.state_dict().items():
        torch.testing.assert_close(resumed.distillation_losses.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_resume_without_projector_state_is_refused(tmp_path):
    losses = {"hidden_state": {"weight": 1.0}}
    settings = dict(max_steps=2, save_strategy="steps", save_steps=1)
    _run(
        tmp_path / "a",
        bert_classifier(seed=2, layers=2, width=8, heads=2),
        bert_classifier(seed=1),
        losses,
        text_dataset(),
        **settings,
    )
    os.remove(tmp_path / "a" / "checkpoint-1" / LOSS_STATE_NAME)
    trainer = DistillationTrainer(
        model=bert_classifier(seed=2, layers=2, width=8, heads=2),
        teacher_model=bert_classifier(seed=1),
        args=config(tmp_path / "b", losses, **settings),
        train_dataset=text_dataset(),
    )
    with pytest.raises(FileNotFoundError, match="projectors"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))


def test_saved_student_loads_with_auto_model_without_extra_keys(tmp_path):
    losses = {"hidden_state": {"weight": 1.0}, "soft_target": {"weight": 1.0}}
    trainer = _run(
        tmp_path / "run",
        bert_classifier(seed=2, layers=2, width=8, heads=2),
        bert_classifier(seed=1),
        losses,
        text_dataset(),
    )
    trainer.save_model(str(tmp_path / "student"))
    saved = load_file(tmp_path / "student" / "model.safetensors")
    assert not any("projector" in key for key in saved)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student", output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert loaded.config.num_hidden_layers == 2
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, trainer.model(**batch).logits)


def test_notebook_subclass_overrides_the_documented_points(tmp_path):
    class MyTrainer(DistillationTrainer):
        teacher_calls = 0

        def teacher_forward(self, inputs, output_hidden_states=False, output_attentions=False):
            type(self).teacher_calls += 1
            return super().teacher_forward(inputs, output_hidden_states, output_attentions)

        def compute_distillation_loss(self, student_outputs, teacher_outputs, inputs):
            loss, terms = super().compute_distillation_loss(student_outputs, teacher_outputs, inputs)
            terms["logit_norm"] = student_outputs.logits.pow(2).mean()
            return loss + 0.1 * terms["logit_norm"], terms

    losses = {"soft_target": {"weight": 1.0}}
    trainer = MyTrainer(
        model=bert_classifier(seed=2, layers=2),
        teacher_model=bert_classifier(seed=1),
        args=config(tmp_path, losses),
        train_dataset=text_dataset(),
        eval_dataset=text_dataset(8, seed=1),
    )
    trainer.train()
    assert MyTrainer.teacher_calls == 4
    for entry in train_logs(trainer):
        assert entry["loss"] == pytest.approx(entry["soft_target"] + 0.1 * entry["logit_norm"], rel=1e-4)
    assert "eval_logit_norm" in trainer.evaluate()


@register_loss("test_logit_mse")
class LogitMSELoss(DistillationLoss):
    """Mean squared error between logits, one item per example (a user-registered loss)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, student_outputs, teacher_outputs, inputs):
        return self.scale * (student_outputs.logits - teacher_outputs.logits).pow(2).mean(-1).sum()


def test_registered_user_loss_trains_and_evaluates_to_its_formula(tmp_path):
    losses = {"test_logit_mse": {"weight": 1.0, "scale": 2.0}}
    teacher = bert_classifier(seed=1)
    trainer = DistillationTrainer(
        model=bert_classifier(seed=2, layers=2),
        teacher_model=teacher,
        args=config(tmp_path, losses),
        train_dataset=text_dataset(),
        eval_dataset=text_dataset(8, seed=1),
    )
    trainer.train()
    for entry in train_logs(trainer):
        assert entry["loss"] == pytest.approx(entry["test_logit_mse"], rel=1e-5)
    metrics = trainer.evaluate()
    eval_data = text_dataset(8, seed=1)
    inputs = {key: torch.tensor(eval_data[key]) for key in ("input_ids", "attention_mask")}
    trainer.model.eval()
    with torch.no_grad():
        expected = 2.0 * (trainer.model(**inputs).logits - teacher(**inputs).logits).pow(2).mean(-1).mean()
    assert metrics["eval_test_logit_mse"] == pytest.approx(expected.item(), rel=1e-4)


def test_hard_label_alone_needs_no_teacher(tmp_path):
    trainer = _run(tmp_path, bert_classifier(seed=2, layers=2), None, {"hard_label": {"weight": 1.0}}, text_dataset())
    assert trainer.teacher_model is None
    assert all(entry["loss"] == pytest.approx(entry["hard_label"], rel=1e-6) for entry in train_logs(trainer))


@pytest.mark.parametrize(
    "losses, student_flags, teacher_flags",
    [
        ({"soft_target": {}}, {}, {}),
        ({"hidden_state": {}}, {"output_hidden_states": True}, {"output_hidden_states": True}),
        ({"attention": {"heads": "relations"}}, {}, {}),  # relations come from hooks, not from returned maps
        (
            {"attention": {"heads": "average"}, "hard_label": {}},
            {"output_attentions": True},
            {"output_attentions": True},
        ),
    ],
)
def test_models_are_asked_only_for_the_outputs_the_losses_need(tmp_path, losses, student_flags, teacher_flags):
    trainer = DistillationTrainer(
        model=bert_classifier(seed=2, layers=2, attn_implementation="eager"),
        teacher_model=bert_classifier(seed=1, attn_implementation="eager"),
        args=config(tmp_path, losses),
        train_dataset=text_dataset(),
    )
    assert trainer.student_output_flags == student_flags
    assert trainer.teachers["teacher"].output_flags == teacher_flags


def test_a_causal_teacher_keeps_no_generation_cache(tmp_path):
    """Its keys and values would otherwise stay in memory through the student's step, read by nothing."""

    def gpt2(seed: int, layers: int) -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=layers, n_head=2))

    data = text_dataset(8, labels=False)
    ids, mask = torch.tensor(data["input_ids"]), torch.tensor(data["attention_mask"])
    data = data.add_column("labels", ids.masked_fill(mask == 0, -100).tolist())
    teacher = gpt2(seed=1, layers=2)
    assert teacher.config.use_cache  # left to itself, it would return them
    trainer = DistillationTrainer(
        model=gpt2(seed=2, layers=1),
        teacher_model=teacher,
        args=config(tmp_path, {"soft_target": {}}),
        train_dataset=data,
    )
    outputs = []
    teacher.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    trainer.train()
    assert len(outputs) == 4 and all(output.past_key_values is None for output in outputs)


def test_evaluation_without_labels_reports_the_terms_that_need_none(tmp_path):
    """An unlabeled eval set still gets every term that needs no labels, with the values a labeled one gives."""
    losses = {"hard_label": {"weight": 0.5}, "soft_target": {"weight": 2.0}, "hidden_state": {"weight": 1.0}}
    trainer = DistillationTrainer(
        model=bert_classifier(seed=2, layers=2),
        teacher_model=bert_classifier(seed=1),
        args=config(tmp_path, losses),
        train_dataset=text_dataset(),
    )
    labeled = trainer.evaluate(text_dataset(16, seed=3))
    unlabeled = trainer.evaluate(text_dataset(16, seed=3, labels=False))
    one_batch = trainer.evaluate(text_dataset(8, seed=3, labels=False))  # eval_loss: the Trainer's mean of batches
    assert "eval_hard_label" in labeled and "eval_hard_label" not in unlabeled
    for term in ("soft_target", "hidden_state"):
        assert unlabeled[f"eval_{term}"] == pytest.approx(labeled[f"eval_{term}"], rel=1e-6)
    expected = 2.0 * one_batch["eval_soft_target"] + one_batch["eval_hidden_state"]
    assert one_batch["eval_loss"] == pytest.approx(expected, rel=1e-5)
    predictions = trainer.predict(text_dataset(16, seed=3, labels=False))
    assert predictions.label_ids is None and predictions.predictions.shape == (16, 2)

    # With only label terms there is nothing to compute on unlabeled data: no loss rather than a made-up zero.
    label_only = DistillationTrainer(
        model=bert_classifier(seed=2, layers=2),
        args=config(tmp_path, {"hard_label": {}}),
        train_dataset=text_dataset(),
    )
    assert "eval_loss" not in label_only.evaluate(text_dataset(16, labels=False))


@pytest.mark.parametrize("pair", ["masked_lm", "vision", "vision_cached"])
def test_a_half_precision_teacher_under_mixed_precision(tmp_path, monkeypatch, pair):
    """On a GPU with bf16 the teacher's weights are cast to bf16. The CPU cannot take that path by itself (a CPU
    teacher keeps its dtype), so the cast is forced here, under the CPU's bf16 autocast: the teacher holds bf16
    weights, its outputs feed the float32 losses, and the terms stay within bf16 rounding of a float32 teacher."""
    if pair == "masked_lm":
        make = lambda: (bert_masked_lm(seed=2, layers=2), bert_masked_lm(seed=1), masked_lm_dataset())  # noqa: E731
        losses = {"soft_target": {}, "hard_label": {}, "hidden_state": {"distance": "cosine", "layer_map": [[-1, -1]]}}
    else:
        make = lambda: (mobilenet_classifier(seed=2), vit_classifier(seed=1), image_dataset())  # noqa: E731
        losses = {"soft_target": {"temperature": 2.0}, "hard_label": {}}
    runs = {}
    for half in (True, False):
        dtype = torch.bfloat16 if half else None
        monkeypatch.setattr("hf_distill.teacher.teacher_dtype", lambda args, dtype=dtype: dtype)
        student, teacher, data = make()
        cache = {"teacher_cache": str(tmp_path / f"cache-{half}")} if pair == "vision_cached" else {}
        # The vision pair at a small learning rate: its gradients are large (norms of ~10^4 at these sizes), and at
        # 1e-3 the bf16 student's third step already lands elsewhere than the float32 one, whatever the teacher.
        rate = 1e-3 if pair == "masked_lm" else 1e-5
        args = config(tmp_path / str(half), losses, bf16=True, max_steps=3, learning_rate=rate, **cache)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
        assert teacher.dtype == (torch.bfloat16 if half else torch.float32)
        if cache:  # the record (read by later runs' model cards) keeps the teacher's size as given, in float32
            record = trainer.teacher_cache.record["teacher"]
            assert record["weight_bytes"] == 4 * record["parameters"]
        trainer.train()
        runs[half] = train_logs(trainer)
    for half_entry, full_entry in zip(runs[True], runs[False], strict=True):
        for term in losses:
            assert np.isfinite(half_entry[term])
            assert half_entry[term] == pytest.approx(full_entry[term], rel=0.05, abs=1e-3), term


def _pad_further(dataset, extra):
    """The same examples with `extra` more padding positions (pad id 0, mask 0, label -100)."""
    return dataset.map(
        lambda row: {
            "input_ids": row["input_ids"] + [0] * extra,
            "attention_mask": row["attention_mask"] + [0] * extra,
            "labels": row["labels"] + [-100] * extra,
        }
    )


@pytest.mark.parametrize("method", ["similarity", "distance"])
def test_relation_on_token_logits_ignores_the_padding_length(tmp_path, method):
    losses = {"relation": {"source": "logits", "method": method}, "soft_target": {}}
    trainer = DistillationTrainer(
        model=bert_masked_lm(seed=2, layers=2),
        teacher_model=bert_masked_lm(seed=1),
        args=config(tmp_path, losses),
        train_dataset=masked_lm_dataset(),
    )
    data = masked_lm_dataset(8, seed=3)
    short, long = trainer.evaluate(data), trainer.evaluate(_pad_further(data, 6))
    assert short["eval_relation"] > 0
    assert long["eval_relation"] == pytest.approx(short["eval_relation"], rel=1e-5)
    assert long["eval_soft_target"] == pytest.approx(short["eval_soft_target"], rel=1e-5)


def test_eval_loss_is_the_weighted_sum_of_the_terms_whatever_the_batch_size(tmp_path):
    losses = {
        "soft_target": {"weight": 1.0, "temperature": 2.0},
        "hard_label": {"weight": 0.5},
        "hidden_state": {"weight": 2.0, "distance": "cosine", "layer_map": [[-1, -1]]},
    }
    trainer = DistillationTrainer(
        model=bert_masked_lm(seed=2, layers=2),
        teacher_model=bert_masked_lm(seed=1),
        args=config(tmp_path, losses),
        train_dataset=masked_lm_dataset(),
    )
    data = masked_lm_dataset(13, seed=4)  # batches of 3 with uneven counts of masked and real tokens
    trainer.args.per_device_eval_batch_size = 3
    small = trainer.evaluate(data)
    trainer.args.per_device_eval_batch_size = 13
    whole = trainer.evaluate(data)
    for metrics in (small, whole):
        expected = sum(spec["weight"] * metrics[f"eval_{term}"] for term, spec in losses.items())
        assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-6)
    for key in ("eval_loss", *(f"eval_{term}" for term in losses)):
        assert small[key] == pytest.approx(whole[key], rel=1e-5), key


def test_an_overridden_combination_keeps_its_own_eval_loss(tmp_path):
    class Doubled(DistillationTrainer):
        def compute_distillation_loss(self, student_outputs, teacher_outputs, inputs):
            loss, terms = super().compute_distillation_loss(student_outputs, teacher_outputs, inputs)
            return 2 * loss, terms

    losses = {"soft_target": {"weight": 1.0}, "hard_label": {"weight": 0.5}}
    trainer = Doubled(
        model=bert_classifier(seed=2, layers=2),
        teacher_model=bert_classifier(seed=1),
        args=config(tmp_path, losses, per_device_eval_batch_size=16),
        train_dataset=text_dataset(),
    )
    metrics = trainer.evaluate(text_dataset(16, seed=1))  # one batch: the Trainer's eval_loss is its loss
    expected = 2 * (metrics["eval_soft_target"] + 0.5 * metrics["eval_hard_label"])
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_a_resumed_vit_student_gets_every_layer_back_from_its_checkpoint(tmp_path):
    # Transformers saves a ViT's layers under their checkpoint names (encoder.layer.N...); its Trainer resumes by
    # loading the file as it is, which left those layers at their initial values.
    losses = {"hard_label": {"weight": 1.0}, "soft_target": {"weight": 1.0}}
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, optim="sgd")
    full = _run(tmp_path / "full", vit_classifier(seed=2, hidden_size=8, intermediate_size=16), vit_classifier(seed=1),
                losses, image_dataset(16), **settings)  # fmt: skip
    saved = load_file(tmp_path / "full" / "checkpoint-2" / "model.safetensors")
    assert set(saved) != set(full.model.state_dict())  # the renaming this test is about
    resumed = DistillationTrainer(
        model=vit_classifier(seed=9, hidden_size=8, intermediate_size=16),
        teacher_model=vit_classifier(seed=1),
        args=config(tmp_path / "resumed", losses, **settings),
        train_dataset=image_dataset(16),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)

"""A loss registered by a user takes part in mixup, mutual learning and the teacher cache by what it declares, as
the built-in ones do: the trainer and the cache ask every loss the same questions (`DistillationLoss`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import bert_classifier, bert_masked_lm, config, masked_lm_dataset, text_dataset, vit_classifier
from helpers import image_dataset as images

from hf_distill import DistillationLoss, DistillationTrainer, register_loss
from hf_distill.losses import CachedLogits


@register_loss("capability_label_ce")
class LabelCrossEntropy(DistillationLoss):
    """Cross-entropy on the labels from the logits; reads mixed labels as class probabilities when told."""

    student_outputs = frozenset({"logits"})
    needs_teacher = False
    needs_labels = True

    def __init__(self):
        super().__init__()
        self.mixed = False

    def use_class_probabilities(self) -> bool:
        self.mixed = True
        return True

    def mirror(self, teacher):
        return LabelCrossEntropy()

    def count_items(self, inputs):
        labels = inputs["labels"]
        return labels.sum().float() if labels.is_floating_point() else torch.tensor(float(len(labels)))

    def forward(self, student_outputs, teacher_outputs, inputs):
        labels = inputs["labels"]
        log_probs = F.log_softmax(student_outputs.logits.float(), -1)
        if labels.is_floating_point():
            return -(labels * log_probs).sum()
        return F.nll_loss(log_probs, labels, reduction="sum")


@register_loss("capability_label_reader")
class LabelReader(DistillationLoss):
    """Reads labels, and says nothing about class probabilities."""

    student_outputs = frozenset({"logits"})
    needs_teacher = False
    needs_labels = True

    def forward(self, student_outputs, teacher_outputs, inputs):
        return student_outputs.logits.float().sum() * 0.0


@register_loss("capability_logit_mse")
class LogitMSE(DistillationLoss):
    """Mean squared difference of the logits, read from a teacher cache per example."""

    student_outputs = teacher_outputs = frozenset({"logits"})

    def cached_logits(self):
        return CachedLogits("example")

    def forward(self, student_outputs, teacher_outputs, inputs):
        return (student_outputs.logits.float() - teacher_outputs.logits.float()).pow(2).mean(-1).sum()


def test_mixup_asks_a_registered_loss_and_refuses_one_that_cannot_read_class_probabilities(tmp_path):
    mixup = {"mixup_alpha": 0.4}
    trainer = DistillationTrainer(
        model=vit_classifier(seed=2),
        args=config(tmp_path, {"capability_label_ce": {}}, image_augmentation=mixup, max_steps=2),
        train_dataset=images(8),
    )
    assert trainer.distillation_losses["capability_label_ce"].mixed
    trainer.train()
    assert all(
        torch.isfinite(torch.tensor(log["capability_label_ce"])) for log in trainer.state.log_history if "loss" in log
    )
    with pytest.raises(ValueError, match=r"the losses \['capability_label_reader'\] read labels but do not say"):
        DistillationTrainer(
            model=vit_classifier(seed=2),
            args=config(tmp_path, {"capability_label_reader": {}}, image_augmentation=mixup),
            train_dataset=images(8),
        )


def test_a_learning_teacher_gets_the_mirror_a_registered_loss_declares(tmp_path):
    losses = {"capability_label_ce": {"weight": 0.5}, "soft_target": {"weight": 1.0}}
    trainer = DistillationTrainer(
        model=bert_classifier(seed=2, layers=2),
        teacher_model=bert_classifier(seed=1),
        args=config(tmp_path, losses, trainable_teachers=["teacher"], max_steps=2),
        train_dataset=text_dataset(8),
    )
    peer = trainer.terms.peers["teacher_capability_label_ce"]
    assert isinstance(peer.loss, LabelCrossEntropy) and peer.loss.term == "teacher_capability_label_ce"
    assert (peer.teacher, peer.source, peer.weight) == ("teacher", "capability_label_ce", 0.5)
    trainer.train()
    logged = next(log for log in trainer.state.log_history if "loss" in log)
    assert {"teacher_capability_label_ce", "teacher_soft_target"} <= set(logged)
    # Without a mirror (LabelReader has none) a trainable teacher has nothing of it to learn from.
    assert (
        "teacher_capability_label_reader"
        not in DistillationTrainer(
            model=bert_classifier(seed=2, layers=2),
            teacher_model=bert_classifier(seed=1),
            args=config(tmp_path, {"capability_label_reader": {}, "hard_label": {}}, trainable_teachers=["teacher"]),
            train_dataset=text_dataset(8),
        ).terms.peers
    )


def test_a_registered_loss_that_declares_cached_logits_trains_from_a_cache_as_online(tmp_path):
    losses = {"capability_logit_mse": {"weight": 1.0}}
    runs = {}
    for name, cache in (("online", None), ("cached", str(tmp_path / "cache"))):
        settings = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0, teacher_cache=cache)
        trainer = DistillationTrainer(
            model=bert_classifier(seed=2, layers=2),
            teacher_model=bert_classifier(seed=1),
            args=config(tmp_path / name, losses, **settings),
            train_dataset=text_dataset(),
        )
        trainer.train()
        runs[name] = trainer
    assert runs["cached"].teacher_cache.record["contents"]["logits"] == "dense"
    for key, value in runs["online"].model.state_dict().items():
        torch.testing.assert_close(runs["cached"].model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    # A token-level teacher's logits are stored at the counted rows only: a loss that does not say how it reads
    # them (no cached_logits) is refused, whatever its name.
    with pytest.raises(ValueError, match="only losses that say how they read a cache's logits"):
        DistillationTrainer(
            model=bert_masked_lm(seed=2, layers=2),
            teacher_model=bert_masked_lm(seed=1),
            args=config(
                tmp_path / "tokens",
                {"soft_target": {}, "capability_plain_logit_mse": {}},
                teacher_cache=str(tmp_path / "token-cache"),
            ),  # fmt: skip
            train_dataset=masked_lm_dataset(8),
        )


@register_loss("capability_plain_logit_mse")
class PlainLogitMSE(DistillationLoss):
    """Reads the teacher's logits and declares nothing about a cache."""

    student_outputs = teacher_outputs = frozenset({"logits"})

    def forward(self, student_outputs, teacher_outputs, inputs):
        return (student_outputs.logits.float() - teacher_outputs.logits.float()).pow(2).mean(-1).sum()

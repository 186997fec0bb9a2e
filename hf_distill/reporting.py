"""How a `DistillationTrainer` reports: every term in the training logs and in evaluation, and the model card.

`TermReportingMixin` is mixed into [`~hf_distill.DistillationTrainer`]. Training terms are summed over the
micro-steps of each optimizer step (each is already normalised over the whole accumulated batch) and averaged over
the steps of a logging window; evaluation terms are weighted by their item counts over the whole set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from .card import add_distillation_section, model_facts


class TermReportingMixin:
    """Logs each distillation term, evaluates each over the whole set, and writes the distillation model card."""

    #: Terms of the optimizer steps since the last log, and how many steps that is.
    _train_terms: dict[str, torch.Tensor]
    _term_steps: int
    #: (sum of term x items, items) of each term over the evaluation so far.
    _eval_terms: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The Trainer's step; on a batch without labels it also computes the terms that need none."""
        has_teacher = self.teacher_model is not None  # evaluation reads no teacher cache
        unlabeled = bool(self.label_names) and any(inputs.get(name) is None for name in self.label_names)
        if not unlabeled or not any(
            self._computable(loss, has_teacher, inputs) for loss in self.distillation_losses.values()
        ):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        # The Trainer computes a loss without labels only for a model with no label names that returns one.
        label_names, can_return_loss = self.label_names, self.can_return_loss
        self.label_names, self.can_return_loss = [], True
        try:
            loss, logits, _ = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            self.label_names, self.can_return_loss = label_names, can_return_loss
        return loss, logits, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """The Trainer's loop, plus `<prefix>_<term>` for every term: its mean over the items of the whole set.

        `<prefix>_loss` is then the weighted sum of those means (unless `compute_distillation_loss` is overridden):
        the loss of the whole set taken as one batch, so it does not depend on the evaluation batch size (the
        Trainer's own would be a mean of per-batch losses).
        """
        self._eval_terms = {}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        means = {}
        for term, (total, count) in self._eval_terms.items():
            totals = self.accelerator.reduce(torch.stack([total, count]), reduction="sum")
            means[term] = (totals[0] / totals[1].clamp_min(1)).item()
            output.metrics[f"{metric_key_prefix}_{term}"] = means[term]
        self._eval_terms = {}
        weighted = type(self).compute_distillation_loss is type(self)._builtin_combination
        if (
            weighted
            and means
            and f"{metric_key_prefix}_loss" in output.metrics
            and set(means) <= set(self.loss_weights)
        ):
            output.metrics[f"{metric_key_prefix}_loss"] = sum(self.loss_weights[term] * means[term] for term in means)
        return output

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The Trainer's model card (also written by `push_to_hub`), plus the teacher, the losses and the student's
        size against the teacher's ([`hf_distill.card`]): tags `distillation` and `hf_distill`, an `hf_distill`
        metadata entry and a "Distillation" section."""
        super().create_model_card(*args, **kwargs)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.isfile(path):
            return
        student = model_facts(self.accelerator.unwrap_model(self.model))
        teacher = self._teacher_facts or {"name_or_path": None, "class": None}
        add_distillation_section(path, student, teacher, self.args.losses, from_cache=self.teacher_cache is not None)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._train_terms:
            steps = max(self._term_steps, 1)
            for term, total in self._train_terms.items():
                logs[term] = self.accelerator.reduce(total, reduction="sum").item() / steps
            self._train_terms = {}
            self._term_steps = 0
        super().log(logs, start_time)

    def _record_terms(self, terms: dict[str, torch.Tensor], inputs: Mapping[str, Any], training: bool) -> None:
        for term, value in terms.items():
            value = value.detach().float()
            if training:
                # Globally normalised, so the micro-steps of one optimizer step add up to that step's term.
                self._train_terms[term] = self._train_terms.get(term, 0.0) + value
                continue
            # A term added by an override has no item count: it weighs as one item per batch.
            if term in self.distillation_losses:
                count = self.normalizer(term, inputs).float().to(value.device)
            else:
                count = torch.ones_like(value)
            total, seen = self._eval_terms.get(term, (torch.zeros_like(value), torch.zeros_like(value)))
            self._eval_terms[term] = (total + value * count, seen + count)

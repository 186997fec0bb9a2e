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
from transformers.trainer_pt_utils import nested_detach

from .card import add_distillation_section, model_facts


class TermLog:
    """The terms seen since they were last reported: summed over the micro-steps of each optimizer step and
    counted in steps (training), or summed as term x items with their items (evaluation)."""

    def __init__(self) -> None:
        self.train: dict[str, torch.Tensor] = {}
        self.steps = 0  # optimizer steps whose terms `train` holds
        self.eval: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_train(self, term: str, value: torch.Tensor) -> None:
        # Globally normalised, so the micro-steps of one optimizer step add up to that step's term.
        self.train[term] = self.train.get(term, 0.0) + value

    def add_eval(self, term: str, value: torch.Tensor, count: torch.Tensor) -> None:
        total, seen = self.eval.get(term, (torch.zeros_like(value), torch.zeros_like(value)))
        self.eval[term] = (total + value * count, seen + count)

    def pop_train(self, reduce) -> dict[str, float]:
        """Each term's mean per optimizer step since the last call (`reduce` sums a tensor over processes)."""
        steps = max(self.steps, 1)
        means = {term: reduce(total).item() / steps for term, total in self.train.items()}
        self.train, self.steps = {}, 0
        return means

    def pop_eval(self, reduce) -> dict[str, float]:
        """Each term's mean over the items of the evaluation since the last call."""
        means = {}
        for term, (total, count) in self.eval.items():
            totals = reduce(torch.stack([total, count]))
            means[term] = (totals[0] / totals[1].clamp_min(1)).item()
        self.eval = {}
        return means


class TermReportingMixin:
    """Logs each distillation term, evaluates each over the whole set, and writes the distillation model card.

    It reads the trainer's public parts: `term_log` ([`TermLog`]), `terms`, `roster`, `overrides`,
    `term_computable`, `normalizer` and `teacher_cache`.
    """

    term_log: TermLog

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The Trainer's step; on a batch without labels it also computes the terms that need none."""
        # Evaluation reads no teacher cache.
        sources = self.roster.sources
        has_teacher = bool(sources) and all(source.serves_evaluation for source in sources.values())
        unlabeled = bool(self.label_names) and any(inputs.get(name) is None for name in self.label_names)
        if not unlabeled or not any(
            self.term_computable(loss, has_teacher, inputs) for loss in self.terms.losses.values()
        ):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        # The Trainer computes a loss without labels only for a model with no label names: compute it here.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        if ignore_keys is None:  # as the Trainer's own step
            config = getattr(self.model, "config", None)
            ignore_keys = [] if config is None else getattr(config, "keys_to_ignore_at_inference", ["past_key_values"])
        if isinstance(outputs, Mapping):
            logits = tuple(value for key, value in outputs.items() if key not in [*ignore_keys, "loss"])
        else:
            logits = tuple(outputs[1:])
        logits = nested_detach(logits)
        return loss, logits[0] if len(logits) == 1 else logits, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """The Trainer's loop, plus `<prefix>_<term>` for every term: its mean over the items of the whole set.

        `<prefix>_loss` is then the weighted sum of those means (unless `compute_distillation_loss` is overridden):
        the loss of the whole set taken as one batch, so it does not depend on the evaluation batch size (the
        Trainer's own would be a mean of per-batch losses).
        """
        self.term_log.eval = {}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        means = self.term_log.pop_eval(lambda tensor: self.accelerator.reduce(tensor, reduction="sum"))
        for term, mean in means.items():
            output.metrics[f"{metric_key_prefix}_{term}"] = mean
        weights = self.terms.weights
        if (
            not self.overrides.compute_distillation_loss
            and means
            and f"{metric_key_prefix}_loss" in output.metrics
            and set(means) <= set(weights)
        ):
            output.metrics[f"{metric_key_prefix}_loss"] = sum(weights[term] * means[term] for term in means)
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
        teachers = {name: facts or {"name_or_path": None, "class": None} for name, facts in self.roster.facts.items()}
        add_distillation_section(path, student, teachers, self.args.losses, from_cache=self.teacher_cache is not None)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.term_log.train:
            logs.update(self.term_log.pop_train(lambda tensor: self.accelerator.reduce(tensor, reduction="sum")))
        super().log(logs, start_time)

    def _record_terms(self, terms: dict[str, torch.Tensor], inputs: Mapping[str, Any], training: bool) -> None:
        for term, value in terms.items():
            value = value.detach().float()
            if training:
                self.term_log.add_train(term, value)
                continue
            # A term added by an override has no item count: it weighs as one item per batch.
            if self.terms.counts_items(term):
                count = self.normalizer(term, inputs).float().to(value.device)
            else:
                count = torch.ones_like(value)
            self.term_log.add_eval(term, value, count)

"""`DistillationTrainer`: a `transformers.Trainer` that trains a student against one or several frozen teachers.

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...),
                                  train_dataset=train, eval_dataset=test, processing_class=tokenizer)
    trainer.train()

Override points for subclasses (the rest is the Trainer's own):
- `teacher_forward(inputs, output_hidden_states, output_attentions, teacher=None)`: how a teacher sees a batch.
- `compute_distillation_loss(student_outputs, teacher_outputs, inputs)`: how the terms combine.

The class is wiring and Trainer hooks; the terms, the teachers and the parts that train beside the student are
objects it holds (`terms`, `roster`, `extra_parts`; docs/architecture.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .augmentation import augment_batch, checked_augmentation
from .cache import INDEX_KEY, IndexedDataset
from .cache.training import TeacherCacheMixin, cached_reference, check_cache_use
from .card import cached_teacher_facts, model_facts
from .checks import check_data
from .config import DistillationConfig, checked_trainer_args
from .guards import NonFiniteGuard, check_finite_weights
from .logit_rows import plan_training_rows, project_rows
from .losses import DistillationLoss, build_losses, needs_attention_maps
from .model_kind import describe, use_channels_last
from .objective import check_resume, objective_record, write_objective
from .overrides import Overrides
from .randomness import preserved_random_state
from .reporting import TermLog, TermReportingMixin
from .rollouts import RolloutBackend, RolloutMixin
from .saving import checkpoint_to_resume, load_saved_weights, staged_folder, whole_fsdp_weights
from .seq2seq import check_decoder_start, with_decoder_inputs
from .teacher import prepare_frozen_teacher, sharding_engine
from .teacher_roster import (
    TeacherRoster,
    build_source,
    check_learning_teachers,
    check_teacher_inputs,
    loaded,
    route_terms,
    teacher_mapping,
)
from .teacher_sources import FrozenTeacher, MovingAverageCallback, TeacherSource, normalized_weights, training_rows
from .terms import TermSet
from .trained_parts import ExtraTrainedParts

logger = logging.getLogger(__name__)
#: Where `save_model` writes the teachers that learnt, with `save_trained_teachers`.
TRAINED_TEACHERS_DIR = "teachers"
# What the losses asked the models for (encoder-decoders return each per stack); not predictions.
_INTERNAL_OUTPUTS = {
    f"{stack}{kind}" for stack in ("", "encoder_", "decoder_") for kind in ("hidden_states", "attentions")
}
_INTERNAL_OUTPUTS.add("cross_attentions")


class DistillationTrainer(TermReportingMixin, TeacherCacheMixin, RolloutMixin, Trainer):
    """A [`~transformers.Trainer`] whose loss is a weighted sum of distillation terms from one or several teachers.

    Args:
        model (`PreTrainedModel`): the student; the model that is saved.
        teacher_model (`nn.Module`, `str` or `Mapping[str, nn.Module | str]`, *optional*): the teacher, or a Hub id /
            local folder loaded with the student's task head (safetensors only), `"ema"` for a moving average of the
            student, or several as `{name: teacher}` (`soft_target` mixes them with `args.teacher_weights`; other
            terms name theirs, `"teacher": name`). Optional when no configured loss needs a teacher, or when a
            finished teacher cache stands in for it. The trainer holds them in `roster` ([`hf_distill.teacher_roster`]),
            each as a source in `teachers` ([`hf_distill.teacher_sources`]).
        args ([`DistillationConfig`]): training arguments and the `losses` to combine.
        rollout_backend (*optional*): what samples completions with `lmbda` / `seq_kd` ([`hf_distill.rollouts`]).
        teacher_processing_class (*optional*): the teacher's tokenizer (or `{name: tokenizer}`), read from the
            teacher's folder when not given; a teacher whose vocabulary extends the student's ([`hf_distill.vocabulary`]).
        **kwargs: every other [`~transformers.Trainer`] argument (datasets, collator, processing_class,
            compute_metrics, callbacks, optimizers...).

    A teacher is frozen by default: in eval mode, prepared by accelerate in evaluation mode (under DeepSpeed ZeRO-3,
    partitioned by an inference engine), never in the optimizer and never saved. `args.trainable_teachers` makes
    teachers learn alongside the student (deep mutual learning, each with its own terms `<teacher>_<term>`, its own
    learning rate and clipping, in checkpoints); `"ema"` follows the student after each optimizer step. The losses' projectors train with
    the student, are checkpointed (`distillation_losses.safetensors`) and restored by `resume_from_checkpoint`, and
    stay out of the saved student. Each term is normalised over the whole accumulated (and global) batch, logged
    under its name and as `eval_<name>`; a NaN or infinity stops training before its step (`check_finite`,
    [`hf_distill.guards`]); saves are written aside and moved into place ([`hf_distill.saving`]).

    It holds its parts by composition (docs/architecture.md): `terms` ([`hf_distill.terms.TermSet`]: the losses,
    weights, routes and item counts), `roster` ([`hf_distill.teacher_roster.TeacherRoster`]: the teachers), and
    `extra_parts` ([`hf_distill.trained_parts.ExtraTrainedParts`]: what trains besides the student); `overrides`
    says which override points a subclass replaced.

    More in docs/: a teacher-output cache (`args.teacher_cache`, [`hf_distill.cache`]: the trainer then holds no
    teacher), logits only at the labeled positions for language models (`args.compact_token_logits`,
    [`hf_distill.logit_rows`]: training-time logits are `[rows, vocab]`), encoder-decoders (decoder inputs built
    once from the labels for both models, [`hf_distill.seq2seq`]), and the model card ([`hf_distill.card`]).
    """

    # Terms are normalised over the whole accumulated batch (see get_batch_samples): no further division.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | str | Mapping[str, nn.Module | str] | None = None,
        args: DistillationConfig | None = None,
        rollout_backend: RolloutBackend | None = None,
        teacher_processing_class: Any = None,
        **kwargs: Any,
    ):
        args = checked_trainer_args(args, model, kwargs)
        self.overrides = Overrides.of(type(self), DistillationTrainer)
        built = build_losses(args.losses)
        # 1. Which teachers there are, where their outputs come from, and which terms read which.
        teacher_terms = [term for term, (_, loss) in built.items() if loss.needs_teacher]
        given = teacher_mapping(teacher_model, model)
        caches = check_cache_use(args, teacher_terms, kwargs.get("data_collator"), list(given) or None)
        names = list(given) or list(caches or {})
        if teacher_terms and not names:
            raise ValueError(
                f"the losses {teacher_terms} need a teacher: pass teacher_model=(a model, Hub id or path, or a "
                "mapping {name: model} of several)"
                + (f", which builds the teacher cache {args.teacher_cache}" if args.teacher_cache else "")
            )
        self.terms = TermSet(built, route_terms(built, names))
        self.overrides.check_teacher_argument(self, len(names))
        self.roster = TeacherRoster(names, {}, check_learning_teachers(args, given, caches is not None))
        # 2. The teachers loaded, and every input checked before anything is built.
        attention = "eager" if needs_attention_maps(built) else None
        models = {name: loaded(teacher, model, attention, args, name not in self.roster.learning)
                  for name, teacher in given.items()}  # fmt: skip
        self.roster.facts = {name: model_facts(teacher) for name, teacher in models.items()}
        check_decoder_start(model)
        check_data(
            built, model, args, kwargs.get("train_dataset"), kwargs.get("eval_dataset"), kwargs.get("data_collator")
        )
        if teacher_terms:
            tokenizers = (kwargs.get("processing_class"), teacher_processing_class)
            self.roster.columns, self.roster.retokenizers = check_teacher_inputs(
                model, given, models, caches, *tokenizers, self.terms.reading
            )

        super().__init__(model=model, args=args, **kwargs)  # seeds the random streams training draws from
        with preserved_random_state():  # probes and a cache build draw nothing training would
            self._set_up(model, args, kwargs, teacher_terms, names, models, caches)
        self._set_up_rollouts(rollout_backend)

    def _set_up(self, model, args, kwargs, teacher_terms, names, models, caches) -> None:
        """Everything built after the Trainer: sources, losses, logit rows, a teacher cache (see `__init__`)."""
        # 3. One source per teacher, the losses set up against them, and the mirrored terms of teachers that learn.
        student = self.accelerator.unwrap_model(self.model)
        self.seq2seq = describe(student).seq2seq
        if teacher_terms:
            prepare = partial(prepare_frozen_teacher, accelerator=self.accelerator, args=self.args)
            self.roster.sources = {
                name: build_source(name, teacher, self.terms.reading(name), self._teacher_runner(name, len(names) > 1),
                                   self.roster, prepare, self.accelerator.unwrap_model, self._label_keys, self.args)
                for name, teacher in models.items()
            }  # fmt: skip
        references = {name: source.reference for name, source in self.roster.sources.items()}
        if caches is not None:  # a finished cache stands in for a teacher not given, for the losses' setup
            references.update({name: cached_reference(cache) for name, cache in caches.items() if name not in models})
        self.terms.set_up(student, references, self.roster.columns)
        self.terms.place(self.args.device, next(student.parameters()).dtype, sharding_engine(self.accelerator))
        self.terms.add_peers(self.roster.sources, student, self.args.device)
        self.extra_parts = ExtraTrainedParts(self.terms.losses, self.roster)
        self.image_augmentation = checked_augmentation(
            args.image_augmentation, student, self.roster, self.terms.losses
        )
        if args.channels_last is not False and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            frozen = [source.model for source in self.roster.sources.values() if type(source) is FrozenTeacher]
            use_channels_last([student, *frozen], args.channels_last)
        if self.roster.moving_averages():
            self.add_callback(MovingAverageCallback(self))
        self.roster.weights = normalized_weights(names, args.teacher_weights) if names else {}
        # 4. What each step needs: the outputs asked of the student, logs, the finite check, logit rows.
        self.student_output_flags = self.terms.output_flags()
        self.term_log = TermLog()
        self.finite_guard = NonFiniteGuard() if args.check_finite else None
        finished = {name for name, cache in (caches or {}).items() if cache is not None}
        # The losses project deferred rows with the weights as one process holds them: not under DDP (which checks
        # that every weight is used inside forward) or sharded (DeepSpeed, FSDP); and only where nothing else reads
        # those logits (an override, a teacher that learns from them). A hook per step and data-dependent shapes
        # would defeat compilation.
        defer = (
            args.fused_token_logits
            and self.accelerator.num_processes == 1
            and not (self.is_deepspeed_enabled or self.is_fsdp_enabled or self.roster.learning)
        )
        self.logit_rows = plan_training_rows(
            student,
            self.terms,
            [source for name, source in self.roster.sources.items() if name not in finished],
            compact=args.compact_token_logits and not args.torch_compile,
            defer=defer and not self.overrides.compute_distillation_loss,
            defer_teachers=not self.overrides.teacher_forward,
        )
        # 5. A teacher cache opened (built first if needed): from here on it stands in for the teachers.
        if caches is not None:
            for name, cache in caches.items():  # what the model card says of a teacher known only from its cache
                if cache is not None and name not in models:
                    self.roster.facts[name] = cached_teacher_facts(cache.record)
            opened = self._use_teacher_caches(caches, references)
            self.roster.use_caches(opened, references, self.args.device)
            self.teacher_cache = next(iter(opened.values()))
            del models
            self.train_dataset = IndexedDataset(self.train_dataset)
            self._check_example_index()

    def _teacher_runner(self, name: str, several: bool):
        """How teacher `name`'s source runs a batch: through `teacher_forward`, so that an override applies."""

        def forward(inputs: Mapping[str, Any], **flags: bool) -> Any:
            return self.teacher_forward(inputs, **flags, **({"teacher": name} if several else {}))

        return forward

    # ---- the parts, as the public API has always named them -----------------------------------------------------

    @property
    def teachers(self) -> dict[str, TeacherSource]:
        """Each teacher's source by name ([`hf_distill.teacher_sources`]): `roster.sources`."""
        return self.roster.sources

    @property
    def distillation_losses(self) -> nn.ModuleDict:
        """The configured losses by term (`terms.losses`), projectors included."""
        return self.terms.losses

    @property
    def teacher_weights(self) -> dict[str, float]:
        """Each teacher's weight in a mixture, summing to 1 (`roster.weights`)."""
        return self.roster.weights

    @property
    def teacher_caches(self) -> dict[str, Any]:
        """Each teacher's cache when a teacher-output cache stands in for the teachers (`roster.caches`)."""
        return self.roster.caches

    @property
    def teacher_model(self) -> nn.Module | None:
        """The teacher in memory when there is exactly one (as prepared by accelerate); None for a cache or several
        (see `teachers`)."""
        return self.roster.model

    # ---- override points -------------------------------------------------------------------------

    def teacher_forward(
        self,
        inputs: Mapping[str, Any],
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        teacher: str | None = None,
    ) -> Any:
        """Run a teacher on a batch, without gradients. Override to feed the teacher other inputs.

        Receives the student's batch; the labels (`labels`, or the student's `label_names` such as `start_positions`)
        are removed so the teacher computes no loss of its own (an encoder-decoder gets the student's
        `decoder_input_ids` instead). Only the outputs the configured losses need are requested, and no
        generation cache (`use_cache=False`, where the teacher takes it). With several teachers it is called once
        per teacher with `teacher=name` (an override must take and pass on that argument); `self.teachers[name]
        .model` is that teacher.
        """
        if teacher is None:
            if len(self.roster.sources) != 1:
                raise ValueError(
                    f"this run has the teachers {list(self.roster.sources)}: say which to run with teacher=name"
                )
            teacher = next(iter(self.roster.sources))
        source = self.roster.sources[teacher]
        if not isinstance(source, FrozenTeacher):
            raise ValueError(
                f"the teacher {teacher!r} is read from a teacher cache, so there is no model to run: call "
                "teacher_forward only when distilling online (teacher_cache unset)"
            )
        return source.run(inputs, output_hidden_states, output_attentions)

    def compute_distillation_loss(
        self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Combine the configured terms into `(loss, {term: value})`. Override to add or reweight terms.

        Each built-in term is its loss's sum over items divided by `normalizer(term, inputs)`: during training the
        item count of the whole accumulated batch, otherwise of this batch. A term you add should follow the same rule
        (a per-batch mean is exact without gradient accumulation). `teacher_outputs` is the teacher's outputs, or with
        several teachers a mapping `{name: outputs}` (`term_teacher_outputs` gives each term what it reads). It is None
        (or holds None) where they are unknown (evaluating on data outside a teacher cache): the terms that need them
        are left out, as are, in evaluation, the terms that need labels on a batch without them. In training, a
        language model's `logits` may be the `[rows, vocab]` of its labeled positions, or `[0, vocab]` when no loss
        reads them (see `compact_token_logits`), or unprojected rows that the terms reading them share one loop over
        (`fused_token_logits`, [`hf_distill.losses.row_terms`]); an override that needs every position's logits sets
        `compact_token_logits=False`.
        """
        loss, terms = torch.zeros((), device=self.args.device), {}
        reads = partial(self.term_teacher_outputs, teacher_outputs=teacher_outputs)
        shared = self.terms.shared_row_totals(student_outputs, inputs, reads, self.term_computable, self.normalizer)
        for term, loss_module in self.terms.losses.items():
            outputs = self.term_teacher_outputs(term, teacher_outputs)
            if not self.term_computable(loss_module, outputs is not None, inputs):
                continue
            total = shared[term] if term in shared else loss_module(student_outputs, outputs, inputs)
            terms[term] = total / self.normalizer(term, inputs).to(total.device)
            loss = loss + self.terms.weights[term] * terms[term]
        return loss, terms

    def term_teacher_outputs(self, term: str, teacher_outputs: Any) -> Any:
        """What term `term` reads of `teacher_outputs`: the only teacher's outputs, the one it names, or all of them
        as a `TeacherEnsemble` (None when some of those are unknown)."""
        return self.roster.for_term(self.terms.routes.get(term) or [], teacher_outputs)

    def term_computable(self, loss: DistillationLoss, has_teacher: bool, inputs: Mapping[str, Any]) -> bool:
        """Whether a term can be computed on this batch (in training every term is, except a term on the dataset's
        completions only in a step of generated completions)."""
        if loss.dataset_completions_only and self.model.training and self.completion_source != "data":
            return False
        if loss.needs_teacher and not has_teacher:
            return False
        unlabeled = all(inputs.get(key) is None for key in self._label_keys)
        return not (loss.needs_labels and unlabeled and not self.model.training)

    @property
    def _label_keys(self) -> tuple[str, ...]:
        """The batch keys that hold labels (`start_positions` and `end_positions` for question answering)."""
        return ("labels", *self.label_names)

    def normalizer(self, term: str, inputs: Mapping[str, Any]) -> torch.Tensor:
        """How many items a term's sum is divided by (see `compute_distillation_loss`); a learning teacher's term
        counts the items of the configured term it mirrors."""
        return self.terms.normalizer(term, inputs, self.model.training)

    # ---- Trainer hooks -----------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        # num_items_in_batch counts labels only; each term is normalised by its own count instead.
        examples = inputs.pop(INDEX_KEY, None)
        if self.seq2seq:  # decoder inputs built once, from the student, for both models (the teacher gets no labels)
            inputs = with_decoder_inputs(self.accelerator.unwrap_model(model), inputs)
        rows = training_rows(self.logit_rows, "student", inputs) if model.training else None
        # With rows, the losses compute the student's task loss from its rows: the model must not (from labels); nor
        # from mixed labels (class probabilities), which hard_label reads itself.
        mixed = model.training and self.image_augmentation is not None and self.image_augmentation.mixes
        student_inputs = (
            inputs if rows is None and not mixed else {key: value for key, value in inputs.items() if key != "labels"}
        )
        defer = rows is not None and self.logit_rows.defers("student")
        with project_rows(self.accelerator.unwrap_model(model), rows, defer) as projection:
            student_outputs = model(**student_inputs, **self.student_output_flags)
        student_outputs = projection.wrap(student_outputs)
        teacher_outputs = self.roster.outputs(inputs, examples, training=model.training)
        # The student's terms read a learning teacher's predictions detached, as that teacher's terms read its own.
        loss, terms = self.compute_distillation_loss(student_outputs, self.roster.detached(teacher_outputs), inputs)
        if self.terms.peers:  # deep mutual learning: the learning teachers' own terms
            peer_loss, peer_values = self.terms.peer_loss(student_outputs, teacher_outputs, inputs, self.roster,
                                                          self.term_computable, self.normalizer, self.args.device)  # fmt: skip
            loss, terms = loss + peer_loss, {**terms, **peer_values}
        self._record_terms(terms, inputs, training=model.training)
        if self.finite_guard is not None and model.training:
            for name, source in self.roster.sources.items():  # a cache was checked when it was built
                outputs = self.roster.of(name, teacher_outputs)
                if isinstance(source, FrozenTeacher) and outputs is not None:
                    self.finite_guard.watch_teacher(outputs, name if self.roster.several else None)
            for term, value in terms.items():
                self.finite_guard.watch(f"the {term} term", value)
            self.finite_guard.watch("the total loss", loss)
        if model.training and self.accelerator.num_processes > 1:
            # Each process holds its share of a globally normalised loss; DDP averages, so undo the average.
            loss = loss * self.accelerator.num_processes
        if not return_outputs:
            return loss
        # Hidden states and maps were for the losses; leaving them in would make them "predictions".
        kept = {key: value for key, value in student_outputs.items() if key not in _INTERNAL_OUTPUTS}
        return loss, type(student_outputs)(**kept)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Fetch the micro-batches of one optimizer step and count each term's items over all of them."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.rollouts is not None and batch_samples:  # before counting: the terms count completion tokens
            batch_samples = self._with_completions(batch_samples)
        if self.image_augmentation is not None:  # before counting: mixed labels count by their mass
            batch_samples = [self._augmented(batch, position) for position, batch in enumerate(batch_samples)]
        self.extra_parts.zero_grad()
        if batch_samples:
            self.term_log.steps += 1  # an empty fetch (end of data) is followed by no optimizer step
            several = self.accelerator.num_processes > 1
            reduce = partial(self.accelerator.reduce, reduction="sum") if several else (lambda counts: counts)
            self.terms.count_window(batch_samples, device, reduce, generated=self.completion_source != "data")
        return batch_samples, num_items_in_batch

    def _augmented(self, inputs: dict[str, Any], position: int) -> dict[str, Any]:
        """One view of a training micro-batch, drawn from the seed, the step, the micro-batch's place in the step
        and the process: the same on a resumed run, different on each process."""
        seed = hash((self.args.seed, self.state.global_step, position, self.args.process_index)) & (2**63 - 1)
        num_labels = getattr(self.accelerator.unwrap_model(self.model).config, "num_labels", 0)
        return augment_batch(self.image_augmentation, inputs, num_labels, seed)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1:
            self.extra_parts.average_gradients()
        # The step's gradients are complete after its last micro-batch: check them before the Trainer measures or
        # clips them (a norm of inf turns every gradient into NaN) and before the optimizer applies them.
        if self.finite_guard is not None and self.accelerator.sync_gradients:
            self.check_finite_step()
        return loss

    def check_finite_step(self) -> None:
        """Raise `FloatingPointError` before the optimizer step if a value of this step was NaN or infinite."""
        # A gradient scaler (fp16) skips steps with infinite gradients by design; DeepSpeed and FSDP hold gradients
        # in their own buffers and shards. Their terms and teacher outputs are still checked.
        own_gradients = self.accelerator.scaler is None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        parameters = None
        if own_gradients:
            parameters = list(self.accelerator.unwrap_model(self.model).named_parameters())
            parameters += self.extra_parts.named_parameters()
        self.finite_guard.check(self.state.global_step + 1, parameters, self.accelerator.num_processes)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's `save_model` (a plain model under FSDP with sharded state dicts too), refused for a student
        whose weights are not finite; with `save_trained_teachers`, each teacher that learnt goes to `teachers/<name>`."""
        output_dir = output_dir or self.args.output_dir
        check_finite_weights(self.accelerator.unwrap_model(self.model), output_dir)
        plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        if plugin and not _internal_call and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
            self._save(output_dir, state_dict=whole_fsdp_weights(self.model))  # the Trainer writes no model there
            if self.args.push_to_hub:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        else:
            super().save_model(output_dir, _internal_call)
        if _internal_call or not self.args.save_trained_teachers or not self.args.should_save:
            return
        self.extra_parts.save_teachers(os.path.join(output_dir, TRAINED_TEACHERS_DIR), self.processing_class)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Written aside, then moved into place: a crash or a full disk never leaves a half-written student.
        if not self.args.should_save:
            return super()._save(output_dir, state_dict)
        with staged_folder(output_dir or self.args.output_dir) as staging:
            super()._save(staging, state_dict)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """The Trainer's `train`; `resume_from_checkpoint=True` takes the last checkpoint whose save completed, whose
        objective must be this run's ([`hf_distill.objective`])."""
        checkpoint = checkpoint_to_resume(resume_from_checkpoint, self.args.output_dir)
        self.objective_changes = []
        if isinstance(checkpoint, str):
            record, allow = objective_record(self.args, self.roster), self.args.resume_with_changed_objective
            self.objective_changes = check_resume(checkpoint, record, allow)
        return super().train(checkpoint, *args, **kwargs)

    def _clip_grad_norm(self, model: nn.Module):
        """Clip the student's and the projectors' gradients together, as one model's would be, and each learning
        teacher's on its own (its own clipping group); the student's norm is the one logged."""
        extra = any(True for _ in self.terms.losses.parameters()) or self.roster.trainable()
        if not extra or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        own = partial(super()._clip_grad_norm, model)
        return self.extra_parts.clip(model, self.args.max_grad_norm, self.accelerator.clip_grad_norm_, own)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus a parameter group for the losses' projectors (also added to one you pass)
        and two for each learning teacher (with and without weight decay, as the Trainer splits the student's), at
        `trainable_teacher_learning_rate`. The scheduler then scales every group's own learning rate alike."""
        optimizer = super().create_optimizer(model)
        self.extra_parts.add_to_optimizer(optimizer, self.args, self.get_decay_parameter_names)
        return optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            self.extra_parts.save(output_dir)
            write_objective(objective_record(self.args, self.roster), output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(self.model if model is None else model)
        if self.is_fsdp_enabled or not load_saved_weights(target, resume_from_checkpoint):  # FSDP: its own shards
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        changed = bool(getattr(self, "objective_changes", None))
        if checkpoint is not None:
            self.extra_parts.load(checkpoint, self.args.device, changed)
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as error:  # other parameter groups: a changed objective starts the optimizer afresh
            if not changed:
                raise
            logger.warning("The optimizer and scheduler start afresh: their state does not fit (%s)", error)

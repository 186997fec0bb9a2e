"""`DistillationTrainer`: a `transformers.Trainer` that trains a student against one or several frozen teachers.

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...),
                                  train_dataset=train, eval_dataset=test, processing_class=tokenizer)
    trainer.train()

Override points for subclasses (the rest is the Trainer's own):
- `teacher_forward(inputs, output_hidden_states, output_attentions, teacher=None)`: how a teacher sees a batch.
- `compute_distillation_loss(student_outputs, teacher_outputs, inputs)`: how the terms combine.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as safetensors_load_model
from safetensors.torch import save_model as safetensors_save_model
from torch import nn
from transformers import Trainer, TrainerCallback

from .augmentation import ImageAugmentation, augment_batch
from .cache import INDEX_KEY, IndexedDataset
from .cache.training import ConfigOnly, TeacherCacheMixin, cached_reference, check_cache_use
from .card import cached_teacher_facts, model_facts
from .checks import check_data, check_same_inputs
from .config import DistillationConfig
from .guards import NonFiniteGuard, check_finite_weights
from .logit_rows import (
    LogitRowsPlan,
    compaction_applies,
    logit_rows_plan,
    project_rows,
    with_teacher,
)
from .losses import DistillationLoss, HardLabelLoss, SoftTargetLoss, build_losses, needs_attention_maps
from .model_kind import convolutional, describe
from .reporting import TermLog, TermReportingMixin
from .saving import checkpoint_to_resume, load_saved_weights, staged_folder
from .seq2seq import check_decoder_start, with_decoder_inputs
from .teacher import deepspeed_teacher, load_teacher, teacher_call_flags, teacher_dtype
from .teacher_sources import (
    DEFAULT_TEACHER,
    EMA_TEACHER,
    EMATeacher,
    FrozenTeacher,
    TeacherEnsemble,
    TeacherSource,
    TrainableTeacher,
    detached,
    normalized_weights,
    training_rows,
)

#: File in each checkpoint holding the losses' learnable parts (projectors): training state, not the student.
LOSS_STATE_NAME = "distillation_losses.safetensors"
#: File in each checkpoint holding the weights of a teacher that learns or follows the student.
TEACHER_STATE_NAME = "teacher-{name}.safetensors"
#: Where `save_model` writes the teachers that learnt, with `save_trained_teachers`.
TRAINED_TEACHERS_DIR = "teachers"
# What the losses asked the models for (encoder-decoders return each per stack); not predictions.
_INTERNAL_OUTPUTS = {
    f"{stack}{kind}" for stack in ("", "encoder_", "decoder_") for kind in ("hidden_states", "attentions")
}
_INTERNAL_OUTPUTS.add("cross_attentions")


class DistillationTrainer(TermReportingMixin, TeacherCacheMixin, Trainer):
    """A [`~transformers.Trainer`] whose loss is a weighted sum of distillation terms from one or several teachers.

    Args:
        model (`PreTrainedModel`): the student; the model that is saved.
        teacher_model (`nn.Module`, `str` or `Mapping[str, nn.Module | str]`, *optional*): the teacher, or a Hub id /
            local folder loaded with the student's task head (safetensors only), `"ema"` for a moving average of the
            student, or several as `{name: teacher}` (`soft_target` mixes them with `args.teacher_weights`; other
            terms name theirs, `"teacher": name`). Optional when no configured loss needs a teacher, or when a
            finished teacher cache stands in for it. The trainer holds each as a source in `teachers`
            ([`hf_distill.teacher_sources`]).
        args ([`DistillationConfig`]): training arguments and the `losses` to combine.
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
        **kwargs: Any,
    ):
        args = _checked_args(args, model, kwargs)
        terms = build_losses(args.losses)
        # 1. Which teachers there are, where their outputs come from, and which terms read which.
        teacher_terms = [term for term, (_, loss) in terms.items() if loss.needs_teacher]
        given = _teacher_mapping(teacher_model, model)
        caches = check_cache_use(args, teacher_terms, kwargs.get("data_collator"), list(given) or None)
        names = list(given) or list(caches or {})
        if teacher_terms and not names:
            raise ValueError(
                f"the losses {teacher_terms} need a teacher: pass teacher_model=(a model, Hub id or path, or a "
                "mapping {name: model} of several)"
                + (f", which builds the teacher cache {args.teacher_cache}" if args.teacher_cache else "")
            )
        self.term_teachers = route_terms(terms, names)
        self._override_takes_teacher(len(names))
        self.learning_teachers = check_learning_teachers(args, given, caches is not None)
        # 2. The teachers loaded, and every input checked before anything is built.
        attention = "eager" if needs_attention_maps(terms) else None
        models = {name: _loaded(source, model, attention, args) for name, source in given.items()}
        self.teacher_facts = {name: model_facts(teacher) for name, teacher in models.items()}
        check_decoder_start(model)
        check_data(
            terms, model, args, kwargs.get("train_dataset"), kwargs.get("eval_dataset"), kwargs.get("data_collator")
        )
        if teacher_terms:
            self._check_teacher_inputs(model, given, models, caches, kwargs.get("processing_class"))

        super().__init__(model=model, args=args, **kwargs)

        # 3. One source per teacher, the losses set up against them, and the mirrored terms of teachers that learn.
        student = self.accelerator.unwrap_model(self.model)
        self.seq2seq = describe(student).seq2seq
        self.teachers: dict[str, TeacherSource] = {}
        if teacher_terms:
            self.teachers = {
                name: self._teacher_source(name, teacher, _reading(terms, self.term_teachers, name), len(names) > 1)
                for name, teacher in models.items()
            }
        references = {name: source.reference for name, source in self.teachers.items()}
        if caches is not None:  # a finished cache stands in for a teacher not given, for the losses' setup
            references.update({name: cached_reference(cache) for name, cache in caches.items() if name not in models})
        self._set_up_losses(terms, student, references)
        self.image_augmentation = self._image_augmentation(student, terms)
        self._use_channels_last(student)
        if any(isinstance(source, EMATeacher) for source in self.teachers.values()):
            self.add_callback(_MovingAverage(self))
        self.teacher_weights = normalized_weights(names, args.teacher_weights) if names else {}
        # 4. What each step needs: the outputs asked of the student, item counts, logs, the finite check, logit rows.
        self.student_output_flags = _output_flags(loss.student_outputs for _, loss in terms.values())
        self._window_counts: dict[str, torch.Tensor] | None = None
        self.term_log = TermLog()
        self.finite_guard = NonFiniteGuard() if args.check_finite else None
        finished = {name for name, cache in (caches or {}).items() if cache is not None}
        self.logit_rows = self._plan_logit_rows(student, terms, skip=finished, cached=set(caches or {}))
        # 5. A teacher cache opened (built first if needed): from here on it stands in for the teachers.
        if caches is not None:
            for name, cache in caches.items():  # what the model card says of a teacher known only from its cache
                if cache is not None and name not in models:
                    self.teacher_facts[name] = cached_teacher_facts(cache.record)
            self.teacher_cache = self._use_teacher_caches(caches, references)
            del models
            self.train_dataset = IndexedDataset(self.train_dataset)

    def _image_augmentation(
        self, student: nn.Module, terms: dict[str, tuple[float, DistillationLoss]]
    ) -> ImageAugmentation | None:
        """The configured augmentation, checked against the student and the teachers; with mixing, `hard_label`
        terms read the mixed labels as class probabilities."""
        if self.args.image_augmentation is None:
            return None
        augmentation = ImageAugmentation.from_config(self.args.image_augmentation)
        if getattr(student, "main_input_name", None) != "pixel_values":
            raise ValueError(
                f"image_augmentation applies to image models (inputs pixel_values), but the student "
                f"{type(student).__name__} reads {getattr(student, 'main_input_name', 'other inputs')}: leave "
                "image_augmentation unset"
            )
        if augmentation.mixes:
            if self.learning_teachers:
                raise ValueError(
                    "mixup/cutmix turns labels into class probabilities, which a teacher that learns cannot train on "
                    "(its model computes its own loss from integer labels): drop mixup_alpha/cutmix_alpha, or "
                    "trainable_teachers"
                )
            if not describe(student).class_labels:
                raise ValueError("mixup/cutmix needs a classifier student (one class label per image)")
            for _, loss in terms.values():
                if isinstance(loss, HardLabelLoss):
                    loss.class_probabilities = True
        return augmentation

    def _use_channels_last(self, student: nn.Module) -> None:
        """Convolutional models (`channels_last` None: those with most weights in 2-D convolutions; True: any with
        one) in the channels-last memory format, the layout oneDNN and cuDNN convolve fastest: the student and
        the frozen teachers. The weights keep their values; saved, they are written in the usual layout."""
        choice = self.args.channels_last
        if choice is False or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return
        models = [student] + [source.model for source in self.teachers.values() if type(source) is FrozenTeacher]
        for model in models:
            if convolutional(model) or (choice and any(isinstance(module, nn.Conv2d) for module in model.modules())):
                model.to(memory_format=torch.channels_last)

    def _check_teacher_inputs(
        self, student: nn.Module, given: Mapping[str, Any], models: dict[str, nn.Module], caches: Any, processor: Any
    ) -> None:
        """Each teacher reads the student's inputs alike (vocabulary, tokenizer), a cache's teacher by its config."""
        names = list(given) or list(caches)
        for name in names:
            finished = None if caches is None else caches[name]
            known = models[name] if finished is None else ConfigOnly(finished.teacher_config())
            source = given[name] if isinstance(given.get(name), str) and given[name] != EMA_TEACHER else None
            with _naming(name, len(names)):
                check_same_inputs(student, known, processor, source)

    def _set_up_losses(
        self, terms: dict[str, tuple[float, DistillationLoss]], student: nn.Module, references: dict[str, Any]
    ) -> None:
        """Set each loss up against the student and every teacher it reads, place them, and add the terms of the
        teachers that learn (`<teacher>_<term>`)."""
        for term, (_, loss) in terms.items():
            for name in self.term_teachers[term] or [None]:
                with _naming(name, len(references)):
                    loss.setup(student, None if name is None else references[name])
        self.loss_weights = {term: weight for term, (weight, _) in terms.items()}
        self.distillation_losses = self._placed_losses(terms, student)
        self.peer_terms = peer_terms(terms, self.teachers, student)
        self.peer_losses = nn.ModuleDict({term: peer.loss for term, peer in self.peer_terms.items()})
        self.peer_losses.to(self.args.device)
        self.loss_weights.update({term: peer.weight for term, peer in self.peer_terms.items()})

    @property
    def teacher_model(self) -> nn.Module | None:
        """The teacher in memory when there is exactly one (as prepared by accelerate); None for a cache or several
        (see `teachers`)."""
        models = [source.model for source in self.teachers.values()]
        return models[0] if len(models) == 1 else None

    def _override_takes_teacher(self, count: int) -> None:
        """With several teachers `teacher_forward` is called with `teacher=name`: an override must take it."""
        if count < 2 or type(self).teacher_forward is DistillationTrainer.teacher_forward:
            return
        parameters = inspect.signature(self.teacher_forward).parameters
        if "teacher" not in parameters and not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            raise TypeError(
                f"{type(self).__name__}.teacher_forward takes no `teacher` argument, but this run has {count} "
                "teachers and says which one to run with teacher=name: add `teacher=None` to the override and pass "
                "it on to super().teacher_forward"
            )

    def _teacher_source(self, name: str, teacher: nn.Module, losses: list[DistillationLoss], several: bool):
        """The teacher `name`, prepared and run through `teacher_forward` (with `teacher=name` when `several`),
        asked for the outputs its `losses` read: frozen, trainable or a moving average of the student."""
        kind = self.learning_teachers.get(name)
        if kind is None:
            prepared = self._prepare_teacher(teacher)
        else:  # it learns, or follows the student: full precision, on the student's device, never wrapped
            prepared = teacher.to(self.args.device)
            prepared.requires_grad_(kind == "trainable")
            prepared.train(kind == "trainable")
        unwrapped = self.accelerator.unwrap_model(prepared)

        def forward(inputs: Mapping[str, Any], **flags: bool) -> Any:
            return self.teacher_forward(inputs, **flags, **({"teacher": name} if several else {}))

        wanted = [loss.teacher_outputs for loss in losses]
        if kind == "trainable":
            wanted.append({"logits"})  # its own terms read its predictions
        arguments = (name, prepared, unwrapped, self.teacher_facts.get(name), teacher_call_flags(unwrapped),
                     _output_flags(wanted), self._label_keys, forward)  # fmt: skip
        if kind == "trainable":
            return TrainableTeacher(*arguments)
        if kind == "ema":
            return EMATeacher(*arguments, momentum=self.args.ema_momentum)
        return FrozenTeacher(*arguments)

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        teacher.requires_grad_(False)
        teacher.eval()
        if self.is_deepspeed_enabled:
            return deepspeed_teacher(teacher, self.accelerator, self.args)
        dtype = teacher_dtype(self.args)
        if dtype is not None:
            teacher.to(dtype)  # half the teacher's memory; its outputs feed fp32 losses either way
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _placed_losses(self, terms: dict[str, tuple[float, DistillationLoss]], student: nn.Module) -> nn.ModuleDict:
        """The losses as one module on the student's device and dtype (their projectors train with the student)."""
        losses = nn.ModuleDict({term: loss for term, (_, loss) in terms.items()})
        losses.to(device=self.args.device, dtype=next(student.parameters()).dtype)
        if self.is_deepspeed_enabled and any(True for _ in losses.parameters()):
            learnable = [term for term, loss in losses.items() if any(True for _ in loss.parameters())]
            raise ValueError(
                f"the losses {learnable} learn projectors, which DistillationTrainer does not train under DeepSpeed yet: "
                "give the student the teacher's widths (hidden_state with 'projection': false), use relation or "
                "attention 'heads': 'relations' (no projector), or train with DDP"
            )
        return losses

    def _plan_logit_rows(
        self,
        student: nn.Module,
        terms: dict[str, tuple[float, DistillationLoss]],
        skip: set[str],
        cached: set[str] = frozenset(),
    ) -> LogitRowsPlan:
        """Where each model projects onto the vocabulary in training (`logit_rows`); each frozen teacher gets its own
        plan, reading the losses that read it. Returns the student's (with the first teacher's fields). The teachers
        in `skip` (a finished cache replaces them before they run) are not probed; those in `cached` (a cache to build
        first, which stores projected rows) are not probed for deferral."""
        # A hook per step and data-dependent shapes would defeat compilation.
        compact = self.args.compact_token_logits and not self.args.torch_compile
        losses = [loss for _, loss in terms.values()]
        # The losses project deferred rows with the weights as one process holds them: not under DDP (which checks
        # that every weight is used inside forward) or sharded (DeepSpeed, FSDP); and only where nothing else reads
        # those logits (an override, a teacher that learns from them).
        defer = (
            self.args.fused_token_logits
            and self.accelerator.num_processes == 1  # DDP would see the projection's weights used outside forward
            and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
            and not self.learning_teachers
        )
        builtin = type(self).compute_distillation_loss is DistillationTrainer.compute_distillation_loss
        plan = logit_rows_plan(student, None, losses, compact, defer and builtin)  # the student probed once
        applies = compaction_applies(student, losses, compact)
        forward_kept = type(self).teacher_forward is DistillationTrainer.teacher_forward
        sources = [source for name, source in self.teachers.items() if name not in skip]
        for source in sources:
            source.rows_plan = with_teacher(
                plan,
                source.reference,
                _reading(terms, self.term_teachers, source.name),
                # A learning teacher computes its task loss from its labels: logits at every position.
                rows=applies and not source.trainable,
                defer=defer and builtin and forward_kept and source.name not in cached,
            )
        return sources[0].rows_plan if sources else plan

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
            if len(self.teachers) != 1:
                raise ValueError(
                    f"this run has the teachers {list(self.teachers)}: say which to run with teacher=name"
                )
            teacher = next(iter(self.teachers))
        source = self.teachers[teacher]
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

        Each built-in term is its loss's sum over items divided by `normalizer(term, inputs)`: during
        training the item count of the whole accumulated batch, otherwise of this batch. A term you add
        should follow the same rule (a per-batch mean is exact without gradient accumulation).
        `teacher_outputs` is the teacher's outputs, or with several teachers a mapping `{name: outputs}`
        (`term_teacher_outputs` gives each term what it reads). It is None (or holds None) where they are unknown
        (evaluating on data outside a teacher cache): the terms that need them are left out, as are, in evaluation, the terms that need labels on a
        batch without them. In training, a language model's `logits` may be the `[rows, vocab]` of its labeled
        positions, or `[0, vocab]` when no loss reads them (see `compact_token_logits`); an override that needs
        every position's logits sets `compact_token_logits=False`.
        """
        loss = torch.zeros((), device=self.args.device)
        terms = {}
        for term, loss_module in self.distillation_losses.items():
            outputs = self.term_teacher_outputs(term, teacher_outputs)
            if not self.term_computable(loss_module, outputs is not None, inputs):
                continue
            total = loss_module(student_outputs, outputs, inputs)
            terms[term] = total / self.normalizer(term, inputs).to(total.device)
            loss = loss + self.loss_weights[term] * terms[term]
        return loss, terms

    # With this combination, eval_loss is recomputed as the weighted sum of the terms' means (evaluation_loop).
    _builtin_combination = compute_distillation_loss

    def term_teacher_outputs(self, term: str, teacher_outputs: Any) -> Any:
        """What term `term` reads of `teacher_outputs`: the only teacher's outputs, the one it names, or all of them
        as a `TeacherEnsemble` (None when some of those are unknown)."""
        if teacher_outputs is None or len(self.teachers) < 2:
            return teacher_outputs
        names = self.term_teachers.get(term) or []
        outputs = [teacher_outputs.get(name) for name in names]
        if not names or any(value is None for value in outputs):
            return None
        if len(names) == 1:
            return outputs[0]
        weights = [self.teacher_weights[name] for name in names]
        return TeacherEnsemble(tuple(names), tuple(outputs), tuple(weight / sum(weights) for weight in weights))

    def term_computable(self, loss: DistillationLoss, has_teacher: bool, inputs: Mapping[str, Any]) -> bool:
        """Whether a term can be computed on this batch (in training, every term must be: it is never skipped)."""
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
        if term in self.peer_terms:
            term = self.peer_terms[term].source
        if self.model.training and self._window_counts is not None:
            return self._window_counts[term]
        return self.distillation_losses[term].count_items(inputs).clamp_min(1)

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
        teacher_outputs = self.teacher_outputs(inputs, examples, training=model.training)
        # The student's terms read a learning teacher's predictions detached, as that teacher's terms read its own.
        loss, terms = self.compute_distillation_loss(student_outputs, self._detached(teacher_outputs), inputs)
        if self.peer_terms:
            peer_loss, peer_values = self.compute_peer_loss(student_outputs, teacher_outputs, inputs)
            loss, terms = loss + peer_loss, {**terms, **peer_values}
        self._record_terms(terms, inputs, training=model.training)
        if self.finite_guard is not None and model.training:
            several = len(self.teachers) > 1
            for name, source in self.teachers.items():  # a cache was checked when it was built
                outputs = teacher_outputs[name] if several else teacher_outputs
                if isinstance(source, FrozenTeacher) and outputs is not None:
                    self.finite_guard.watch_teacher(outputs, name if several else None)
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

    def compute_peer_loss(
        self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The terms of the teachers that learn (deep mutual learning, Zhang et al. 2018): for each, its own task loss
        and the mean divergence from every other model's detached predictions, with the weight, temperature and
        divergence of the configured `hard_label` / `soft_target` term and its item count."""
        several = len(self.teachers) > 1
        predictions = {"student": detached(student_outputs)}
        for name in self.teachers:
            predictions[name] = detached(teacher_outputs[name] if several else teacher_outputs)
        loss = torch.zeros((), device=self.args.device)
        terms = {}
        for term, peer in self.peer_terms.items():
            own = teacher_outputs[peer.teacher] if several else teacher_outputs
            if not self.term_computable(peer.loss, True, inputs):
                continue
            if peer.loss.needs_teacher:
                others = [outputs for name, outputs in predictions.items() if name != peer.teacher]
                total = sum(peer.loss(own, other, inputs) for other in others) / len(others)
            else:
                total = peer.loss(own, None, inputs)
            terms[term] = total / self.normalizer(term, inputs).to(total.device)
            loss = loss + peer.weight * terms[term]
        return loss, terms

    def _detached(self, teacher_outputs: Any) -> Any:
        """`teacher_outputs` with the predictions of the teachers that learn detached."""
        if not any(source.trainable for source in self.teachers.values()):
            return teacher_outputs
        if len(self.teachers) == 1:
            return detached(teacher_outputs)
        return {
            name: detached(outputs) if self.teachers[name].trainable else outputs
            for name, outputs in teacher_outputs.items()
        }

    def teacher_outputs(self, inputs: Mapping[str, Any], examples: torch.Tensor | None, training: bool) -> Any:
        """Every teacher's outputs for this batch: the only teacher's, or `{name: outputs}` with several (None where a
        source has none, as a cache in evaluation); None without a teacher."""
        if not self.teachers:
            return None
        outputs = {name: source.outputs(inputs, examples, training) for name, source in self.teachers.items()}
        return outputs if len(outputs) > 1 else next(iter(outputs.values()))

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Fetch the micro-batches of one optimizer step and count each term's items over all of them."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.image_augmentation is not None:  # before counting: mixed labels count by their mass
            batch_samples = [self._augmented(batch, position) for position, batch in enumerate(batch_samples)]
        # The Trainer zeroes the student's gradients only (model.zero_grad()); the projectors' and the learning
        # teachers' would pile up.
        for part in self.extra_trained_modules().values():
            part.zero_grad(set_to_none=True)
        if batch_samples:
            self.term_log.steps += 1  # an empty fetch (end of data) is followed by no optimizer step
            counts = torch.stack(
                [
                    sum(loss.count_items(batch).to(device) for batch in batch_samples)
                    for loss in self.distillation_losses.values()
                ]
            )
            if self.accelerator.num_processes > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            self._window_counts = dict(zip(self.distillation_losses, counts.clamp_min(1), strict=True))
        return batch_samples, num_items_in_batch

    def _augmented(self, inputs: dict[str, Any], position: int) -> dict[str, Any]:
        """One view of a training micro-batch, drawn from the seed, the step, the micro-batch's place in the step
        and the process: the same on a resumed run, different on each process."""
        seed = hash((self.args.seed, self.state.global_step, position, self.args.process_index)) & (2**63 - 1)
        num_labels = getattr(self.accelerator.unwrap_model(self.model).config, "num_labels", 0)
        return augment_batch(self.image_augmentation, inputs, num_labels, seed)

    def extra_trained_modules(self) -> dict[str, nn.Module]:
        """What trains besides the student, by prefix: the losses' projectors (`losses`) and each teacher that
        learns (`teacher:<name>`). Gradients, clipping, the optimizer and checkpoints cover them all."""
        parts: dict[str, nn.Module] = {"losses": self.distillation_losses}
        for name, source in self.teachers.items():
            if source.trainable:
                parts[f"teacher:{name}"] = source.reference
        return parts

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1:
            # Projectors and learning teachers live outside the DDP-wrapped student, so average their gradients
            # here. Averaging at every micro-step is exact: the part already averaged is the same on every process.
            for part in self.extra_trained_modules().values():
                for parameter in part.parameters():
                    if parameter.grad is not None:
                        torch.distributed.all_reduce(parameter.grad, op=torch.distributed.ReduceOp.AVG)
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
            for prefix, part in self.extra_trained_modules().items():
                parameters += [(f"{prefix}.{name}", p) for name, p in part.named_parameters()]
        self.finite_guard.check(self.state.global_step + 1, parameters, self.accelerator.num_processes)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's `save_model`, refused (`FloatingPointError`) for a student whose weights are not finite;
        with `save_trained_teachers`, each teacher that learnt goes to `<output_dir>/teachers/<name>` beside it."""
        output_dir = output_dir or self.args.output_dir
        check_finite_weights(self.accelerator.unwrap_model(self.model), output_dir)
        super().save_model(output_dir, _internal_call)
        if _internal_call or not self.args.save_trained_teachers or not self.args.should_save:
            return
        for name, source in self.teachers.items():
            if source.trainable:
                folder = os.path.join(output_dir, TRAINED_TEACHERS_DIR, name)
                check_finite_weights(source.reference, folder)
                with staged_folder(folder) as staging:
                    source.reference.save_pretrained(staging)
                    if self.processing_class is not None:
                        self.processing_class.save_pretrained(staging)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Written aside, then moved into place: a crash or a full disk never leaves a half-written student.
        if not self.args.should_save:
            return super()._save(output_dir, state_dict)
        with staged_folder(output_dir or self.args.output_dir) as staging:
            super()._save(staging, state_dict)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """The Trainer's `train`; `resume_from_checkpoint=True` takes the last checkpoint whose save completed."""
        return super().train(checkpoint_to_resume(resume_from_checkpoint, self.args.output_dir), *args, **kwargs)

    def _clip_grad_norm(self, model: nn.Module):
        """Clip the student's and the projectors' gradients together, as one model's would be, and each learning
        teacher's on its own (its own clipping group); the student's norm is the one logged."""
        projectors = list(self.distillation_losses.parameters())
        teachers = [part for prefix, part in self.extra_trained_modules().items() if prefix != "losses"]
        if (not projectors and not teachers) or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        for teacher in teachers:
            self.accelerator.clip_grad_norm_(teacher.parameters(), self.args.max_grad_norm)
        if not projectors:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *projectors], self.args.max_grad_norm)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus a parameter group for the losses' projectors (also added to one you pass)
        and two for each learning teacher (with and without weight decay, as the Trainer splits the student's), at
        `trainable_teacher_learning_rate`. The scheduler then scales every group's own learning rate alike."""
        optimizer = super().create_optimizer(model)
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.distillation_losses.parameters() if p.requires_grad and id(p) not in known]
        if missing:
            optimizer.add_param_group({"params": missing, "weight_decay": self.args.weight_decay})
        learning_rate = self.args.trainable_teacher_learning_rate or self.args.learning_rate
        for prefix, part in self.extra_trained_modules().items():
            if prefix == "losses":
                continue
            decay = set(self.get_decay_parameter_names(part))
            for decayed in (True, False):
                group = [p for n, p in part.named_parameters() if p.requires_grad and (n in decay) == decayed
                         and id(p) not in known]  # fmt: skip
                if group:
                    optimizer.add_param_group({"params": group, "lr": learning_rate,
                                               "weight_decay": self.args.weight_decay if decayed else 0.0})  # fmt: skip
        return optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return
        state = self.distillation_losses.state_dict()
        if state:
            _save_state(state, os.path.join(output_dir, LOSS_STATE_NAME))
        for name, module in self._teachers_with_state().items():
            # save_model keeps one copy of tied weights (a language model's embeddings and output projection).
            path = os.path.join(output_dir, TEACHER_STATE_NAME.format(name=name))
            safetensors_save_model(module, path + ".tmp")
            os.replace(path + ".tmp", path)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(self.model if model is None else model)
        if not load_saved_weights(target, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.distillation_losses.state_dict():
            path = os.path.join(checkpoint, LOSS_STATE_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{checkpoint} has no {LOSS_STATE_NAME}, so the losses' projectors cannot be restored; resume "
                    "from a checkpoint written by DistillationTrainer with the same losses"
                )
            self.distillation_losses.load_state_dict(load_file(path, device=str(self.args.device)))
        for name, module in self._teachers_with_state().items() if checkpoint is not None else ():
            path = os.path.join(checkpoint, TEACHER_STATE_NAME.format(name=name))
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{checkpoint} has no {os.path.basename(path)}, so the weights teacher {name!r} learnt cannot be "
                    "restored; resume from a checkpoint written by DistillationTrainer with the same teachers"
                )
            safetensors_load_model(module, path, device=str(self.args.device))
        super()._load_optimizer_and_scheduler(checkpoint)

    def _teachers_with_state(self) -> dict[str, nn.Module]:
        """The teachers whose weights change in training (trainable, moving average): part of every checkpoint."""
        return {name: self.teachers[name].reference for name in self.learning_teachers if name in self.teachers}


def _output_flags(needs: Any) -> dict[str, bool]:
    wanted = set().union(*needs)
    return {f"output_{name}": True for name in ("hidden_states", "attentions") if name in wanted}


def _checked_args(
    args: DistillationConfig | None, model: nn.Module | None, kwargs: dict[str, Any]
) -> DistillationConfig:
    """The config, after refusing what `DistillationTrainer` does not apply."""
    args = DistillationConfig() if args is None else args
    if not isinstance(args, DistillationConfig):
        raise TypeError(
            f"DistillationTrainer takes a DistillationConfig as args, not {type(args).__name__}: build "
            "hf_distill.DistillationConfig(**your_training_arguments, losses={...})"
        )
    if model is None:
        raise ValueError("pass the student as model=...; DistillationTrainer does not support model_init")
    if args.label_smoothing_factor:
        raise ValueError(
            "label_smoothing_factor is not applied by DistillationTrainer (soft targets already smooth the "
            "labels); set it to 0"
        )
    if kwargs.get("compute_loss_func") is not None:
        raise ValueError("compute_loss_func is not used by DistillationTrainer; register a loss with register_loss")
    return args


def _teacher_mapping(teacher_model: Any, student: nn.Module) -> dict[str, nn.Module | str]:
    """`teacher_model` as `{name: model or Hub id / path}`: one teacher is called "teacher"."""
    if teacher_model is None:
        return {}
    given = dict(teacher_model) if isinstance(teacher_model, Mapping) else {DEFAULT_TEACHER: teacher_model}
    if not given:
        raise ValueError("teacher_model is an empty mapping: give at least one {name: model}, or None")
    for name, teacher in given.items():
        if not (isinstance(name, str) and name):
            raise ValueError(f"teacher_model's keys name the teachers and must be non-empty strings, got {name!r}")
        if not isinstance(teacher, (nn.Module, str)):
            raise TypeError(
                f"teacher {name!r} is a {type(teacher).__name__}: give a model, or a Hub id or local folder (str)"
            )
        if teacher is student:
            raise ValueError("the teacher and the student are the same object: pass a separate teacher model")
    return given


def _loaded(
    teacher: nn.Module | str, student: nn.Module, attention: str | None, args: DistillationConfig
) -> nn.Module:
    """A teacher given as a Hub id or path, loaded with the student's task head; `"ema"`, a copy of the student (the
    start of its moving average); a model as it is."""
    if teacher == EMA_TEACHER:
        return copy.deepcopy(student)
    if not isinstance(teacher, str):
        return teacher
    return load_teacher(
        teacher, student, attn_implementation=attention, trust_remote_code=args.teacher_trust_remote_code
    )


def route_terms(terms: dict[str, tuple[float, DistillationLoss]], names: list[str]) -> dict[str, list[str]]:
    """Which teachers each term reads: the one its `"teacher"` entry names, the only one, or all of them for a
    loss that mixes teachers; `[]` for a term that reads none. Errors name the fix."""
    routes = {}
    for term, (_, loss) in terms.items():
        if not loss.needs_teacher or not names:
            routes[term] = []
        elif loss.teacher_name is not None:
            if loss.teacher_name not in names:
                raise ValueError(
                    f"losses[{term!r}] reads the teacher {loss.teacher_name!r}, but the teachers are {names}: name "
                    "one of them (the keys of teacher_model; a single teacher is called 'teacher')"
                )
            routes[term] = [loss.teacher_name]
        elif len(names) == 1 or loss.mixes_teachers:
            routes[term] = list(names)
        else:
            raise ValueError(
                f"losses[{term!r}] reads one teacher, and there are {len(names)} ({', '.join(names)}): say which with "
                f"'teacher': {names[0]!r} in its entry (a term per teacher, under two names, follows both)"
            )
    return routes


def _reading(
    terms: dict[str, tuple[float, DistillationLoss]], routes: dict[str, list[str]], name: str
) -> list[DistillationLoss]:
    """The losses that read teacher `name`."""
    return [loss for term, (_, loss) in terms.items() if name in routes[term]]


@contextmanager
def _naming(name: str | None, count: int) -> Iterator[None]:
    """With several teachers, a check's `ValueError` says which teacher it is about."""
    try:
        yield
    except ValueError as error:
        if count < 2 or name is None:
            raise
        raise ValueError(f"teacher {name!r}: {error}") from error


def _save_state(state: dict[str, torch.Tensor], path: str) -> None:
    """Write a state dict as safetensors, then rename: an interrupted save never leaves a truncated file."""
    save_file({key: value.detach().contiguous().cpu() for key, value in state.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def check_learning_teachers(args: DistillationConfig, given: Mapping[str, Any], cached: bool) -> dict[str, str]:
    """`{name: "trainable" or "ema"}` for the teachers that change in training; what cannot serve is refused."""
    learning = {name: "ema" for name, teacher in given.items() if teacher == EMA_TEACHER}
    trainable = list(args.trainable_teachers or [])
    unknown = [name for name in trainable if name not in given]
    if unknown:
        raise ValueError(
            f"trainable_teachers names {unknown}, but the teachers are {list(given) or 'none'}: name teachers given in "
            "teacher_model (a single teacher is called 'teacher')"
        )
    both = [name for name in trainable if name in learning]
    if both:
        raise ValueError(
            f"the teachers {both} are moving averages of the student (teacher_model 'ema'), which cannot also be "
            "trainable: drop them from trainable_teachers"
        )
    learning.update({name: "trainable" for name in trainable})
    if learning and cached:
        kinds = ", ".join(f"{name} ({kind})" for name, kind in learning.items())
        raise ValueError(
            f"a teacher cache stores fixed outputs, but the teachers {kinds} change at every step, so their outputs "
            "cannot be computed ahead: unset teacher_cache, or keep those teachers frozen"
        )
    if learning and (args.deepspeed or args.fsdp):
        raise ValueError(
            f"teachers that learn or follow the student ({', '.join(learning)}) are not supported under DeepSpeed or "
            "FSDP yet: train with one process or DDP"
        )
    return learning


@dataclass(frozen=True)
class PeerTerm:
    """A term of a teacher that learns: `loss` on that `teacher`, mirroring the configured term `source`."""

    teacher: str
    source: str
    weight: float
    loss: DistillationLoss


def peer_terms(
    terms: dict[str, tuple[float, DistillationLoss]], teachers: Mapping[str, TeacherSource], student: nn.Module
) -> dict[str, PeerTerm]:
    """For each trainable teacher, its mirror of every configured `hard_label` (its task loss) and `soft_target`
    (toward the other models' predictions) term, under `<teacher>_<term>`; the same weight and options."""
    peers = {}
    for name, source in teachers.items():
        if not source.trainable:
            continue
        for term, (weight, loss) in terms.items():
            if isinstance(loss, HardLabelLoss):
                mirror = HardLabelLoss()
            elif isinstance(loss, SoftTargetLoss) and loss.teacher_name in (None, name):
                mirror = SoftTargetLoss(loss.temperature, loss.divergence, loss.chunk_size)
            else:
                continue
            key = f"{name}_{term}"
            if key in terms:
                raise ValueError(
                    f"losses[{key!r}] has the name of teacher {name!r}'s own {term} term: rename the loss term"
                )
            mirror.term = key
            mirror.setup(source.reference, student)  # the teacher learns as a student would, from the others
            peers[key] = PeerTerm(name, term, weight, mirror)
    if any(source.trainable for source in teachers.values()) and not peers:
        raise ValueError(
            "a teacher is trainable, but no hard_label or soft_target term is configured for it to learn from: add "
            "them to losses (mutual learning uses both)"
        )
    return peers


class _MovingAverage(TrainerCallback):
    """Moves each moving-average teacher toward the student after every optimizer step."""

    def __init__(self, trainer: DistillationTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        student = self.trainer.accelerator.unwrap_model(self.trainer.model)
        for source in self.trainer.teachers.values():
            if isinstance(source, EMATeacher):
                source.update(student)

"""`DistillationTrainer`: a `transformers.Trainer` that trains a student against a frozen teacher.

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...),
                                  train_dataset=train, eval_dataset=test, processing_class=tokenizer)
    trainer.train()

Override points for subclasses (the rest is the Trainer's own):
- `teacher_forward(inputs, output_hidden_states, output_attentions)`: how the teacher sees a batch.
- `compute_distillation_loss(student_outputs, teacher_outputs, inputs)`: how the terms combine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer

from .cache import INDEX_KEY, IndexedDataset
from .cache.training import ConfigOnly, TeacherCacheMixin, check_cache_use
from .card import cached_teacher_facts, model_facts
from .checks import check_data, check_same_inputs
from .config import DistillationConfig
from .guards import NonFiniteGuard, check_finite_weights
from .logit_rows import logit_rows_plan, project_rows
from .losses import DistillationLoss, build_losses, needs_attention_maps
from .model_kind import describe
from .positions import label_positions
from .reporting import TermReportingMixin
from .saving import checkpoint_to_resume, staged_folder
from .seq2seq import check_decoder_start, with_decoder_inputs
from .teacher import deepspeed_teacher, load_teacher, teacher_call_flags, teacher_dtype

#: File in each checkpoint holding the losses' learnable parts (projectors): training state, not the student.
LOSS_STATE_NAME = "distillation_losses.safetensors"
# What the losses asked the models for (encoder-decoders return each per stack); not predictions.
_INTERNAL_OUTPUTS = {
    f"{stack}{kind}" for stack in ("", "encoder_", "decoder_") for kind in ("hidden_states", "attentions")
}
_INTERNAL_OUTPUTS.add("cross_attentions")


class DistillationTrainer(TermReportingMixin, TeacherCacheMixin, Trainer):
    """A [`~transformers.Trainer`] whose loss is a weighted sum of distillation terms from a frozen teacher.

    Args:
        model (`PreTrainedModel`): the student; the only model that trains and is saved.
        teacher_model (`nn.Module` or `str`, *optional*): the teacher, or a Hub id / local folder loaded with the
            student's task head (safetensors only). Optional when no configured loss needs a teacher.
        args ([`DistillationConfig`]): training arguments and the `losses` to combine.
        **kwargs: every other [`~transformers.Trainer`] argument (datasets, collator, processing_class,
            compute_metrics, callbacks, optimizers...).

    The teacher is frozen, in eval mode, prepared by accelerate in evaluation mode (under DeepSpeed ZeRO-3,
    partitioned by an inference engine), never in the optimizer and never saved. The losses' projectors train with
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
        teacher_model: nn.Module | str | None = None,
        args: DistillationConfig | None = None,
        **kwargs: Any,
    ):
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
            raise ValueError(
                "compute_loss_func is not used by DistillationTrainer; register a loss with register_loss"
            )
        terms = build_losses(args.losses)
        teacher_terms = [term for term, (_, loss) in terms.items() if loss.needs_teacher]
        cache = check_cache_use(args, teacher_terms, kwargs.get("data_collator"))
        if teacher_model is None and teacher_terms and cache is None:
            raise ValueError(
                f"the losses {teacher_terms} need a teacher: pass teacher_model=(a model, Hub id or path)"
                + (f", which builds the teacher cache {args.teacher_cache}" if args.teacher_cache else "")
            )
        teacher_source = teacher_model if isinstance(teacher_model, str) else None
        if isinstance(teacher_model, str):
            teacher_model = load_teacher(
                teacher_model,
                model,
                attn_implementation="eager" if needs_attention_maps(terms) else None,
                trust_remote_code=args.teacher_trust_remote_code,
            )
        if teacher_model is not None and teacher_model is model:
            raise ValueError("the teacher and the student are the same object: pass a separate teacher model")
        check_decoder_start(model)
        teacher_facts = model_facts(teacher_model) if isinstance(teacher_model, nn.Module) else None
        check_data(
            terms, model, args, kwargs.get("train_dataset"), kwargs.get("eval_dataset"), kwargs.get("data_collator")
        )
        if teacher_terms:
            known_teacher = teacher_model if cache is None else ConfigOnly(cache.teacher_config())
            check_same_inputs(model, known_teacher, kwargs.get("processing_class"), teacher_source)

        super().__init__(model=model, args=args, **kwargs)

        self.teacher_model = None
        if teacher_model is not None and teacher_terms:
            self.teacher_model = self._prepare_teacher(teacher_model)
        student = self.accelerator.unwrap_model(self.model)
        teacher = None if self.teacher_model is None else self.accelerator.unwrap_model(self.teacher_model)
        self.seq2seq = describe(student).seq2seq
        self._teacher_flags = teacher_call_flags(teacher)
        if teacher is None and cache is not None:
            teacher = ConfigOnly(cache.teacher_config(), cache.record["teacher"]["class"])  # what setup reads
        for _, loss in terms.values():
            loss.setup(student, teacher)
        student_dtype = next(student.parameters()).dtype
        self.loss_weights = {term: weight for term, (weight, _) in terms.items()}
        self.distillation_losses = nn.ModuleDict({term: loss for term, (_, loss) in terms.items()}).to(
            device=self.args.device, dtype=student_dtype
        )
        if self.is_deepspeed_enabled and any(True for _ in self.distillation_losses.parameters()):
            learnable = [
                term for term, loss in self.distillation_losses.items() if any(True for _ in loss.parameters())
            ]
            raise ValueError(
                f"the losses {learnable} learn projectors, which DistillationTrainer does not train under DeepSpeed yet: "
                "give the student the teacher's widths (hidden_state with 'projection': false), use relation or "
                "attention 'heads': 'relations' (no projector), or train with DDP"
            )
        self.student_output_flags = _output_flags(loss.student_outputs for _, loss in terms.values())
        self.teacher_output_flags = _output_flags(loss.teacher_outputs for _, loss in terms.values())
        self._window_counts: dict[str, torch.Tensor] | None = None
        self._train_terms: dict[str, torch.Tensor] = {}
        self._eval_terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._term_steps = 0  # optimizer steps whose terms _train_terms holds
        self.finite_guard = NonFiniteGuard() if args.check_finite else None
        # A hook per step and data-dependent shapes would defeat compilation.
        compact = args.compact_token_logits and not args.torch_compile
        # A finished cache replaces the teacher before it runs: no need to probe it.
        running_teacher = teacher if cache is None else None
        self.logit_rows = logit_rows_plan(student, running_teacher, [loss for _, loss in terms.values()], compact)
        # What the model card says of the teacher (create_model_card): as given, else as its cache records it.
        self._teacher_facts = teacher_facts or (None if cache is None else cached_teacher_facts(cache.record))
        if args.teacher_cache is not None:
            self.teacher_cache = self._use_teacher_cache(cache, teacher)
            # From here on the cache stands in for the teacher, which leaves memory.
            self.teacher_model = teacher = teacher_model = None
            self.train_dataset = IndexedDataset(self.train_dataset)

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        teacher.requires_grad_(False)
        teacher.eval()
        if self.is_deepspeed_enabled:
            return deepspeed_teacher(teacher, self.accelerator, self.args)
        dtype = teacher_dtype(self.args)
        if dtype is not None:
            teacher.to(dtype)  # half the teacher's memory; its outputs feed fp32 losses either way
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # ---- override points -------------------------------------------------------------------------

    def teacher_forward(
        self, inputs: Mapping[str, Any], output_hidden_states: bool = False, output_attentions: bool = False
    ) -> Any:
        """Run the teacher on a batch, without gradients. Override to feed the teacher other inputs.

        Receives the student's batch; the labels (`labels`, or the student's `label_names` such as `start_positions`)
        are removed so the teacher computes no loss of its own (an encoder-decoder gets the student's
        `decoder_input_ids` instead). Only the outputs the configured losses need are requested, and no
        generation cache (`use_cache=False`, where the teacher takes it).
        """
        teacher_inputs = {key: value for key, value in inputs.items() if key not in self._label_keys}
        teacher_inputs.update(self._teacher_flags)
        if output_hidden_states:
            teacher_inputs["output_hidden_states"] = True
        if output_attentions:
            teacher_inputs["output_attentions"] = True
        with torch.no_grad():
            return self.teacher_model(**teacher_inputs)

    def compute_distillation_loss(
        self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Combine the configured terms into `(loss, {term: value})`. Override to add or reweight terms.

        Each built-in term is its loss's sum over items divided by `normalizer(term, inputs)`: during
        training the item count of the whole accumulated batch, otherwise of this batch. A term you add
        should follow the same rule (a per-batch mean is exact without gradient accumulation).
        `teacher_outputs` is None when the teacher's outputs are unknown (evaluating on data outside a teacher
        cache): the terms that need them are left out, as are, in evaluation, the terms that need labels on a
        batch without them. In training, a language model's `logits` may be the `[rows, vocab]` of its labeled
        positions, or `[0, vocab]` when no loss reads them (see `compact_token_logits`); an override that needs
        every position's logits sets `compact_token_logits=False`.
        """
        loss = torch.zeros((), device=self.args.device)
        terms = {}
        for term, loss_module in self.distillation_losses.items():
            if not self._computable(loss_module, teacher_outputs is not None, inputs):
                continue
            total = loss_module(student_outputs, teacher_outputs, inputs)
            terms[term] = total / self.normalizer(term, inputs).to(total.device)
            loss = loss + self.loss_weights[term] * terms[term]
        return loss, terms

    # With this combination, eval_loss is recomputed as the weighted sum of the terms' means (evaluation_loop).
    _builtin_combination = compute_distillation_loss

    def _computable(self, loss: DistillationLoss, has_teacher: bool, inputs: Mapping[str, Any]) -> bool:
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
        """How many items a term's sum is divided by (see `compute_distillation_loss`)."""
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
        rows = self._projected_rows(inputs) if model.training else None
        # With rows, the losses compute the student's task loss from its rows: the model must not (from labels).
        student_inputs = inputs if rows is None else {key: value for key, value in inputs.items() if key != "labels"}
        with project_rows(self.accelerator.unwrap_model(model), rows):
            student_outputs = model(**student_inputs, **self.student_output_flags)
        teacher_outputs = None
        if self.teacher_cache is not None and examples is not None:
            teacher_outputs = self.teacher_cache.outputs_for(examples.tolist(), inputs, self.args.device)
        elif self.teacher_model is not None:
            teacher_outputs = self._teacher_outputs(inputs, training=model.training)
        loss, terms = self.compute_distillation_loss(student_outputs, teacher_outputs, inputs)
        self._record_terms(terms, inputs, training=model.training)
        if self.finite_guard is not None and model.training:
            if self.teacher_model is not None and teacher_outputs is not None:
                self.finite_guard.watch_teacher(teacher_outputs)
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

    def _teacher_outputs(self, inputs: Mapping[str, Any], training: bool = True) -> Any:
        """`teacher_forward` with the outputs the losses need; in training, its logits only where they are read."""
        rows = self._projected_rows(inputs, "teacher") if training else None
        with project_rows(self.accelerator.unwrap_model(self.teacher_model), rows):
            return self.teacher_forward(inputs, **self.teacher_output_flags)

    def _projected_rows(self, inputs: Mapping[str, Any], model: str = "student") -> torch.Tensor | None:
        """The `[batch, length]` positions at which `model` ("student" or "teacher") projects onto the vocabulary
        in training (see `logit_rows`): the labeled ones, or none when no loss reads its logits. None: all."""
        if not self.logit_rows.compacts(model):
            return None
        if not self.logit_rows.reads(model):
            input_ids = inputs.get("input_ids")
            return None if input_ids is None else torch.zeros_like(input_ids, dtype=torch.bool)
        labels = inputs.get("labels")
        return None if labels is None else label_positions(labels, shift=self.logit_rows.shift)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Fetch the micro-batches of one optimizer step and count each term's items over all of them."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        # The Trainer zeroes the student's gradients only (model.zero_grad()); the projectors' would pile up.
        self.distillation_losses.zero_grad(set_to_none=True)
        if batch_samples:
            self._term_steps += 1  # an empty fetch (end of data) is followed by no optimizer step
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

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1:
            # Projectors live outside the DDP-wrapped student, so average their gradients here. Averaging at
            # every micro-step is exact: the part already averaged is the same on every process.
            for parameter in self.distillation_losses.parameters():
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
            student = self.accelerator.unwrap_model(self.model).named_parameters()
            projectors = (("losses." + name, p) for name, p in self.distillation_losses.named_parameters())
            parameters = [*student, *projectors]
        self.finite_guard.check(self.state.global_step + 1, parameters, self.accelerator.num_processes)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's `save_model`, refused (`FloatingPointError`) for a student whose weights are not finite."""
        check_finite_weights(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir)
        super().save_model(output_dir, _internal_call)

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
        """Clip the student's and the projectors' gradients together, as one model's would be."""
        parameters = list(self.distillation_losses.parameters())
        if not parameters or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *parameters], self.args.max_grad_norm)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus a parameter group for the losses' projectors (also added to one you pass)."""
        optimizer = super().create_optimizer(model)
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.distillation_losses.parameters() if p.requires_grad and id(p) not in known]
        if missing:
            optimizer.add_param_group({"params": missing, "weight_decay": self.args.weight_decay})
        return optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        state = self.distillation_losses.state_dict()
        if state and self.args.should_save:
            path = os.path.join(output_dir, LOSS_STATE_NAME)
            # Write then rename, so an interrupted save never leaves a truncated file that looks complete.
            save_file({key: value.detach().contiguous().cpu() for key, value in state.items()}, path + ".tmp")
            os.replace(path + ".tmp", path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.distillation_losses.state_dict():
            path = os.path.join(checkpoint, LOSS_STATE_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{checkpoint} has no {LOSS_STATE_NAME}, so the losses' projectors cannot be restored; resume "
                    "from a checkpoint written by DistillationTrainer with the same losses"
                )
            self.distillation_losses.load_state_dict(load_file(path, device=str(self.args.device)))
        super()._load_optimizer_and_scheduler(checkpoint)


def _output_flags(needs: Any) -> dict[str, bool]:
    wanted = set().union(*needs)
    return {f"output_{name}": True for name in ("hidden_states", "attentions") if name in wanted}

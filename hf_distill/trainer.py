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
from transformers import DataCollatorForLanguageModeling, Trainer

from .cache import INDEX_KEY, IndexedDataset
from .cache.training import ConfigOnly, TeacherCacheMixin, check_cache_use
from .config import DistillationConfig
from .logit_rows import label_rows, project_rows, supports_rows
from .losses import DistillationLoss, HardLabelLoss, build_losses, needs_attention_maps
from .losses.logits import CAUSAL_LM_CLASSES, LANGUAGE_MODEL_CLASSES
from .teacher import load_teacher

#: File in each checkpoint holding the losses' learnable parts (projectors): training state, not the student.
LOSS_STATE_NAME = "distillation_losses.safetensors"
_LABEL_COLUMNS = ("label", "labels", "label_ids")
_INTERNAL_OUTPUTS = ("hidden_states", "attentions")


class DistillationTrainer(TeacherCacheMixin, Trainer):
    """A [`~transformers.Trainer`] whose loss is a weighted sum of distillation terms from a frozen teacher.

    Args:
        model (`PreTrainedModel`): the student; the only model that trains and is saved.
        teacher_model (`nn.Module` or `str`, *optional*): the teacher, or a Hub id / local folder loaded with the
            student's task head (safetensors only). Optional when no configured loss needs a teacher.
        args ([`DistillationConfig`]): training arguments and the `losses` to combine.
        **kwargs: every other [`~transformers.Trainer`] argument (datasets, collator, processing_class,
            compute_metrics, callbacks, optimizers...).

    The teacher is frozen, kept in eval mode, prepared by accelerate in evaluation mode (never wrapped for
    gradient sync), never in the optimizer and never saved. Learnable parts of the losses (projectors)
    train with the student, are saved in checkpoints as `distillation_losses.safetensors` and restored by
    `resume_from_checkpoint`, and stay out of the saved student. Each term is normalised over the whole
    accumulated (and, across processes, global) batch, so gradient accumulation changes nothing but memory.
    Every term is logged under its name in training logs and as `eval_<name>` by `evaluate()`.

    With `args.teacher_cache` set ([`hf_distill.cache`]), the teacher's outputs on the training set are built
    there once (by the main process, resuming an interrupted build) and read back at each step; the trainer then
    holds no teacher (`teacher_model` may be omitted once the cache exists; when given, its weights are hashed
    and must match the cache's). Evaluation has no cached outputs, so only the terms that need no teacher are
    computed there.

    For a masked or causal LM student trained on labels, the vocabulary projection of the student (and of an
    online teacher) runs only at the labeled positions during training (`args.compact_token_logits`,
    [`hf_distill.logit_rows`]): `student_outputs.logits` seen by the losses and by `compute_distillation_loss`
    are then `[rows, vocab]`, the labeled positions in row-major order. Evaluation and prediction see full logits.
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
        if isinstance(teacher_model, str):
            teacher_model = load_teacher(
                teacher_model,
                model,
                attn_implementation="eager" if needs_attention_maps(terms) else None,
                trust_remote_code=args.teacher_trust_remote_code,
            )
        if teacher_model is not None and teacher_model is model:
            raise ValueError("the teacher and the student are the same object: pass a separate teacher model")
        _check_labels(terms, kwargs.get("train_dataset"), kwargs.get("data_collator"))

        super().__init__(model=model, args=args, **kwargs)

        self.teacher_model = None
        if teacher_model is not None and teacher_terms:
            self.teacher_model = self._prepare_teacher(teacher_model)
        student = self.accelerator.unwrap_model(self.model)
        teacher = None if self.teacher_model is None else self.accelerator.unwrap_model(self.teacher_model)
        if teacher is None and cache is not None:
            teacher = ConfigOnly(cache.teacher_config())  # what the losses' setup reads of a teacher
        for _, loss in terms.values():
            loss.setup(student, teacher)
        student_dtype = next(student.parameters()).dtype
        self.loss_weights = {term: weight for term, (weight, _) in terms.items()}
        self.distillation_losses = nn.ModuleDict({term: loss for term, (_, loss) in terms.items()}).to(
            device=self.args.device, dtype=student_dtype
        )
        self.student_output_flags = _output_flags(loss.student_outputs for _, loss in terms.values())
        self.teacher_output_flags = _output_flags(loss.teacher_outputs for _, loss in terms.values())
        self._window_counts: dict[str, torch.Tensor] | None = None
        self._train_terms: dict[str, torch.Tensor] = {}
        self._eval_terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._term_steps = 0  # optimizer steps whose terms _train_terms holds
        self.logit_rows = _logit_rows_use(args, student, teacher, [loss for _, loss in terms.values()])
        if args.teacher_cache is not None:
            self.teacher_cache = self._use_teacher_cache(cache, teacher)
            # From here on the cache stands in for the teacher, which leaves memory.
            self.teacher_model = teacher = teacher_model = None
            self.train_dataset = IndexedDataset(self.train_dataset)

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                "DistillationTrainer does not prepare a teacher under DeepSpeed yet; use DDP or FSDP (accelerate)"
            )
        teacher.requires_grad_(False)
        teacher.eval()
        dtype = teacher_dtype(self.args)
        if dtype is not None:
            teacher.to(dtype)  # half the teacher's memory; its outputs feed fp32 losses either way
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # ---- override points -------------------------------------------------------------------------

    def teacher_forward(
        self, inputs: Mapping[str, Any], output_hidden_states: bool = False, output_attentions: bool = False
    ) -> Any:
        """Run the teacher on a batch, without gradients. Override to feed the teacher other inputs.

        Receives the student's batch; the labels are removed so the teacher computes no loss of its own.
        Only the outputs the configured losses need are requested.
        """
        teacher_inputs = {key: value for key, value in inputs.items() if key != "labels"}
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
        cache): the terms that need them are left out. In training, a language model's `logits` may be the
        `[rows, vocab]` of its labeled positions (see `compact_token_logits`); an override that needs every
        position's logits sets `compact_token_logits=False`.
        """
        loss = torch.zeros((), device=self.args.device)
        terms = {}
        for term, loss_module in self.distillation_losses.items():
            if teacher_outputs is None and loss_module.needs_teacher:
                continue
            total = loss_module(student_outputs, teacher_outputs, inputs)
            terms[term] = total / self.normalizer(term, inputs).to(total.device)
            loss = loss + self.loss_weights[term] * terms[term]
        return loss, terms

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
        rows = self._projected_rows(inputs) if model.training else None
        # With rows, the losses compute the student's task loss from its rows: the model must not (from labels).
        student_inputs = inputs if rows is None else {key: value for key, value in inputs.items() if key != "labels"}
        with project_rows(self.accelerator.unwrap_model(model), rows):
            student_outputs = model(**student_inputs, **self.student_output_flags)
        teacher_outputs = None
        if self.teacher_cache is not None and examples is not None:
            teacher_outputs = self.teacher_cache.outputs_for(examples.tolist(), inputs, self.args.device)
        elif self.teacher_model is not None:
            teacher_outputs = self._teacher_outputs(inputs, rows)
        loss, terms = self.compute_distillation_loss(student_outputs, teacher_outputs, inputs)
        self._record_terms(terms, inputs, training=model.training)
        if model.training and self.accelerator.num_processes > 1:
            # Each process holds its share of a globally normalised loss; DDP averages, so undo the average.
            loss = loss * self.accelerator.num_processes
        if not return_outputs:
            return loss
        # Hidden states and maps were for the losses; leaving them in would make them "predictions".
        kept = {key: value for key, value in student_outputs.items() if key not in _INTERNAL_OUTPUTS}
        return loss, type(student_outputs)(**kept)

    def _teacher_outputs(self, inputs: Mapping[str, Any], rows: torch.Tensor | None) -> Any:
        """`teacher_forward` with the outputs the losses need; its logits only at `rows` where it can."""
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with project_rows(teacher, rows if self.logit_rows["teacher"] else None):
            return self.teacher_forward(inputs, **self.teacher_output_flags)

    def _projected_rows(self, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """The labeled positions whose logits the losses read, when only those are projected (`logit_rows`)."""
        labels = inputs.get("labels")
        if not self.logit_rows["student"] or labels is None:
            return None
        rows, _ = label_rows(labels, shift=self.logit_rows["shift"])
        return rows

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
        return loss

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

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._eval_terms = {}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for term, (total, count) in self._eval_terms.items():
            totals = self.accelerator.reduce(torch.stack([total, count]), reduction="sum")
            output.metrics[f"{metric_key_prefix}_{term}"] = (totals[0] / totals[1].clamp_min(1)).item()
        self._eval_terms = {}
        return output

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


def _logit_rows_use(
    args: DistillationConfig, student: nn.Module, teacher: Any, losses: list[DistillationLoss]
) -> dict[str, bool]:
    """Which models project only the labeled positions in training (see `compact_token_logits`)."""
    student_name = type(student).__name__
    use = (
        args.compact_token_logits
        and not args.torch_compile  # a hook per step and data-dependent shapes would defeat compilation
        and student_name in LANGUAGE_MODEL_CLASSES
        # Encoder-decoders (BART in the masked-LM mapping) build their decoder inputs from the labels.
        and not getattr(student.config, "is_encoder_decoder", False)
        and all(loss.accepts_row_logits for loss in losses)
        and supports_rows(student)
    )
    return {
        "student": use,
        "teacher": use and isinstance(teacher, nn.Module) and supports_rows(teacher),
        "shift": student_name in CAUSAL_LM_CLASSES,
    }


def _output_flags(needs: Any) -> dict[str, bool]:
    wanted = set().union(*needs)
    return {f"output_{name}": True for name in ("hidden_states", "attentions") if name in wanted}


def teacher_dtype(args: DistillationConfig) -> torch.dtype | None:
    """The dtype a frozen teacher's weights are cast to: the half-precision type the student trains in, on a
    GPU. On the CPU, and in full precision, the teacher keeps its own dtype."""
    if args.device.type != "cuda":
        return None
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return None


def _check_labels(terms: dict[str, tuple[float, DistillationLoss]], train_dataset: Any, collator: Any) -> None:
    """Refuse a hard_label loss on a dataset that has no labels, before any step runs (a masked-LM collator
    makes its own labels)."""
    if isinstance(collator, DataCollatorForLanguageModeling):
        return
    columns = getattr(train_dataset, "column_names", None)
    uses_labels = [term for term, (_, loss) in terms.items() if isinstance(loss, HardLabelLoss)]
    if uses_labels and isinstance(columns, list) and not set(columns) & set(_LABEL_COLUMNS):
        raise ValueError(
            f"losses {uses_labels} train on labels, but the training dataset has no label column (columns: "
            f"{columns}); add a 'label' column, or drop {uses_labels} to distil from the teacher alone"
        )

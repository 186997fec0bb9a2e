"""Where a `DistillationTrainer`'s teacher outputs come from: one object per teacher, each with `outputs(batch)`.

    trainer.teachers                   # {name: TeacherSource}, in the order the teachers were given
    trainer.teachers["teacher"].outputs(inputs, examples, training=True)

- [`FrozenTeacher`]: a model in memory, frozen and in eval mode, run on every batch (through the trainer's
  `teacher_forward`, so an override applies), projecting onto the vocabulary only where the losses read.
- [`CachedTeacher`]: a teacher-output cache ([`hf_distill.cache`]) standing in for a teacher that is not loaded;
  it serves the training examples it was built on, found by their index.
- [`TrainableTeacher`]: a model that learns alongside the student (online, mutual learning): run with gradients, in
  training mode while the student trains, in the optimizer with its own learning rate.
- [`EMATeacher`]: an exponential moving average of the student's own weights (mean teacher), updated after every
  optimizer step.

A run with one teacher calls it `"teacher"`; several teachers are given as a mapping `{name: model}`
([`hf_distill.losses.TeacherEnsemble`] is what a loss that mixes them receives).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .alignment import ALIGNMENT_KEY, Retokenizer
from .logit_rows import LogitRowsPlan, project_rows
from .positions import label_positions
from .vocabulary import cut_logits

#: The name of the teacher of a run that has only one.
DEFAULT_TEACHER = "teacher"
#: `teacher_model="ema"`: a teacher that is an exponential moving average of the student.
EMA_TEACHER = "ema"


class TeacherSource:
    """One teacher as the trainer reads it.

    Attributes:
        name (`str`): its name in `DistillationConfig.teacher_weights`, in a loss's `"teacher"` option and on the
            model card.
        reference: what the losses' `setup` and a cache's contents read of it: the model, or a `ConfigOnly`.
        facts (`dict`, *optional*): `card.model_facts` of the teacher as given (name, class, parameters, bytes).
        model (`nn.Module`, *optional*): the model in memory (as prepared by accelerate), None for a cache.
        serves_evaluation (`bool`): whether it has outputs for batches outside the training set.
    """

    name: str
    reference: Any
    facts: dict[str, Any] | None = None
    model: nn.Module | None = None
    serves_evaluation: bool = True
    #: Whether it learns with the student (in the optimizer, its outputs detached for the student's terms).
    trainable: bool = False

    def outputs(self, inputs: Mapping[str, Any], examples: torch.Tensor | None, training: bool) -> Any | None:
        """The teacher's outputs for this batch (`examples`: the training-set indices of its rows, when known);
        None when this source has none for it (a cache, in evaluation)."""
        raise NotImplementedError


class FrozenTeacher(TeacherSource):
    """A frozen model run on every batch.

    Args:
        name (`str`): the teacher's name.
        model (`nn.Module`): the model as prepared (wrapped by accelerate or DeepSpeed).
        unwrapped (`nn.Module`): the same model unwrapped: what the losses and the logit rows read.
        facts (`dict`, *optional*): its size as given, before any half-precision cast.
        call_flags (`dict`): keyword arguments every call gets (`use_cache=False` where it applies).
        output_flags (`dict`): the outputs the losses need (`output_hidden_states`, `output_attentions`).
        label_keys (`Sequence[str]`): batch keys the teacher must not see (it computes no loss of its own).
        forward (`Callable`, *optional*): how a batch is run (`forward(inputs, **output_flags)`); defaults to
            [`FrozenTeacher.run`]. The trainer passes its `teacher_forward`, so that overrides apply.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        unwrapped: nn.Module,
        facts: dict[str, Any] | None,
        call_flags: Mapping[str, Any],
        output_flags: Mapping[str, bool],
        label_keys: Sequence[str],
        forward: Callable[..., Any] | None = None,
    ):
        self.name, self.model, self.reference, self.facts = name, model, unwrapped, facts
        self.call_flags, self.output_flags, self.label_keys = dict(call_flags), dict(output_flags), tuple(label_keys)
        self.forward = forward or self.run
        self.rows_plan = LogitRowsPlan()
        #: The student's vocabulary size when this teacher's extends it: its logits are cut to it.
        self.columns: int | None = None
        #: For a teacher with another tokenizer: the student's batches re-tokenized for it and aligned.
        self.retokenizer: Retokenizer | None = None

    def run(
        self, inputs: Mapping[str, Any], output_hidden_states: bool = False, output_attentions: bool = False
    ) -> Any:
        """Run the model on a batch without gradients, its labels removed and only the requested outputs on."""
        teacher_inputs = {key: value for key, value in inputs.items() if key not in self.label_keys}
        teacher_inputs.update(self.call_flags)
        if output_hidden_states:
            teacher_inputs["output_hidden_states"] = True
        if output_attentions:
            teacher_inputs["output_attentions"] = True
        with torch.no_grad():
            return self.model(**teacher_inputs)

    def outputs(
        self,
        inputs: Mapping[str, Any],
        examples: torch.Tensor | None = None,
        training: bool = True,
        deferred: bool = True,
    ) -> Any:
        """The teacher's outputs for a batch; in training its logits at the counted rows only, or (`deferred`, as the
        plan says) those rows unprojected (`ProjectedRows`), which the losses, or a cache build, project chunk by
        chunk."""
        if self.retokenizer is not None:  # its own tokenization of the text, every position projected
            teacher_inputs, alignment = self.retokenizer(inputs)
            outputs = self.forward(teacher_inputs, **self.output_flags)
            outputs[ALIGNMENT_KEY] = alignment
            return outputs
        rows = training_rows(self.rows_plan, "teacher", inputs) if training else None
        defer = deferred and rows is not None and self.rows_plan.defers("teacher")
        with project_rows(self.reference, rows, defer) as projection:
            outputs = self.forward(inputs, **self.output_flags)
        return cut_logits(projection.wrap(outputs), self.columns)


class TrainableTeacher(FrozenTeacher):
    """A teacher that learns with the student: run with gradients and its labels (it computes its own task loss),
    in training mode while the student trains, projecting onto the vocabulary everywhere. The student's terms read
    its outputs detached; its own terms (`DistillationTrainer.terms.peers`) read the student's detached."""

    trainable = True

    def run(
        self, inputs: Mapping[str, Any], output_hidden_states: bool = False, output_attentions: bool = False
    ) -> Any:
        teacher_inputs = dict(inputs)
        teacher_inputs.update(self.call_flags)
        if output_hidden_states:
            teacher_inputs["output_hidden_states"] = True
        if output_attentions:
            teacher_inputs["output_attentions"] = True
        return self.model(**teacher_inputs)

    def outputs(self, inputs: Mapping[str, Any], examples: torch.Tensor | None = None, training: bool = True) -> Any:
        self.model.train(training)
        return self.forward(inputs, **self.output_flags)


class EMATeacher(FrozenTeacher):
    """A frozen copy of the student whose weights follow the student's as an exponential moving average,
    `θ_teacher ← m · θ_teacher + (1 − m) · θ_student` after every optimizer step (`update`), buffers copied."""

    def __init__(self, *args: Any, momentum: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.momentum = momentum

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One moving-average step toward `student`'s current weights."""
        own = dict(self.reference.named_parameters())
        pairs = [(own[name], parameter) for name, parameter in student.named_parameters()]
        averaged = [teacher for teacher, _ in pairs]
        torch._foreach_mul_(averaged, self.momentum)
        torch._foreach_add_(averaged, [p.detach().to(t.dtype) for t, p in pairs], alpha=1.0 - self.momentum)
        buffers = dict(self.reference.named_buffers())
        for name, buffer in student.named_buffers():
            buffers[name].copy_(buffer)


class CachedTeacher(TeacherSource):
    """A teacher-output cache in place of the teacher: the stored outputs of the training examples of a batch."""

    serves_evaluation = False

    def __init__(self, name: str, cache: Any, reference: Any, facts: dict[str, Any] | None, device: torch.device):
        self.name, self.cache, self.reference, self.facts, self.device = name, cache, reference, facts, device

    def outputs(self, inputs: Mapping[str, Any], examples: torch.Tensor | None, training: bool = True) -> Any | None:
        if examples is None:
            if training:  # never a step without the teacher's terms, silently
                raise ValueError(
                    "a training batch came without the examples' indices a teacher cache reads its outputs by: the "
                    "data collator must pass on hf_distill.cache.INDEX_KEY"
                )
            return None  # evaluation data is not in the cache: the teacher's terms are left out
        return self.cache.outputs_for(examples.tolist(), inputs, self.device)


def detached(outputs: Any) -> Any:
    """A model's outputs with every tensor (and tuple of tensors) detached: what one model's terms read of another
    that also learns."""
    if outputs is None:
        return None

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach()
        if isinstance(value, tuple):
            return tuple(cut(item) for item in value)
        return value

    return type(outputs)(**{key: cut(value) for key, value in outputs.items()})


def training_rows(plan: LogitRowsPlan, model: str, inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """The `[batch, length]` positions at which `model` ("student" or "teacher") projects onto the vocabulary in
    training (see [`hf_distill.logit_rows`]): the labeled ones, or none when no loss reads its logits. None: all."""
    if not plan.compacts(model):
        return None
    if not plan.reads(model):
        input_ids = inputs.get("input_ids")
        return None if input_ids is None else torch.zeros_like(input_ids, dtype=torch.bool)
    labels = inputs.get("labels")
    return None if labels is None else label_positions(labels, shift=plan.shift)


def normalized_weights(names: Sequence[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Each teacher's weight, summing to 1 (equal by default); errors name the fix."""
    if weights is None:
        return {name: 1.0 / len(names) for name in names}
    unknown = sorted(set(weights) - set(names))
    missing = [name for name in names if name not in weights]
    if unknown or missing:
        raise ValueError(
            f"teacher_weights names {sorted(weights)} but the teachers are {list(names)}"
            + (f" ({', '.join(map(repr, unknown))} unknown)" if unknown else "")
            + (f" ({', '.join(map(repr, missing))} missing)" if missing else "")
            + ": give one weight per teacher, or leave teacher_weights unset for equal weights"
        )
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"teacher_weights[{name!r}] must be a number >= 0, got {weight!r}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError("teacher_weights are all 0: give at least one teacher a positive weight")
    return {name: float(weights[name]) / total for name in names}


class MovingAverageCallback(TrainerCallback):
    """Moves each moving-average teacher toward the student after every optimizer step."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        student = self.trainer.accelerator.unwrap_model(self.trainer.model)
        for source in self.trainer.roster.moving_averages():
            source.update(student)

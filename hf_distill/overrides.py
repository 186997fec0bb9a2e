"""Which override points of `DistillationTrainer` a subclass replaced: found once, read wherever it matters
(`trainer.overrides`), so that what an override changes is stated here and nowhere else."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Overrides:
    """Which override points a subclass of `DistillationTrainer` replaced, found once when it is built.

    - `compute_distillation_loss`: the vocabulary projections stay in the models (an override receives logits as
      tensors), and `eval_loss` is the Trainer's mean of the per-batch losses instead of the weighted sum of the
      `eval_<term>` means.
    - `teacher_forward`: the teachers' projections stay in the models; with several teachers the override must take
      `teacher=`.
    """

    compute_distillation_loss: bool
    teacher_forward: bool

    @classmethod
    def of(cls, trainer_class: type, base: type) -> Overrides:
        """What `trainer_class` replaced of `base` (`DistillationTrainer`)."""
        return cls(
            compute_distillation_loss=trainer_class.compute_distillation_loss is not base.compute_distillation_loss,
            teacher_forward=trainer_class.teacher_forward is not base.teacher_forward,
        )

    def check_teacher_argument(self, trainer: Any, count: int) -> None:
        """With several teachers `teacher_forward` is called with `teacher=name`: an override must take it."""
        if count < 2 or not self.teacher_forward:
            return
        parameters = inspect.signature(trainer.teacher_forward).parameters
        if "teacher" not in parameters and not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            raise TypeError(
                f"{type(trainer).__name__}.teacher_forward takes no `teacher` argument, but this run has {count} "
                "teachers and says which one to run with teacher=name: add `teacher=None` to the override and pass "
                "it on to super().teacher_forward"
            )

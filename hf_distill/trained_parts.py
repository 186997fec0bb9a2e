"""What trains besides the student, held in one object: `trainer.extra_parts`.

The losses' projectors (`losses`) and each teacher that learns (`teacher:<name>`) live outside the student, so
the Trainer alone would neither zero, average, clip, optimise nor checkpoint them. This object does each of those
for all of them, and the trainer's hooks call it:

- gradients zeroed at each optimizer step, averaged over processes after each micro-step;
- clipping: the projectors with the student, as one model's would be; each learning teacher on its own;
- the optimizer: one group for the projectors, two per learning teacher (with and without weight decay, as the
  Trainer splits the student's) at `trainable_teacher_learning_rate`;
- checkpoints: `distillation_losses.safetensors` (projectors) and `teacher-<name>.safetensors` (teachers that
  learn or follow the student), written aside and renamed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as safetensors_load_model
from safetensors.torch import save_model as safetensors_save_model
from torch import nn

from .config import DistillationConfig
from .guards import check_finite_weights
from .objective import load_matching
from .saving import staged_folder
from .teacher_roster import TeacherRoster

logger = logging.getLogger(__name__)

#: File in each checkpoint holding the losses' learnable parts (projectors): training state, not the student.
LOSS_STATE_NAME = "distillation_losses.safetensors"
#: File in each checkpoint holding the weights of a teacher that learns or follows the student.
TEACHER_STATE_NAME = "teacher-{name}.safetensors"


class ExtraTrainedParts:
    """The projectors of `losses` and the learning teachers of `roster`, trained beside the student."""

    def __init__(self, losses: nn.Module, roster: TeacherRoster):
        self.losses, self.roster = losses, roster

    def modules(self) -> dict[str, nn.Module]:
        """Every part, by prefix: `losses`, then `teacher:<name>` for each teacher that learns."""
        parts: dict[str, nn.Module] = {"losses": self.losses}
        parts.update({f"teacher:{name}": teacher for name, teacher in self.roster.trainable().items()})
        return parts

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [
            (f"{prefix}.{name}", p) for prefix, part in self.modules().items() for name, p in part.named_parameters()
        ]

    def zero_grad(self) -> None:
        # The Trainer zeroes the student's gradients only (model.zero_grad()); these would pile up.
        for part in self.modules().values():
            part.zero_grad(set_to_none=True)

    def average_gradients(self) -> None:
        """Average the parts' gradients over processes (they live outside the DDP-wrapped student). Averaging at every
        micro-step is exact: the part already averaged is the same on every process."""
        for part in self.modules().values():
            for parameter in part.parameters():
                if parameter.grad is not None:
                    torch.distributed.all_reduce(parameter.grad, op=torch.distributed.ReduceOp.AVG)

    def clip(self, student: nn.Module, max_norm: float, clip: Callable, default: Callable) -> torch.Tensor:
        """Clip the student's and the projectors' gradients together and each learning teacher's on its own (`clip`
        is accelerate's `clip_grad_norm_`); `default()` is the Trainer's own clipping, for a student alone. Returns
        the student's norm, the one logged."""
        projectors = list(self.losses.parameters())
        teachers = list(self.roster.trainable().values())
        for teacher in teachers:
            clip(teacher.parameters(), max_norm)
        if not projectors:
            return default()
        return clip([*student.parameters(), *projectors], max_norm)

    def add_to_optimizer(
        self, optimizer: torch.optim.Optimizer, args: DistillationConfig, decay_names: Callable
    ) -> None:
        """Add the projectors' group (also to an optimizer passed in) and each learning teacher's two groups;
        `decay_names(module)` is the Trainer's rule for which parameters decay."""
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.losses.parameters() if p.requires_grad and id(p) not in known]
        if missing:
            optimizer.add_param_group({"params": missing, "weight_decay": args.weight_decay})
        learning_rate = args.trainable_teacher_learning_rate or args.learning_rate
        for teacher in self.roster.trainable().values():
            decay = set(decay_names(teacher))
            for decayed in (True, False):
                group = [p for n, p in teacher.named_parameters() if p.requires_grad and (n in decay) == decayed
                         and id(p) not in known]  # fmt: skip
                if group:
                    optimizer.add_param_group({"params": group, "lr": learning_rate,
                                               "weight_decay": args.weight_decay if decayed else 0.0})  # fmt: skip

    def save_teachers(self, folder: str, processor: Any = None) -> None:
        """Each teacher that learnt, as a model folder `<folder>/<name>` (with `processor`), written aside and moved
        into place; refused for weights that are not finite."""
        for name, teacher in self.roster.trainable().items():
            path = os.path.join(folder, name)
            check_finite_weights(teacher, path)
            with staged_folder(path) as staging:
                teacher.save_pretrained(staging)
                if processor is not None:
                    processor.save_pretrained(staging)

    def save(self, output_dir: str) -> None:
        state = self.losses.state_dict()
        if state:
            save_state(state, os.path.join(output_dir, LOSS_STATE_NAME))
        for name, module in self.roster.with_state().items():
            # save_model keeps one copy of tied weights (a language model's embeddings and output projection).
            path = os.path.join(output_dir, TEACHER_STATE_NAME.format(name=name))
            safetensors_save_model(module, path + ".tmp")
            os.replace(path + ".tmp", path)

    def load(self, checkpoint: str, device: torch.device, changed: bool = False) -> None:
        """Restore every part from `checkpoint`; with a `changed` objective (`hf_distill.objective`), what still fits
        and nothing else, the rest named in the log."""
        parts = [(self.losses, LOSS_STATE_NAME, "the losses' projectors")] if self.losses.state_dict() else []
        parts += [(module, TEACHER_STATE_NAME.format(name=name), f"the weights teacher {name!r} learnt")
                  for name, module in self.roster.with_state().items()]  # fmt: skip
        for module, file, what in parts:
            path = os.path.join(checkpoint, file)
            if not os.path.isfile(path) and changed:
                logger.warning("%s has no %s: %s start afresh", checkpoint, file, what)
            elif not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{checkpoint} has no {file}, so {what} cannot be restored; resume from a checkpoint written by "
                    "DistillationTrainer with the same losses and teachers"
                )
            elif changed:
                load_matching(module, load_file(path, device=str(device)), what)
            elif module is self.losses:
                module.load_state_dict(load_file(path, device=str(device)))
            else:  # save_model wrote tied weights once (a language model's embeddings and output projection)
                safetensors_load_model(module, path, device=str(device))


def save_state(state: dict[str, torch.Tensor], path: str) -> None:
    """Write a state dict as safetensors, then rename: an interrupted save never leaves a truncated file."""
    save_file({key: value.detach().contiguous().cpu() for key, value in state.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)

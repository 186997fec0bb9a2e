"""Writing to disk so that an interruption never leaves a half-written model that looks complete.

- `staged_folder(target)`: a context that yields a sibling folder to write into, then moves its files into `target`
  (the weights last) only once everything is written; a failed write (a full disk) raises an error that says what
  to do and leaves `target` as it was.
- `checkpoint_to_resume(resume_from_checkpoint, output_dir)`: for `resume_from_checkpoint=True`, the newest
  checkpoint a training run finished writing (`last_complete_checkpoint`), so that a crash in the middle of a save
  resumes from the one before; a named checkpoint that was cut short is refused.
- `load_saved_weights(model, folder)`: a checkpoint's weights into the student, renamed as `from_pretrained` renames
  them (what the Trainer's resume does not do).
- `whole_fsdp_weights(model)`: an FSDP-sharded model's whole weights, gathered onto the first process, for a plain
  saved model where the Trainer would write none (sharded state dicts).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import shutil
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

#: The Trainer writes this last into a checkpoint: a checkpoint without it was interrupted.
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = re.compile(r"^model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")
_STAGING = ".saving-"


@contextlib.contextmanager
def staged_folder(target: str, last: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a folder to write a model into; on success its files replace those of `target`: the weights last, then
    the files named in `last` (a record that says the folder is complete).

    A process killed while writing leaves `target` untouched (plus a `<target>.saving-<pid>` folder, removed by
    the next save); a process killed while the files move leaves every file whole, old or new.
    """
    target = os.path.abspath(target)
    for leftover in glob.glob(glob.escape(target) + _STAGING + "*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = f"{target}{_STAGING}{os.getpid()}"
    os.makedirs(staging)
    try:
        yield staging
        _publish(staging, target, last)
    except OSError as error:
        if is_disk_full(error):
            raise OSError(
                error.errno,
                f"no space left on the device while saving to {target} ({error}); nothing there was changed: free "
                "space or choose another output_dir, then save again",
            ) from error
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_disk_full(error: OSError) -> bool:
    """Whether a failed write ran out of space (or of quota)."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def _publish(staging: str, target: str, last: tuple[str, ...]) -> None:
    os.makedirs(target, exist_ok=True)
    for name in last:  # the old record goes first: until the new one lands, the folder claims nothing
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(target, name))
    names = sorted(os.listdir(staging), key=lambda name: 2 if name in last else int(bool(_WEIGHTS.match(name))))
    for name in names:
        destination = os.path.join(target, name)
        if os.path.isdir(destination) and not os.path.islink(destination):
            shutil.rmtree(destination)
        os.replace(os.path.join(staging, name), destination)
    stale = [name for name in os.listdir(target) if _WEIGHTS.match(name) and name not in names]
    for name in stale:  # weights of an earlier save laid out otherwise (one file vs shards)
        os.remove(os.path.join(target, name))


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-numbered `checkpoint-N` in `output_dir` whose trainer state was written (the Trainer's last
    file), skipping, with a warning, those a crash interrupted."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            return path
        logger.warning("Skipping %s: it has no %s, so its save was interrupted", path, TRAINER_STATE_NAME)
    return None


def checkpoint_to_resume(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | bool | None:
    """What `Trainer.train` should resume from: for True, the last complete checkpoint in `output_dir`; a folder
    given by name must be complete. Refused with an error that says what to pass instead."""
    if resume_from_checkpoint is True:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(f"no complete checkpoint in {output_dir} to resume from: train without resuming")
        return checkpoint
    if isinstance(resume_from_checkpoint, str) and not os.path.isfile(
        os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME)
    ):
        raise ValueError(
            f"{resume_from_checkpoint} has no {TRAINER_STATE_NAME}: its save was interrupted. Resume from an earlier "
            "checkpoint, or pass resume_from_checkpoint=True for the last complete one"
        )
    return resume_from_checkpoint


def load_saved_weights(model: nn.Module, folder: str) -> bool:
    """Load the weights `save_pretrained` wrote to `folder` into `model`, the way `from_pretrained` reads them.

    Transformers saves some models' weights under their checkpoint names rather than their module names (a ViT's
    `encoder.layer.0.attention.attention.query` for `layers.0.attention.q_proj`) and renames them back only in
    `from_pretrained`; the Trainer's own resume loads the file as it is, non-strictly, and leaves every renamed
    weight as it was (a warning in the log, a student that silently restarts from its initial layers). Returns
    False (nothing loaded) for what `from_pretrained` cannot read: a model that is not a `PreTrainedModel`, or a
    folder without safetensors weights.
    """
    if not isinstance(model, PreTrainedModel) or not any(_WEIGHTS.match(name) for name in os.listdir(folder)):
        return False
    dtype = next(model.parameters()).dtype
    restored = type(model).from_pretrained(folder, config=model.config, dtype=dtype, use_safetensors=True)
    model.load_state_dict(restored.state_dict(), strict=True)
    del restored
    return True


def whole_fsdp_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a model sharded by FSDP2, in CPU memory on the first process (an empty dict on the
    others). A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)

"""A training process for tests/test_faults.py, killed on purpose with a real SIGKILL at a chosen moment.

python fault_run.py OUTPUT MODE [KILL_AT]
  MODE train    : train 6 steps with checkpoints every 2, killed after step KILL_AT (0: never); final.safetensors
  MODE resume   : resume from the last complete checkpoint and finish; final.safetensors
  (train-learning, resume-learning: with a teacher that learns and one that is the student's moving average)
  MODE ckpt     : train, killed while checkpoint KILL_AT is half written (its model saved, nothing after)
  MODE cache    : build a teacher cache in OUTPUT/cache, killed at teacher batch KILL_AT (0: never)
  MODE save     : save the student to OUTPUT/student twice (second time trained), killed mid-write of the weights
  MODE pipeline : the pipeline's save_student, the same way
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from helpers import bert_classifier, bert_masked_lm, config, masked_lm_dataset, text_dataset
from safetensors.torch import save_file
from transformers import TrainerCallback

from hf_distill import DistillationTrainer

# A projector (widths 8 -> 16) makes the resumed state more than the student: it must come back too.
LOSSES = {
    "hard_label": {"weight": 0.5},
    "soft_target": {"weight": 0.5, "temperature": 2.0},
    "hidden_state": {"weight": 1.0, "layer_map": [[2, 4]]},
}


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            die()


class KilledWhileCheckpointing(DistillationTrainer):
    kill_at = 0

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if output_dir.endswith(f"checkpoint-{self.kill_at}"):
            die()  # the checkpoint's model is written; its optimizer, projectors and trainer state are not
        super()._save_optimizer_and_scheduler(output_dir)


def trainer(output: Path, trainer_class=DistillationTrainer, teacher: str = "frozen") -> DistillationTrainer:
    """The run; with `teacher` "learning", two teachers that change in training: "peer" learns with the student
    (mutual learning) and "ema" is the student's moving average."""
    teachers, losses, options = bert_classifier(0), LOSSES, {}
    if teacher == "learning":
        teachers = {"peer": bert_classifier(0), "ema": "ema"}
        losses = {**LOSSES, "hidden_state": {**LOSSES["hidden_state"], "teacher": "peer"}}
        options = {"trainable_teachers": ["peer"], "trainable_teacher_learning_rate": 5e-4, "ema_momentum": 0.5}
    arguments = config(output / "run", losses, max_steps=6, save_strategy="steps", save_steps=2, **options)
    return trainer_class(
        model=bert_classifier(1, layers=2, width=8, heads=2),
        teacher_model=teachers,
        args=arguments,
        train_dataset=text_dataset(),
    )


def final_state(trained: DistillationTrainer) -> dict[str, torch.Tensor]:
    """The student, the projectors and the teachers that changed in training, as one flat state."""
    state = {f"student.{k}": v.contiguous() for k, v in trained.model.state_dict().items()}
    state.update({f"losses.{k}": v.contiguous() for k, v in trained.distillation_losses.state_dict().items()})
    for name, teacher in trained.roster.with_state().items():
        state.update({f"teacher.{name}.{k}": v.clone().contiguous() for k, v in teacher.state_dict().items()})
    return state


def save_final(trained: DistillationTrainer, output: Path) -> None:
    save_file(final_state(trained), str(output / "final.safetensors"))


def kill_during_weights_write() -> None:
    """From now on, the first safetensors weights file is cut off half-way and the process killed."""
    import transformers.modeling_utils as modeling_utils

    original = modeling_utils.safe_save_file

    def half_then_die(tensors, filename, *args, **kwargs):
        original(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
        die()

    modeling_utils.safe_save_file = half_then_die


def main() -> None:
    output, mode = Path(sys.argv[1]), sys.argv[2]
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    output.mkdir(parents=True, exist_ok=True)
    mode, _, teacher = mode.partition("-")
    if mode in ("train", "resume"):
        run = trainer(output, teacher=teacher or "frozen")
        if kill_at:
            run.add_callback(KillAfterStep(kill_at))
        run.train(resume_from_checkpoint=True if mode == "resume" else None)
        save_final(run, output)
    elif mode == "ckpt":
        KilledWhileCheckpointing.kill_at = kill_at
        trainer(output, KilledWhileCheckpointing).train()
    elif mode == "cache":
        teacher = bert_masked_lm(0)
        if kill_at:
            calls = {"count": 0}

            def count(_module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                if ids is None or ids.shape[0] != 4:
                    return  # the one-example probes of the teacher's projection are not cache batches
                calls["count"] += 1
                if calls["count"] == kill_at:
                    die()

            teacher.register_forward_pre_hook(count, with_kwargs=True)
        args = config(output, {"soft_target": {"weight": 1.0}}, teacher_cache=str(output / "cache"),
                      teacher_cache_top_k=0, per_device_eval_batch_size=4)  # fmt: skip
        DistillationTrainer.teacher_cache_shard_size = 8
        DistillationTrainer(model=bert_masked_lm(1, layers=2), teacher_model=teacher, args=args,
                            train_dataset=masked_lm_dataset(24))  # fmt: skip
    elif mode in ("save", "pipeline"):
        run = trainer(output)
        folder = output / "student"
        first = dict(run.model.state_dict())
        save_file({k: v.contiguous() for k, v in first.items()}, str(output / "first.safetensors"))
        save = run.save_model if mode == "save" else pipeline_save(run)
        save(str(folder))
        with torch.no_grad():
            for parameter in run.model.parameters():
                parameter.add_(1.0)  # a different student, saved over the first
        kill_during_weights_write()
        save(str(folder))


def pipeline_save(run: DistillationTrainer):
    from huggingface_hub import ModelCard
    from pipeline_assets import write_tokenizer

    from hf_distill.pipeline import save_student

    processor = write_tokenizer(str(Path(run.args.output_dir) / "tokenizer"))
    return lambda folder: save_student(run.model, processor, folder, ModelCard("# student"))


if __name__ == "__main__":
    main()

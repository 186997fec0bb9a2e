"""Two-process CPU training run for test_multiprocess.py (launched with torchrun; gloo backend)."""

import sys
from pathlib import Path

from helpers import (
    PromptEcho,
    bert_masked_lm,
    causal_lm,
    config,
    end_launched_process,
    masked_lm_dataset,
    pad_right,
    prompt_completion_dataset,
)
from safetensors.torch import save_file

from hf_distill import DistillationTrainer

LOSSES = {"soft_target": {"weight": 1.0}, "hard_label": {"weight": 1.0}, "hidden_state": {"weight": 1.0}}
# Two teachers: the mixture of their distributions, and one hidden-state match (and projector) per teacher.
SEVERAL_LOSSES = {
    "soft_target": {"weight": 1.0},
    "hard_label": {"weight": 1.0},
    "hidden_a": {"type": "hidden_state", "weight": 1.0, "teacher": "a"},
    "hidden_b": {"type": "hidden_state", "weight": 1.0, "teacher": "b", "layer_map": [[2, 2]]},
}


#: On-policy: the student's completions (echoed deterministically, so both launches see the same), scored by GKD's
#: divergence and compared on hidden states.
ON_POLICY_LOSSES = {
    "soft_target": {"weight": 1.0, "divergence": "generalized_jsd", "beta": 0.5},
    "hard_label": {"weight": 1.0},
    "hidden_state": {"weight": 1.0, "layer_map": [[-1, -1]]},
}


def run_on_policy(output_dir: Path, batch_size: int):
    """Two steps of on-policy distillation of a tiny causal LM (lmbda 1): every completion-token count differs by
    process, so only a global normalisation matches one process with the combined batch."""
    trainer = DistillationTrainer(
        model=causal_lm(2, width=8),  # narrower than the teacher: hidden_state trains a projector
        teacher_model=causal_lm(1, layers=3),
        args=config(
            output_dir,
            ON_POLICY_LOSSES,
            max_steps=2,
            per_device_train_batch_size=batch_size,
            optim="sgd",
            max_grad_norm=0.0,
            lmbda=1.0,
        ),  # fmt: skip
        train_dataset=prompt_completion_dataset(16),
        data_collator=pad_right,
        rollout_backend=PromptEcho(),
    )
    trainer.train()
    return trainer


def run(output_dir: Path, batch_size: int, teacher_cache: str | None = None, several: bool = False,
        mutual: bool = False, train: bool = True, **overrides):  # fmt: skip
    """Two steps (none without `train`: the trainer is built, and its cache with it); with `teacher_cache`, from a
    cache that keeps every logit (so the same loss as online); with `several`, from two teachers; with `mutual`, the
    teacher learns too (deep mutual learning)."""
    teacher = bert_masked_lm(seed=1)
    if several:
        teacher = {"a": teacher, "b": bert_masked_lm(seed=3, layers=2, width=24, heads=4)}
    trainer = DistillationTrainer(
        model=bert_masked_lm(seed=2, layers=2, width=8, heads=2),
        teacher_model=teacher,
        # Plain SGD without clipping: Adam and clipping would hide a wrongly scaled loss or gradient.
        args=config(
            output_dir,
            SEVERAL_LOSSES if several else LOSSES,
            max_steps=2,
            per_device_train_batch_size=batch_size,
            optim="sgd",
            max_grad_norm=0.0,
            teacher_cache=teacher_cache,
            teacher_cache_top_k=0,
            trainable_teachers=["teacher"] if mutual else None,
            trainable_teacher_learning_rate=5e-4 if mutual else None,
            **overrides,
        ),  # fmt: skip
        train_dataset=masked_lm_dataset(16),
    )
    if train:
        trainer.train()
    return trainer


def build_cache(output_dir: Path, stop: bool = False) -> DistillationTrainer:
    """A cache of 16 examples in shards of 4, built by every process in batches of 2 (each process builds every
    other shard); `stop`: process 1 dies once its first shard is written. Prints the teacher forwards each ran."""
    import os

    from hf_distill.cache import store

    DistillationTrainer.teacher_cache_shard_size = 4
    forwards = []
    if stop and os.environ.get("RANK") == "1":
        flush = store.ShardWriter.flush

        def flush_then_die(writer):
            flush(writer)
            os._exit(3)

        store.ShardWriter.flush = flush_then_die
    original = DistillationTrainer.teacher_forward

    def counted(self, *args, **kwargs):
        forwards.append(1)
        return original(self, *args, **kwargs)

    DistillationTrainer.teacher_forward = counted
    trainer = run(output_dir, 2, teacher_cache=str(output_dir / "cache"), train=False, per_device_eval_batch_size=2)
    print(f"FORWARDS rank {os.environ.get('RANK', 0)}: {len(forwards)}", flush=True)
    return trainer


if __name__ == "__main__":
    output_dir = Path(sys.argv[1])
    mode = sys.argv[2] if sys.argv[2:] else "online"
    cache = str(output_dir / "cache") if mode == "cache" else None
    if mode in ("build_cache", "build_cache_stopped"):
        build_cache(output_dir, stop=mode == "build_cache_stopped")
        end_launched_process()
    if mode == "on_policy":
        trainer = run_on_policy(output_dir, batch_size=4)
    else:
        trainer = run(output_dir, 4, teacher_cache=cache, several=mode == "several", mutual=mode == "mutual")
    if trainer.args.process_index == 0:
        state = {f"student.{k}": v for k, v in trainer.model.state_dict().items()}
        state.update({f"losses.{k}": v for k, v in trainer.distillation_losses.state_dict().items()})
        for name, teacher in trainer.roster.with_state().items():
            state.update({f"teacher.{name}.{k}": v for k, v in teacher.state_dict().items()})
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(output_dir / "final.safetensors"))
    end_launched_process()

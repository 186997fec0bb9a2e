"""DeepSpeed training run for test_deepspeed.py, in its own process (DeepSpeed sets up torch.distributed).

    python deepspeed_run.py OUTPUT_DIR STAGE [refuse_projectors | refuse_cache | from_cache CACHE_DIR | on_policy]
    torchrun --nproc_per_node 2 deepspeed_run.py OUTPUT_DIR STAGE

ZeRO-`STAGE` on the CPU (gloo), in one process or under torchrun, 2 steps of 4 x 2 accumulated micro-batches (4
examples shared by the processes); writes the student's weights to OUTPUT_DIR/final.safetensors, or, with a
`refuse_*` mode, prints the error raised before training; `on_policy` trains a causal LM on its own completions,
generated to other lengths on each process (each prints what it generated).
"""

import os
import sys
from pathlib import Path

from helpers import (
    UnevenLengths,
    bert_masked_lm,
    causal_lm,
    config,
    end_launched_process,
    masked_lm_dataset,
    pad_right,
    prompt_completion_dataset,
)
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from hf_distill import DistillationTrainer

#: Same widths for student and teacher: no projector (see the refusal).
LOSSES = {
    "soft_target": {"weight": 1.0, "temperature": 2.0},
    "hard_label": {"weight": 0.5},
    "hidden_state": {"weight": 1.0, "layer_map": [[1, 2], [2, 4]]},
}


def trainer(
    output_dir: Path, losses: dict = LOSSES, deepspeed: dict | None = None, width: int = 16, **overrides
) -> DistillationTrainer:
    """Plain SGD, no clipping, no weight decay: the same update with and without DeepSpeed."""
    settings = dict(max_steps=2, optim="sgd", max_grad_norm=0.0, learning_rate=0.5, deepspeed=deepspeed)
    settings.update(overrides)
    return DistillationTrainer(
        model=bert_masked_lm(seed=2, layers=2, width=width),
        teacher_model=bert_masked_lm(seed=1),
        args=config(output_dir, losses, **settings),
        train_dataset=masked_lm_dataset(16),
    )


if __name__ == "__main__":
    # A one-process launch, as the deepspeed launcher would describe it.
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29541")
    output_dir, stage, mode = Path(sys.argv[1]), int(sys.argv[2]), (sys.argv[3:] or [None])[0]
    zero = {"stage": stage, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto"}
    if stage == 3:  # keep no gathered weight live between uses: each process holds only its shards outside forwards
        zero.update(stage3_max_live_parameters=0, stage3_max_reuse_distance=0, stage3_param_persistence_threshold=0)
    deepspeed = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
                 "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}  # fmt: skip
    try:
        if mode == "refuse_projectors":
            trainer(output_dir, {"hidden_state": {"weight": 1.0}}, deepspeed, width=8)  # 8 wide, teacher 16
        elif mode == "refuse_cache":
            trainer(output_dir, deepspeed=deepspeed, teacher_cache=str(output_dir / "cache"))
        elif mode == "on_policy":  # a causal LM on its own completions (lmbda 1), of other lengths per process
            DistillationTrainer(
                model=causal_lm(seed=2),
                teacher_model=causal_lm(seed=1, layers=4),
                args=config(
                    output_dir,
                    LOSSES,
                    max_steps=2,
                    per_device_train_batch_size=2,
                    lmbda=1.0,
                    optim="sgd",
                    max_grad_norm=0.0,
                    deepspeed=deepspeed,
                ),  # fmt: skip
                train_dataset=prompt_completion_dataset(16),
                data_collator=pad_right,
                rollout_backend=UnevenLengths(),
            ).train()
            end_launched_process()
    except ValueError as error:
        print(f"REFUSED: {error}")
        sys.exit(0)
    # 4 examples per micro-batch in all, shared by the processes (torchrun --nproc_per_node 2: 2 each).
    per_process = 4 // int(os.environ["WORLD_SIZE"])
    # from_cache: a finished cache (every logit kept) serves the run; the teacher is passed all the same.
    cache = {"teacher_cache": sys.argv[4], "teacher_cache_top_k": 0} if mode == "from_cache" else {}
    run = trainer(
        output_dir,
        deepspeed=deepspeed,
        per_device_train_batch_size=per_process,
        gradient_accumulation_steps=2,
        **cache,
    )
    run.train()
    if run.teacher_model is not None:
        teacher_weights = list(run.accelerator.unwrap_model(run.teacher_model).parameters())
        # Under ZeRO-3 each teacher weight is a DeepSpeed parameter whose local tensor, outside a forward, is empty
        # (the process's shard lives in ds_tensor).
        sharded = all(hasattr(p, "ds_id") and p.numel() == 0 for p in teacher_weights)
        if run.args.process_index == 0:  # one line: two processes printing at once can interleave theirs
            print("TEACHER", type(run.teacher_model).__name__, sharded)
    run.create_model_card()  # counts whole weights, not this process's shards; written by the first process
    if run.args.process_index == 0:
        print("CARD", ModelCard.load(str(output_dir / "README.md")).data.hf_distill["student_parameters"])
    student = run.accelerator.unwrap_model(run.model)
    if stage == 3:
        import deepspeed as ds

        with ds.zero.GatheredParameters(list(student.parameters())):  # a collective: every process takes part
            state = {key: value.clone().contiguous() for key, value in student.state_dict().items()}
    else:
        state = {key: value.clone().contiguous() for key, value in student.state_dict().items()}
    if run.args.process_index == 0:
        save_file(state, str(output_dir / "final.safetensors"))
    end_launched_process()

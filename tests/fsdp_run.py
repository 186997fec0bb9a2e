"""FSDP2 training run for test_fsdp.py, in its own process (the Trainer sets up torch.distributed).

    python fsdp_run.py OUTPUT_DIR [MODE]
    torchrun --nproc_per_node 2 fsdp_run.py OUTPUT_DIR [MODE]

FSDP2 (`fully_shard`) on the CPU (gloo), in one process or under torchrun: 2 steps of 4 x 2 accumulated
micro-batches (4 examples per micro-batch shared by the processes), a GPT-2 student and its teacher both sharded.
MODE: `train` (default; writes the student's full weights to OUTPUT_DIR/final.safetensors and prints what each
process holds of the teacher); `save` (AdamW, a checkpoint after each step, then `save_model` to OUTPUT_DIR/student)
and `resume` (from OUTPUT_DIR/checkpoint-1, the weights to OUTPUT_DIR/resumed.safetensors), each with `_sharded` for
sharded state dicts; `on_policy` (lmbda 1, completions of other lengths per process, `UnevenLengths`);
`refuse_projectors`, `refuse_cache` (print the error raised before training).
"""

import os
import sys
from pathlib import Path

from helpers import UnevenLengths, causal_lm, config, end_launched_process, pad_right, prompt_completion_dataset
from safetensors.torch import save_file

from hf_distill import DistillationTrainer
from hf_distill.saving import whole_fsdp_weights

LOSSES = {
    "soft_target": {"weight": 1.0, "temperature": 2.0},
    "hard_label": {"weight": 0.5},
    "hidden_state": {"weight": 1.0, "layer_map": [[1, 2], [2, 4]]},
}


def fsdp_on_cpus() -> None:
    """Let accelerate run FSDP on CPU processes (gloo) as it does on GPUs.

    accelerate turns an FSDP plugin on for multi-GPU (and other accelerator) runs only: on CPUs it trains with
    plain DDP instead. torch's `fully_shard` itself runs on CPUs over gloo, so this test run marks the state as FSDP
    after accelerate set it up, exactly as accelerate does for a GPU run; everything after is accelerate's FSDP2
    path (`fsdp2_prepare_model`, its state dicts and checkpoints) and hf_distill's."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    setup = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        setup(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            # accelerate writes the type back to the process state too; every later `AcceleratorState()` (an
            # optimizer's, for one) copies it from there.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


FSDP = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]}}


def trainer(
    output_dir: Path, losses: dict = LOSSES, fsdp: dict | None = None, width: int = 16, backend=None, **overrides
):
    """Plain SGD, no clipping, no weight decay: the same update with and without FSDP."""
    settings = dict(max_steps=2, optim="sgd", max_grad_norm=0.0, learning_rate=0.5, **(fsdp or {}))
    settings.update(overrides)
    return DistillationTrainer(
        model=causal_lm(seed=2, layers=2, width=width),
        teacher_model=causal_lm(seed=1, layers=4),
        args=config(output_dir, losses, **settings),
        train_dataset=prompt_completion_dataset(16),
        data_collator=pad_right,
        rollout_backend=backend,
    )


if __name__ == "__main__":
    fsdp_on_cpus()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29542")
    output_dir, mode = Path(sys.argv[1]), (sys.argv[2:] or ["train"])[0]
    try:
        if mode == "refuse_projectors":
            trainer(output_dir, {"hidden_state": {"weight": 1.0}}, FSDP, width=8)  # 8 wide, teacher 16
        elif mode == "on_policy":  # lmbda 1: every step on the student's own completions
            run = trainer(output_dir, fsdp=FSDP, backend=UnevenLengths(), per_device_train_batch_size=2, lmbda=1.0)
            run.train()
            end_launched_process()
        elif mode == "refuse_cache":
            trainer(output_dir, fsdp=FSDP, teacher_cache=str(output_dir / "cache"))
    except ValueError as error:
        print(f"REFUSED: {error}")
        end_launched_process()
    per_process = 4 // int(os.environ["WORLD_SIZE"])
    fsdp = FSDP
    if mode.endswith("_sharded"):  # checkpoints as sharded state dicts (torch.distributed.checkpoint)
        fsdp = {**FSDP, "fsdp_config": {**FSDP["fsdp_config"], "state_dict_type": "SHARDED_STATE_DICT"}}
    saving = {}
    if mode.startswith(("save", "resume")):  # AdamW: its state is in the checkpoint too
        saving = {"save_strategy": "steps", "save_steps": 1, "optim": "adamw_torch", "learning_rate": 0.01}
    run = trainer(output_dir, fsdp=fsdp, per_device_train_batch_size=per_process, gradient_accumulation_steps=2,
                  **saving)  # fmt: skip
    run.train(resume_from_checkpoint=str(output_dir / "checkpoint-1") if mode.startswith("resume") else None)
    if mode.startswith("save"):
        run.save_model(str(output_dir / "student"))
    teacher = run.teacher_model
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in teacher.parameters())
    whole = sum(p.numel() for p in teacher.parameters())
    print(f"TEACHER rank {run.args.process_index} holds {held} of {whole}", flush=True)
    state = {key: value.clone().contiguous() for key, value in whole_fsdp_weights(run.model).items()}  # a collective
    if run.args.process_index == 0:
        save_file(state, str(output_dir / f"{'resumed' if mode.startswith('resume') else 'final'}.safetensors"))
    end_launched_process()

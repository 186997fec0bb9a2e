"""Each multi-process strategy with a teacher in the loop: what a process holds, its peak memory and the step time,
for the GPT-2-small-shaped pair in 2 CPU processes; writes benchmarks/SCALE_OUT.md and benchmarks/scale_out.json.

    python benchmarks/scale_out.py           # 5 strategies, 2 rounds (~15 min on 2 CPU cores)
    python benchmarks/scale_out.py --quick   # tiny shapes, about a minute: a spot check, printed, not a result

Every strategy runs as `torchrun --nproc_per_node 2` (gloo, one thread per process, as torchrun sets), the rounds
interleaved (round 1 runs every strategy once, then round 2). The pair is benchmarks/run.py's: a GPT-2-small-shaped
teacher (12 x 768, 50,257 tokens, 124M weights) and its 6-layer student (82M), random weights, `soft_target` (JSD)
+ `hard_label` on every token, AdamW, 2 sequences of 128 tokens per process and step, 1 warm-up step then 3
measured. Per process: the weights it holds of each model (its shards; a tied embedding counted once), its resident
memory once training is set up, and its peak resident memory over the measured steps (`VmHWM`, reset after the
warm-up step, so the moment each model is split is not in it: a run that loads its models already split never has
that moment), both above what the process held after its imports; the median measured step. glibc's allocator is
set to return every freed block of 64 KiB or more to the system at once (`MALLOC_MMAP_THRESHOLD_=65536`), so that
resident memory follows the tensors alive rather than what the allocator kept.

accelerate enables FSDP for GPU runs only (on CPUs it trains with DDP); the FSDP run marks its CPU state as FSDP the
way accelerate does for GPUs, with the shim of the tests (`tests/fsdp_run.py`), then runs accelerate's FSDP2 path.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ZERO_BOUNDED = {
    "stage3_max_live_parameters": 0,
    "stage3_max_reuse_distance": 0,
    "stage3_param_persistence_threshold": 0,
}
#: name: (how the student's weights are split, how the teacher's are, the trainer arguments)
STRATEGIES = {
    "DDP": ("replicated", "replicated", {}),
    "ZeRO-2": ("optimizer state and gradients split", "replicated", {"zero": {"stage": 2}}),
    "ZeRO-3, DeepSpeed's default bounds": ("split", "split", {"zero": {"stage": 3}}),
    "ZeRO-3, no gathered weight kept": ("split", "split", {"zero": {"stage": 3, **ZERO_BOUNDED}}),
    "FSDP2": ("split", "split", {"fsdp": True}),
}


def deepspeed_config(zero: dict) -> dict:
    zero = {"reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto", **zero}
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto"}  # fmt: skip


def resident(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def held_weights(model) -> int:
    """The weights this process holds of `model`: its FSDP shards (DTensor), its ZeRO-3 partitions, or all."""
    total, seen = 0, set()
    for parameter in model.parameters():  # parameters() yields a tied weight once
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if hasattr(parameter, "ds_tensor"):
            total += parameter.ds_tensor.numel()
        elif hasattr(parameter, "to_local"):
            total += parameter.to_local().numel()
        else:
            total += parameter.numel()
    return total


def worker(name: str, quick: bool) -> None:
    """One process of one strategy's run; the first prints every process's figures as one JSON line."""
    base = resident()
    import torch
    from transformers import TrainerCallback

    sys.path.insert(0, HERE)
    import run  # the pair and the losses of benchmarks/run.py

    from hf_distill import DistillationConfig, DistillationTrainer

    _, _, arguments = STRATEGIES[name]
    if "fsdp" in arguments:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from fsdp_run import fsdp_on_cpus

        fsdp_on_cpus()
    if "zero" in arguments:
        import deepspeed  # noqa: F401  (its import counted in the base, as the others' are)
    base = max(base, resident())  # after the imports
    processes = int(os.environ["WORLD_SIZE"])
    shape = {"batch": 2 * processes, "length": 16 if quick else 128, "steps": 3, "warmup": 1}
    teacher, student, data, losses = run.causal_pair(shape, quick)
    strategy = {}
    if "zero" in arguments:
        strategy["deepspeed"] = deepspeed_config(arguments["zero"])
    if "fsdp" in arguments:
        strategy = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]}}

    class Meter(TrainerCallback):
        def __init__(self):
            self.times, self.start, self.set_up, self.peak = [], 0.0, 0, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.set_up = resident()

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)
            if state.global_step == shape["warmup"]:
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # what was freed goes back to the system
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")  # the peak from here on

    meter = Meter()
    with tempfile.TemporaryDirectory() as scratch:
        args = DistillationConfig(
            output_dir=scratch, per_device_train_batch_size=2, max_steps=shape["steps"] + shape["warmup"],
            learning_rate=1e-5, save_strategy="no", report_to="none", disable_tqdm=True, logging_strategy="no",
            losses=losses, dataloader_num_workers=0, use_cpu=True, seed=0, **strategy,
        )  # fmt: skip
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                      callbacks=[meter])  # fmt: skip
        del student, teacher
        trainer.train()
        peak = resident("VmHWM")
        figures = {
            "student_weights": held_weights(trainer.model),
            "teacher_weights": held_weights(trainer.teacher_model),
            "set_up_bytes": meter.set_up - base,
            "peak_bytes": peak - base,
            "step_seconds": statistics.median(meter.times[shape["warmup"] :]),
        }
    every = [None] * processes
    torch.distributed.all_gather_object(every, figures)
    if trainer.args.process_index == 0:
        print("FIGURES " + json.dumps(every), flush=True)
    torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0)  # past gloo's teardown (docs/distributed.md)


def launch(name: str, quick: bool, port: int) -> list[dict]:
    command = ["torchrun", "--nproc_per_node", "2", "--master_port", str(port), os.path.abspath(__file__),
               "--worker", name] + (["--quick"] if quick else [])  # fmt: skip
    # glibc's allocator returns a freed block of 64 KiB or more to the system at once: resident memory then follows
    # the tensors alive (its default would keep the memory of the whole models each process builds before they are
    # split, and every process's peak would be about the same).
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=environment)
    lines = [line for line in result.stdout.splitlines() if line.startswith("FIGURES ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("FIGURES ") :])


def processor_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the architecture where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def write(results: dict, machine: dict) -> None:
    with open(os.path.join(HERE, "scale_out.json"), "w", encoding="utf-8") as handle:
        json.dump({"machine": machine, "results": results}, handle, indent=2)
    lines = [
        "# Multi-process strategies with a teacher in the loop: measured",
        "",
        f"`python benchmarks/scale_out.py`, {machine['date']}, {machine['minutes']:.0f} min in all: "
        f"{machine['processor']}, {machine['cores']} cores, torch {machine['torch']}, transformers "
        f"{machine['transformers']}, accelerate {machine['accelerate']}, deepspeed {machine['deepspeed']}. "
        "2 processes (gloo, one thread each); the setup is in the script's docstring. Memory per process, in MiB "
        "above what the process held after its imports; each cell is round 1 / round 2 (the two processes agree "
        "to within the figure shown unless a range is given); step time is the median of the 3 measured steps.",
        "",
        "| strategy | student | teacher | student weights held | teacher weights held | resident after set-up "
        "(MiB) | peak over the steps (MiB) | step (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rounds in results.items():
        student, teacher, _ = STRATEGIES[name]

        def cell(key, show, rounds=rounds):
            per_round = []
            for processes in rounds:
                values = sorted(process[key] for process in processes)
                text = (
                    show(values[0]) if show(values[0]) == show(values[-1]) else f"{show(values[0])}–{show(values[-1])}"
                )
                per_round.append(text)
            return " / ".join(per_round)

        lines.append(
            f"| {name} | {student} | {teacher} | {cell('student_weights', lambda v: f'{v / 1e6:.1f}M')} | "
            f"{cell('teacher_weights', lambda v: f'{v / 1e6:.1f}M')} | {cell('set_up_bytes', mib)} | "
            f"{cell('peak_bytes', mib)} | {cell('step_seconds', lambda v: f'{v:.2f}')} |"
        )
    with open(os.path.join(HERE, "SCALE_OUT.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a spot check, printed, not a result")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=list(STRATEGIES), help="these strategies alone: printed only")
    parser.add_argument("--worker", choices=list(STRATEGIES), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        return worker(options.worker, options.quick)
    import accelerate
    import deepspeed
    import torch
    import transformers

    started, port = time.time(), 29700
    names = options.only or list(STRATEGIES)
    results = {name: [] for name in names}
    for round_ in range(options.rounds):
        for name in names:
            port += 1
            results[name].append(launch(name, options.quick, port))
            print(f"round {round_ + 1} {name}: {json.dumps(results[name][-1])}", flush=True)
    machine = {
        "date": time.strftime("%Y-%m-%d"), "minutes": (time.time() - started) / 60, "processor": processor_name(),
        "cores": os.cpu_count(), "torch": torch.__version__, "transformers":
        transformers.__version__, "accelerate": accelerate.__version__, "deepspeed": deepspeed.__version__,
        "quick": options.quick,
    }  # fmt: skip
    if options.quick or options.only:
        print(json.dumps({"machine": machine, "results": results}))
        return
    write(results, machine)


if __name__ == "__main__":
    main()

"""Where the ViT -> MobileNetV2 online step spends more than its parts; printed as one JSON line.

    python benchmarks/vision_overhead.py           # run.py's full vision shape, ~6 min on 2 CPU cores
    python benchmarks/vision_overhead.py --quick   # tiny shapes, seconds

In rounds, it times the parts `run.py` divides the online step by (a plain `transformers.Trainer` step of the
student, and the teacher's forward alone) and the online `DistillationTrainer` step, and reads for each the
process's minor page faults and system CPU time per step (`getrusage`): the kernel's share of a step, which on a
CPU is mostly first touches of memory that the C allocator mapped afresh for a large tensor and unmapped when it
was freed. Then the same again in a child process whose glibc keeps freed memory for reuse
(`MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` raised, which only changes where the allocator takes
memory from), and once more with the student in its contiguous layout (`channels_last=False`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

from hf_distill import DistillationTrainer  # noqa: E402

KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


class CostClock(run.StepClock):
    """Wall time, minor page faults and system CPU seconds of every optimizer step."""

    def __init__(self):
        super().__init__()
        self.faults, self.system = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._usage = (usage.ru_minflt, usage.ru_stime)
        super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.faults.append(usage.ru_minflt - self._usage[0])
        self.system.append(usage.ru_stime - self._usage[1])


def measure(quick: bool, rounds: int) -> dict:
    shape = run.SHAPES["quick" if quick else "full"]
    teacher, student, data, losses = run.vision_pair(shape, quick)
    initial = {key: value.clone() for key, value in student.state_dict().items()}
    samples = {kind: {"s": [], "faults": [], "system_s": []} for kind in ("plain", "teacher", "online", "contiguous")}
    warmup = shape["warmup"]
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(rounds):
            for kind in ("plain", "online", "contiguous"):
                student.to(memory_format=torch.contiguous_format)
                student.load_state_dict(initial)
                clock = CostClock()
                config = run.benchmark_config(scratch, losses, shape, channels_last=kind != "contiguous")
                if kind == "plain":
                    trainer = run.Trainer(model=student, args=config, train_dataset=data, callbacks=[clock])
                else:
                    trainer = DistillationTrainer(
                        model=student, teacher_model=teacher, args=config, train_dataset=data, callbacks=[clock]
                    )
                trainer.train()
                samples[kind]["s"] += clock.times[warmup:]
                samples[kind]["faults"] += clock.faults[warmup:]
                samples[kind]["system_s"] += clock.system[warmup:]
            teacher.eval()
            for step in range(shape["steps"] + warmup):
                rows = data[step * shape["batch"] : (step + 1) * shape["batch"]]
                before = resource.getrusage(resource.RUSAGE_SELF)
                start = time.perf_counter()
                with torch.no_grad():
                    teacher(pixel_values=rows["pixel_values"])
                elapsed = time.perf_counter() - start
                after = resource.getrusage(resource.RUSAGE_SELF)
                if step >= warmup:
                    samples["teacher"]["s"].append(elapsed)
                    samples["teacher"]["faults"].append(after.ru_minflt - before.ru_minflt)
                    samples["teacher"]["system_s"].append(after.ru_stime - before.ru_stime)
    medians = {kind: {key: statistics.median(values) for key, values in kind_samples.items()}
               for kind, kind_samples in samples.items()}  # fmt: skip
    parts = medians["plain"]["s"] + medians["teacher"]["s"]
    medians["online_over_parts"] = medians["online"]["s"] / parts
    medians["contiguous_online_over_parts"] = medians["contiguous"]["s"] / parts
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds (not a result)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    rounds = 1 if options.quick else options.rounds
    if options.child:
        print(json.dumps(measure(options.quick, rounds)))
        return
    results = {"default allocator": measure(options.quick, rounds)}
    command = [sys.executable, os.path.abspath(__file__), "--child", "--rounds", str(rounds)]
    command += ["--quick"] if options.quick else []
    child = subprocess.run(
        command, env={**os.environ, **KEEP_FREED_MEMORY}, capture_output=True, text=True, check=True
    )
    results["freed memory kept (glibc)"] = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps(results))


if __name__ == "__main__":
    main()

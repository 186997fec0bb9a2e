"""Where a causal-LM training step's time goes: the plain step, the hard-label step and the online KD step of
`run.py`'s GPT-2-small-shaped pair, each profiled over its timed steps with `torch.profiler`, the operators' own
time grouped into matrix products, the vocabulary-wide elementwise work of the losses, and the rest.

    python benchmarks/step_profile.py            # the full shapes (batch 8 x 128, 50,257 tokens; ~3 min on 2 CPU cores)
    python benchmarks/step_profile.py --quick    # small shapes, seconds: a spot check

Prints a Markdown table (seconds per step by group, and the top operators of each step) and nothing else is written.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

from torch.profiler import ProfilerActivity, profile
from transformers import Trainer, TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

from hf_distill import DistillationTrainer  # noqa: E402

MATMUL = {
    "aten::mm",
    "aten::addmm",
    "aten::addmm_",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
}
# The losses' passes over [rows, vocab]: transcendental and elementwise operators, reductions, copies and fills.
ELEMENTWISE = {
    "aten::exp", "aten::exp_", "aten::log", "aten::log_", "aten::_log_softmax", "aten::_log_softmax_backward_data",
    "aten::_softmax", "aten::logaddexp", "aten::lerp", "aten::sub", "aten::sub_", "aten::mul", "aten::mul_",
    "aten::add", "aten::add_", "aten::addcmul_", "aten::clamp_min_", "aten::sum", "aten::copy_", "aten::fill_",
    "aten::scatter_add_", "aten::gather", "aten::nll_loss_forward", "aten::nll_loss_backward", "aten::div_",
    "aten::div", "aten::neg", "aten::clone", "aten::zero_", "aten::logsumexp",
}  # fmt: skip


class Profiled(TrainerCallback):
    """Profiles the steps after `warmup` of `Trainer.train()`."""

    def __init__(self, warmup: int):
        self.warmup, self.profiler, self.steps = warmup, None, 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup and self.profiler is None:
            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.steps += 1

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)


def groups(profiler, steps: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    totals = collections.Counter()
    by_op = collections.Counter()
    for event in profiler.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / steps
        by_op[event.key] += seconds
        group = "matrix products" if event.key in MATMUL else "elementwise" if event.key in ELEMENTWISE else "rest"
        totals[group] += seconds
    return dict(totals), by_op.most_common(8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    shape = run.pair_shape("gpt2 -> 6 layers", run.SHAPES["quick" if options.quick else "full"], options.quick)
    shape = {**shape, "steps": 2, "warmup": 1}
    teacher, student, data, losses = run.causal_pair(shape, options.quick)
    initial = {key: value.clone() for key, value in student.state_dict().items()}
    kinds = {"plain": (None, None), "hard_label": (None, run.PLAIN_LOSSES), "online": (teacher, losses)}
    lines = [
        "| step | matrix products (s) | elementwise (s) | rest (s) | top operators (s per step) |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        for kind, (kind_teacher, kind_losses) in kinds.items():
            student.load_state_dict(initial)
            callback = Profiled(shape["warmup"])
            config = run.benchmark_config(scratch, kind_losses or run.PLAIN_LOSSES, shape)
            if kind_losses is None:
                trainer = Trainer(model=student, args=config, train_dataset=data, callbacks=[callback])
            else:
                trainer = DistillationTrainer(model=student, teacher_model=kind_teacher, args=config,
                                              train_dataset=data, callbacks=[callback])  # fmt: skip
            trainer.train()
            totals, top = groups(callback.profiler, callback.steps)
            names = ", ".join(f"{name.removeprefix('aten::')} {seconds:.2f}" for name, seconds in top)
            lines.append(
                f"| {kind} | {totals.get('matrix products', 0):.2f} | {totals.get('elementwise', 0):.2f} | "
                f"{totals.get('rest', 0):.2f} | {names} |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

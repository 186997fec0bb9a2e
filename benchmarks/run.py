"""What distillation costs over plain training, measured in one run; writes benchmarks/RESULTS.md.

    python benchmarks/run.py            # BERT-base-shaped -> 6 layers, ViT -> MobileNetV2, GPT-2-small-shaped ->
                                        # 6 layers (~40 min on 2 CPU cores)
    python benchmarks/run.py --quick    # smaller shapes, under a minute: a spot check, printed, not a result
    python benchmarks/run.py --pairs gpt2   # one pair (bert, vit, gpt2) alone: printed, not written

Step times are medians over repeated training steps after warm-up, each taken by `Trainer.train()` itself (a
callback reads the clock around every optimizer step), with each ratio's spread over the rounds beside it. Peak memory is measured in a fresh (forked) process per case:
the CUDA allocator's peak on a GPU, the process's peak resident memory (`VmHWM`, reset just before the
measured work) on a CPU, in both cases above what the process held when the measured work began. Weights
are random: timings and memory do not depend on them. The last line printed is a JSON object of the ratios:
the five of the issue against a plain `transformers.Trainer` step, then three like-for-like ones against
`DistillationTrainer` with `hard_label` alone (the worst pair of each). hf_distill trains a convolutional student
in channels-last (`DistillationConfig.channels_last`), which the plain `Trainer` does not: for the vision pair its
steps can be faster than the plain step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    Trainer,
    TrainerCallback,
    ViTConfig,
    ViTForImageClassification,
)

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.losses import chunked_soft_target_loss
from hf_distill.losses.functional import soft_target_loss
from hf_distill.pipeline import build_student

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 30522
# fmt: off
SHAPES = {
    # batch, sequence length or image side, timed steps and warm-up steps per training run, rounds of (plain,
    # hard-label, online, cached) runs: at least `rounds`, more (up to `max_rounds`) until the rounds of a pair
    # have taken `round_seconds`, so that a pair of short steps gets as many seconds of samples as a long one;
    # token-KL positions
    "full": {"batch": 8, "length": 128, "image": 224, "steps": 8, "warmup": 2, "rounds": 2, "max_rounds": 8,
             "round_seconds": 200, "kl_tokens": 16384},
    "quick": {"batch": 4, "length": 32, "image": 64, "steps": 3, "warmup": 1, "rounds": 1, "max_rounds": 1,
              "round_seconds": 0, "kl_tokens": 2048},
}
# fmt: on
TEXT_LOSSES = {
    "soft_target": {"weight": 5.0, "temperature": 2.0},
    "hard_label": {"weight": 2.0},
    "hidden_state": {"weight": 1.0, "distance": "cosine", "layer_map": [[-1, -1]]},
}
VISION_LOSSES = {"hard_label": {"weight": 0.5}, "soft_target": {"weight": 0.5, "temperature": 5.0}}
# Token-level soft targets of a causal LM with the generalized JSD (beta = 0.5) at T = 1, and the labels.
CAUSAL_LOSSES = {
    "soft_target": {"weight": 1.0, "temperature": 1.0, "divergence": "jsd"},
    "hard_label": {"weight": 1.0},
}
# The student on its labels alone through DistillationTrainer: like for like with the KD steps (for masked LM,
# the vocabulary projection runs at the labeled positions only, as in the KD steps).
PLAIN_LOSSES = {"hard_label": {"weight": 1.0}}


# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s from the vendor's data sheets, by device name; the most
# specific name first. Other devices: pass --peak_tflops.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- the two pairs ------------------------------------------------------------------------------------


def text_pair(shape: dict, quick: bool):
    """A BERT-base-shaped masked-LM teacher (12 x 768, 30,522 tokens) and a 6-layer student built from it."""
    torch.manual_seed(0)
    layers, width = (4, 256) if quick else (12, 768)
    config = BertConfig(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=layers,
                        num_attention_heads=width // 64, intermediate_size=4 * width)  # fmt: skip
    teacher = BertForMaskedLM(config)
    student, _ = build_student(teacher)
    generator = torch.Generator().manual_seed(0)
    count = shape["batch"] * (shape["steps"] + shape["warmup"])
    input_ids = torch.randint(1000, VOCAB, (count, shape["length"]), generator=generator)
    chosen = torch.rand(input_ids.shape, generator=generator) < 0.15
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    masked = torch.where(chosen, torch.full_like(input_ids, 103), input_ids)
    data = Dataset.from_dict(
        {"input_ids": masked.tolist(), "attention_mask": torch.ones_like(masked).tolist(), "labels": labels.tolist()}
    ).with_format("torch")
    return teacher, student, data, TEXT_LOSSES


def vision_pair(shape: dict, quick: bool):
    """A ViT-base-shaped teacher (12 x 768, patch 16) and a fresh MobileNetV2 (1.4 width), as the vision guide."""
    torch.manual_seed(0)
    layers = 4 if quick else 12
    teacher = ViTForImageClassification(
        ViTConfig(
            image_size=shape["image"],
            patch_size=16,
            hidden_size=768,
            num_hidden_layers=layers,
            num_attention_heads=12,
            intermediate_size=3072,
            num_labels=3,
        )  # fmt: skip
    )
    student = MobileNetV2ForImageClassification(
        MobileNetV2Config(image_size=shape["image"], depth_multiplier=1.4, num_labels=3)
    )
    generator = torch.Generator().manual_seed(0)
    count = shape["batch"] * (shape["steps"] + shape["warmup"])
    pixels = torch.randn(count, 3, shape["image"], shape["image"], generator=generator)
    labels = torch.randint(0, 3, (count,), generator=generator)
    data = Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.tolist()}).with_format("torch")
    return teacher, student, data, VISION_LOSSES


GPT2_VOCAB = 50257


def causal_pair(shape: dict, quick: bool):
    """A GPT-2-small-shaped causal-LM teacher (12 x 768, 50,257 tokens, 124M parameters) and a 6-layer student
    built from it, on fixed random token sequences (every next token a label); no dropout, so that two trainers
    given the same start do the same arithmetic."""
    torch.manual_seed(0)
    layers, width, vocab = (2, 128, 1000) if quick else (12, 768, GPT2_VOCAB)
    config = GPT2Config(vocab_size=vocab, n_positions=max(1024, shape["length"]), n_embd=width, n_layer=layers,
                        n_head=width // 64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    teacher = GPT2LMHeadModel(config)
    student, _ = build_student(teacher)
    generator = torch.Generator().manual_seed(0)
    count = shape["batch"] * (shape["steps"] + shape["warmup"])
    input_ids = torch.randint(0, vocab, (count, shape["length"]), generator=generator)
    data = Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": torch.ones_like(input_ids).tolist(),
         "labels": input_ids.tolist()}
    ).with_format("torch")  # fmt: skip
    return teacher, student, data, CAUSAL_LOSSES


PAIRS = {"bert-base -> 6 layers": text_pair, "vit -> mobilenet_v2": vision_pair, "gpt2 -> 6 layers": causal_pair}
# Pairs whose steps take long on a CPU time fewer of them per round (the other shape settings stay).
PAIR_SHAPES = {"gpt2 -> 6 layers": {"full": {"steps": 4, "warmup": 1, "max_rounds": 3}}}


def pair_shape(name: str, shape: dict, quick: bool) -> dict:
    """`shape` with the overrides of pair `name` (`PAIR_SHAPES`)."""
    return {**shape, **PAIR_SHAPES.get(name, {}).get("quick" if quick else "full", {})}


# ---- timing -------------------------------------------------------------------------------------------


class StepClock(TrainerCallback):
    """Reads the clock around every optimizer step of `Trainer.train()`."""

    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.times.append(time.perf_counter() - self.start)


def benchmark_config(scratch, losses, shape, **overrides) -> DistillationConfig:
    return DistillationConfig(
        output_dir=scratch, per_device_train_batch_size=shape["batch"], per_device_eval_batch_size=shape["batch"],
        max_steps=shape["steps"] + shape["warmup"], learning_rate=1e-5, save_strategy="no", report_to="none",
        disable_tqdm=True, logging_strategy="no", losses=losses, bf16=torch.cuda.is_available(),
        dataloader_num_workers=0, **overrides,
    )  # fmt: skip


def train_steps(student, teacher, data, losses, shape, scratch, **overrides) -> list[float]:
    """Step times of `Trainer.train()`: a `DistillationTrainer` with `losses`, or with `losses=None` the plain
    `transformers.Trainer` training the student on its labels, as one would without hf_distill."""
    clock = StepClock()
    config = benchmark_config(scratch, losses or PLAIN_LOSSES, shape, **overrides)
    if losses is None:
        Trainer(model=student, args=config, train_dataset=data, callbacks=[clock]).train()
    else:
        DistillationTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=data, callbacks=[clock]
        ).train()
    return clock.times[shape["warmup"] :]


def step_flops(student, teacher, data, losses, shape, scratch, **overrides) -> int:
    """FLOPs of one training step as torch's `FlopCounterMode` counts them: matrix products, convolutions and
    attention, forward and backward, which is where nearly all the arithmetic is. The step trains the student,
    which `time_pair` restores before timing."""
    config = benchmark_config(scratch, losses or PLAIN_LOSSES, shape, **overrides)
    config.max_steps = 1
    if losses is None:
        trainer = Trainer(model=student, args=config, train_dataset=data)
    else:
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data)
    with FlopCounterMode(display=False) as counter:
        trainer.train()  # one step; the optimizer's elementwise updates are not counted
    return counter.get_total_flops()


def peak_tflops(override: float | None) -> float | None:
    """The GPU's dense bf16 peak (TFLOP/s), or None on a CPU or an unknown device without --peak_tflops."""
    if override is not None or not torch.cuda.is_available():
        return override
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def cache_build(student, teacher, data, losses, shape, scratch, attempts: int = 3) -> dict[str, float]:
    """Seconds to build the teacher cache (hashing the teacher, running it, storing what the losses need, checking
    the first batch) and seconds of one plain teacher inference pass over the same batches, alternated
    `attempts` times; the best of each is kept. Returns the folder of the first cache too."""
    times = {"build": [], "inference": []}
    for attempt in range(attempts):
        start = time.perf_counter()
        plain = DistillationTrainer(
            model=student, teacher_model=teacher, args=benchmark_config(scratch, losses, shape), train_dataset=data
        )
        setup = time.perf_counter() - start
        start = time.perf_counter()
        DistillationTrainer(
            model=student, teacher_model=teacher, train_dataset=data,
            args=benchmark_config(scratch, losses, shape, teacher_cache=os.path.join(scratch, f"cache-{attempt}")),
        )  # fmt: skip
        times["build"].append(time.perf_counter() - start - setup)  # what the cache adds to setting up
        synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            size, count = plain.args.per_device_eval_batch_size, len(data)
            batches = [list(range(first, min(first + size, count))) for first in range(0, count, size)]
            for inputs in plain._cache_batches(batches):  # the same batches the build ran, in the same order
                plain.teacher_forward(inputs, **plain.teachers["teacher"].output_flags)
        synchronize()
        times["inference"].append(time.perf_counter() - start)
    return {
        "build": min(times["build"]),
        "inference": min(times["inference"]),
        "cache": os.path.join(scratch, "cache-0"),
    }


@torch.no_grad()
def teacher_forwards(teacher, data, shape, hidden_states: bool) -> list[float]:
    teacher.to(device()).eval()
    times = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available())
    for step in range(shape["steps"] + shape["warmup"]):
        rows = data[step * shape["batch"] : (step + 1) * shape["batch"]]
        inputs = {key: value.to(device()) for key, value in rows.items() if key != "labels"}
        synchronize()
        start = time.perf_counter()
        with autocast:
            teacher(**inputs, output_hidden_states=hidden_states)
        synchronize()
        times.append(time.perf_counter() - start)
    return times[shape["warmup"] :]


def time_pair(name: str, shape: dict, quick: bool, peak: float | None) -> dict:
    shape = pair_shape(name, shape, quick)
    teacher, student, data, losses = PAIRS[name](shape, quick)
    initial = {key: value.clone() for key, value in student.state_dict().items()}
    steps = {"plain": [], "hard_label": [], "online": [], "cached": [], "online_unchecked": []}
    round_medians = {kind: [] for kind in steps}  # each round's median step, for the ratios' spread over rounds
    flops = {}
    with tempfile.TemporaryDirectory() as scratch:
        build = cache_build(student, teacher, data, losses, shape, scratch, attempts=1 if quick else 3)
        kinds = {
            "plain": (None, None, {}),
            "hard_label": (None, PLAIN_LOSSES, {}),
            "online": (teacher, losses, {}),
            "cached": (None, losses, {"teacher_cache": build["cache"]}),
            # The online step without the non-finite check: what the check costs (one host sync per step).
            "online_unchecked": (teacher, losses, {"check_finite": False}),
        }
        for kind, (kind_teacher, kind_losses, extra) in kinds.items():
            if kind == "online_unchecked":
                continue  # the same arithmetic as "online"
            flops[kind] = step_flops(student, kind_teacher, data, kind_losses, shape, scratch, **extra)
        # Rounds of every kind of training, so that a slow spell of a shared machine hits them all.
        started, rounds = time.perf_counter(), 0
        while rounds < shape["rounds"] or (
            rounds < shape["max_rounds"] and time.perf_counter() - started < shape["round_seconds"]
        ):
            for kind, (kind_teacher, kind_losses, extra) in kinds.items():
                student.load_state_dict(initial)
                times = train_steps(student, kind_teacher, data, kind_losses, shape, scratch, **extra)
                steps[kind] += times
                round_medians[kind].append(statistics.median(times))
            rounds += 1
    forward = teacher_forwards(teacher, data, shape, hidden_states="hidden_state" in losses)
    medians = {f"{kind}_step_s": statistics.median(values) for kind, values in steps.items()}
    medians["teacher_forward_s"] = statistics.median(forward)
    medians["rounds"] = rounds
    for kind, count in flops.items():
        seconds = medians[f"{kind}_step_s"]
        medians[f"{kind}_steps_per_s"] = 1 / seconds
        medians[f"{kind}_step_tflop"] = count / 1e12
        medians[f"{kind}_tflops"] = count / seconds / 1e12
        medians[f"{kind}_peak_fraction"] = None if peak is None else count / seconds / 1e12 / peak
    plain_step = medians["plain_step_s"]
    medians["online_over_parts"] = medians["online_step_s"] / (plain_step + medians["teacher_forward_s"])
    medians["online_over_plain"] = medians["online_step_s"] / plain_step
    medians["cached_over_plain"] = medians["cached_step_s"] / plain_step
    # Like for like: the same trainer on the labels alone, which also projects only the labeled positions.
    medians["online_over_hard_label_parts"] = medians["online_step_s"] / (
        medians["hard_label_step_s"] + medians["teacher_forward_s"]
    )
    medians["cached_over_hard_label"] = medians["cached_step_s"] / medians["hard_label_step_s"]
    medians["finite_check_overhead"] = medians["online_step_s"] / medians["online_unchecked_step_s"]
    medians["hard_label_over_plain"] = medians["hard_label_step_s"] / plain_step
    # Each ratio from each round's medians (the teacher forward from its own median): their lowest and highest.
    per_round = {
        "online_over_parts": [
            online / (plain + medians["teacher_forward_s"])
            for online, plain in zip(round_medians["online"], round_medians["plain"], strict=True)
        ],
        "cached_over_plain": [a / b for a, b in zip(round_medians["cached"], round_medians["plain"], strict=True)],
        "hard_label_over_plain": [
            a / b for a, b in zip(round_medians["hard_label"], round_medians["plain"], strict=True)
        ],
    }
    medians["round_spread"] = {key: [min(values), max(values)] for key, values in per_round.items()}
    medians.update(cache_build_s=build["build"], teacher_pass_s=build["inference"],
                   cache_build_over_inference=build["build"] / build["inference"])  # fmt: skip
    return medians


# ---- peak memory, each case in its own process ---------------------------------------------------------


def peak_bytes(work) -> int:
    """Peak memory `work()` adds above what the process holds when it starts."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        work()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    # The lifetime high-water mark may have been set while the models were built; reset it to the current
    # resident size (Linux >= 4.0) so that the peak read afterwards belongs to work() alone.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    start = _status_bytes("VmRSS")
    work()
    return _status_bytes("VmHWM") - start


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


KL_CASES = ("token_kl_naive", "token_kl_chunked")


def measure_in_children(cases: list[str], quick: bool) -> dict[str, int]:
    """Peak bytes of each case, each in a fresh process. The processes are forked from a server that has imported
    torch, transformers and hf_distill once (and run nothing), so each starts in a fraction of a second; on a CPU
    two run at a time, since a process's peak resident memory is its own. On a GPU, one at a time."""
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: fresh interpreters, slower to start
        context = multiprocessing.get_context("spawn")
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "transformers", "datasets", "hf_distill"])
    workers = 1 if torch.cuda.is_available() else 2
    with context.Pool(workers, maxtasksperchild=1) as pool:  # one case per process
        peaks = pool.starmap(case_peak, [(case, quick) for case in cases], chunksize=1)
    return dict(zip(cases, peaks, strict=True))


def case_peak(case: str, quick: bool) -> int:
    """Peak bytes of one case (run in its own process by `measure_in_children`)."""
    shape = SHAPES["quick" if quick else "full"]
    if case in KL_CASES:
        generator = torch.Generator().manual_seed(0)
        student = torch.randn(shape["kl_tokens"], VOCAB, generator=generator).to(device()).requires_grad_(True)
        teacher = torch.randn(shape["kl_tokens"], VOCAB, generator=generator).to(device())
        if case == "token_kl_naive":
            return peak_bytes(lambda: soft_target_loss(student, teacher, 2.0, reduction="sum").backward())
        return peak_bytes(lambda: chunked_soft_target_loss(student, teacher, 2.0).backward())
    pair, kind = case.rsplit(":", 1)
    shape = pair_shape(pair, shape, quick)
    teacher, student, data, losses = PAIRS[pair](shape, quick)
    with tempfile.TemporaryDirectory() as scratch:
        if kind in ("plain", "hard_label"):
            plain_losses = None if kind == "plain" else PLAIN_LOSSES
            return peak_bytes(lambda: train_steps(student, None, data, plain_losses, shape, scratch))
        teacher_weights = sum(p.numel() * p.element_size() for p in teacher.parameters())
        # The teacher's weights are part of the KD peak: count them from before they reach the device.
        return peak_bytes(lambda: train_steps(student, teacher, data, losses, shape, scratch)) + (
            teacher_weights if not torch.cuda.is_available() else 0)  # fmt: skip


# ---- report -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, under a minute (not a result)")
    parser.add_argument("--peak_tflops", type=float, help="the GPU's dense peak TFLOP/s, if not in PEAK_TFLOPS")
    parser.add_argument(
        "--pairs", nargs="+", choices=[name.split()[0] for name in PAIRS], default=[name.split()[0] for name in PAIRS],
        help="time these pairs alone (by their first word); the report is then printed, not written",
    )  # fmt: skip
    options = parser.parse_args()
    shape = SHAPES["quick" if options.quick else "full"]
    chosen = [name for name in PAIRS if name.split()[0] in options.pairs]
    started = time.perf_counter()
    results = {
        "pairs": {name: time_pair(name, shape, options.quick, peak_tflops(options.peak_tflops)) for name in chosen}
    }
    # Peaks after every timing, so that no measuring process shares the machine with a timed step.
    kinds = ("plain", "hard_label", "online")
    peaks = measure_in_children(
        [f"{name}:{kind}" for name in chosen for kind in kinds] + list(KL_CASES), options.quick
    )
    for name, timing in results["pairs"].items():
        plain_peak, hard_label_peak, online_peak = (peaks[f"{name}:{kind}"] for kind in kinds)
        teacher, *_ = PAIRS[name](pair_shape(name, shape, options.quick), options.quick)
        teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
        timing.update(plain_peak_bytes=plain_peak, hard_label_peak_bytes=hard_label_peak,
                      online_peak_bytes=online_peak, teacher_weight_bytes=teacher_bytes,
                      kd_peak_over_plain=online_peak / (plain_peak + teacher_bytes),
                      kd_peak_over_hard_label=online_peak / (hard_label_peak + teacher_bytes))  # fmt: skip
    naive, chunked = (peaks[case] for case in KL_CASES)
    results["token_kl"] = {"positions": shape["kl_tokens"], "vocab": VOCAB, "naive_peak_bytes": naive,
                           "chunked_peak_bytes": chunked, "token_kl_peak_saving": 1 - chunked / naive}  # fmt: skip
    results["machine"] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "platform": platform.platform(), "shape": shape, "quick": options.quick,
        "peak_tflops": peak_tflops(options.peak_tflops),
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    ratios = {
        "online_over_parts": max(p["online_over_parts"] for p in results["pairs"].values()),
        "cached_over_plain": max(p["cached_over_plain"] for p in results["pairs"].values()),
        "cache_build_over_inference": max(p["cache_build_over_inference"] for p in results["pairs"].values()),
        "token_kl_peak_saving": results["token_kl"]["token_kl_peak_saving"],
        "kd_peak_over_plain": max(p["kd_peak_over_plain"] for p in results["pairs"].values()),
    }
    # The same three against DistillationTrainer on the labels alone (see PLAIN_LOSSES): like for like.
    for key in ("online_over_hard_label_parts", "cached_over_hard_label", "kd_peak_over_hard_label"):
        ratios[key] = max(p[key] for p in results["pairs"].values())
    # The online step with the non-finite check (check_finite, the default) over the same step without it.
    ratios["finite_check_overhead"] = max(p["finite_check_overhead"] for p in results["pairs"].values())
    ratios["hard_label_over_plain"] = max(p["hard_label_over_plain"] for p in results["pairs"].values())
    report = format_results(results, ratios)  # formatted in --quick too, so a formatting slip shows up there
    if options.quick or len(chosen) < len(PAIRS):
        print(report)  # a spot check: shown, not written
    else:
        with open(os.path.join(HERE, "RESULTS.md"), "w", encoding="utf-8") as handle:
            handle.write(report)
    print(json.dumps(ratios))


def format_results(results: dict, ratios: dict) -> str:
    """RESULTS.md's text."""
    rounds = ", ".join(f"{name}: {pair['rounds']}" for name, pair in results["pairs"].items())
    machine = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Written by `python benchmarks/run.py` on {machine['device']} ({machine['cpu_count']} cores, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}, {machine['platform']}) in "
        f"{machine['seconds']} s. Shapes: {machine['shape']}"
        + (f", with {PAIR_SHAPES} for those pairs" if not machine["quick"] else "")
        + f". Medians over the timed steps after the warm-up steps of each round ({rounds} rounds); peaks measured in "
        "a fresh process per case.",
        "",
        "| pair | plain step (s) | hard-label step (s) | teacher forward (s) | online KD step (s) | cached KD step "
        "(s) | cache build (s) | teacher pass (s) | plain peak (GiB) | hard-label peak (GiB) | KD peak (GiB) | teacher "
        "weights (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["pairs"].items():
        cells = [row[f"{kind}_step_s"] for kind in ("plain", "hard_label")] + [row["teacher_forward_s"]]
        cells += [row["online_step_s"], row["cached_step_s"], row["cache_build_s"], row["teacher_pass_s"]]
        cells += [row[f"{kind}_bytes"] / 2**30 for kind in ("plain_peak", "hard_label_peak", "online_peak")]
        cells.append(row["teacher_weight_bytes"] / 2**30)
        lines.append(f"| {name} | " + " | ".join(f"{cell:.3f}" for cell in cells) + " |")
    lines += [
        "",
        "| pair | online / (plain + teacher) | cached / plain | build / pass | KD peak / (plain peak + teacher) | "
        "online / (hard-label + teacher) | cached / hard-label | KD peak / (hard-label peak + teacher) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = ("online_over_parts", "cached_over_plain", "cache_build_over_inference", "kd_peak_over_plain",
            "online_over_hard_label_parts", "cached_over_hard_label", "kd_peak_over_hard_label")  # fmt: skip
    for name, row in results["pairs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[key]:.3f}" for key in keys) + " |")
    lines += [
        "",
        "| pair | online / (plain + teacher) | cached / plain | hard-label / plain |",
        "|---|---|---|---|",
    ]
    spread_keys = ("online_over_parts", "cached_over_plain", "hard_label_over_plain")
    for name, row in results["pairs"].items():
        cells = [
            f"{row[key]:.3f} ({row['round_spread'][key][0]:.3f}–{row['round_spread'][key][1]:.3f})"
            for key in spread_keys
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each ratio of the medians over all rounds, and in brackets the lowest and highest the same ratio takes from "
        "one round's medians alone (the teacher forward from its median): how far a slow spell moves it.",
        "",
        "| pair | online KD step (s) | the same with check_finite=False (s) | ratio |",
        "|---|---|---|---|",
        *[
            f"| {name} | {row['online_step_s']:.3f} | {row['online_unchecked_step_s']:.3f} | "
            f"{row['finite_check_overhead']:.3f} |"
            for name, row in results["pairs"].items()
        ],
        "",
        "check_finite (the default) checks every teacher output, loss term and gradient of a step on the device "
        "and reads the flags back in one host sync per optimizer step; the ratio is what that costs (timed in the "
        "same rounds).",
        "",
        "Plain step: the student trained on its labels by `transformers.Trainer`, as without hf_distill. Hard-label "
        "step: the same through `DistillationTrainer` with `hard_label` alone, which for masked LM projects onto the "
        "vocabulary only at the labeled positions, as the KD steps do (`compact_token_logits`); the last three "
        "ratios compare like with like. Step times: medians over every timed step of rounds of (plain, hard-label, "
        "online, cached) training runs, so a slow spell of the machine falls on all four. The cached KD step trains "
        "from a cache built with the default settings (top-64 logits for masked LM, the hidden states the losses "
        "read), with no teacher in memory. Cache build: the extra time a `DistillationTrainer` with an empty "
        "`teacher_cache` takes to construct (hashing the teacher, running it over the data set, writing the "
        "shards, checking the first batch), against one plain teacher inference pass over the same batches; the two "
        "alternate three times and the best of each is kept. Peaks: above what the process held before training "
        "began; the KD peak counts the teacher's weights, which the plain peaks do not hold.",
    ]
    lines += [
        "",
        "| pair | step | steps/s | TFLOP per step | TFLOP/s reached | fraction of peak |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["pairs"].items():
        for kind in ("plain", "hard_label", "online", "cached"):
            fraction = row[f"{kind}_peak_fraction"]
            lines.append(
                f"| {name} | {kind} | {row[f'{kind}_steps_per_s']:.3f} | {row[f'{kind}_step_tflop']:.4f} | "
                f"{row[f'{kind}_tflops']:.4f} | {'-' if fraction is None else f'{fraction:.1%}'} |"
            )
    lines += [
        "",
        "FLOPs per step: one training step (forward and backward, teacher included; the optimizer's elementwise "
        "updates are not counted) counted by "
        "`torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions, attention). Fraction of peak: "
        + (
            "not given on a CPU."
            if machine["peak_tflops"] is None
            else f"against {machine['peak_tflops']} TFLOP/s (the device's dense bf16 peak, or --peak_tflops)."
        ),
    ]
    kl = results["token_kl"]
    lines += [
        "",
        f"Token-level KL at {kl['positions']} positions x {kl['vocab']} vocabulary: naive peak "
        f"{kl['naive_peak_bytes'] / 2**30:.2f} GiB, chunked {kl['chunked_peak_bytes'] / 2**30:.2f} GiB "
        f"(saving {kl['token_kl_peak_saving']:.1%}).",
        "",
        *ratios_lines(
            "online_over_parts <= 1.10 (GPT-2: 1.15), cached_over_plain <= 1.05 (GPT-2: 1.15), "
            "cache_build_over_inference <= 1.10, token_kl_peak_saving >= 0.60, kd_peak_over_plain <= 1.10 (GPT-2: "
            "1.05), hard_label_over_plain <= 1.02 (GPT-2); online_over_hard_label_parts, cached_over_hard_label and "
            "kd_peak_over_hard_label are the like-for-like ratios; the worst pair is reported",
            ratios,
        ),
    ]
    return "\n".join(lines) + "\n"


def ratios_lines(targets: str, ratios: dict) -> list[str]:
    """A report's closing lines: the targets, then the ratios as the JSON line the script prints last."""
    return [f"Ratios (targets: {targets}):", "", "```json", json.dumps(ratios), "```"]


if __name__ == "__main__":
    main()

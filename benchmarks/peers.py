"""hf_distill next to the toolkits users would pick instead, on the same work, in one run; writes benchmarks/PEERS.md.

    python benchmarks/peers.py            # the two pairs below (~25 min on 2 CPU cores)
    python benchmarks/peers.py --quick    # tiny shapes, seconds: a spot check, printed, not a result

Pairs and contenders (the same teacher, student, data, batch, precision, optimizer, schedule and loss for each):
- causal LM, GPT-2-small-shaped teacher (12 x 768, 50,257 tokens) -> 6 of its layers, on fixed token sequences:
  hf_distill's `DistillationTrainer` with `soft_target` (`divergence: jsd`, T = 1) against TRL's `GKDTrainer`
  (`lmbda=0`, `seq_kd=False`: off-policy, token-level, on the given sequences; `beta=0.5`, the same
  Jensen-Shannon divergence), with TRL's gradient checkpointing off as in hf_distill ("trl") and at TRL's
  default, on ("trl_default").
- ViT-base -> MobileNetV2-1.4 (`run.py`'s pair): the Hugging Face vision guide's trainer, its `compute_loss`
  `(1 - λ)·CE + λ·KL(batchmean)·T²` (λ = 0.5, T = 5) patched only to accept `num_items_in_batch`, against
  hf_distill online (`hard_label` 0.5 + `soft_target` 0.5 at T = 5, the same loss) and from its teacher cache.

Rounds interleave the contenders, so that a slow spell of the machine hits each of them. Step times: medians over
the timed steps of every round, read around each optimizer step of `Trainer.train()`. The cached contender is
timed end to end: constructing the trainer (which builds the cache) and training 3 epochs, against the guide's
trainer constructed and trained over the same 3 epochs. Peak memory: as `run.py` measures it, in a fresh process per
contender, with the teacher's weights counted for every contender. Same work: each trained student's loss on a fixed
batch after the same steps from the same start, computed one way for all (the JSD to the teacher per token; the
guide's loss), must agree within `LOSS_TOLERANCE`. The last line printed is a JSON object of the ratios
(hf_distill / peer: below 1, hf_distill is faster or smaller).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import version

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import Trainer, TrainingArguments, default_data_collator  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the pairs, the clock and the peak-memory reading of benchmarks/run.py)

from hf_distill import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_distill.losses.functional import soft_target_loss  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
#: Largest relative difference allowed between the contenders' losses after the same steps from the same start:
#: what rounding in another order of operations (chunked versus whole-vocabulary sums) leaves. The vision student
#: (batch norm, gradients clipped from a norm near 100) amplifies rounding differences step after step, and
#: hf_distill convolves in channels-last, which rounds differently: its losses after 3 epochs agree more
#: loosely (VISION_TOLERANCE), while the loss of the same first batch at the same start agrees to START_TOLERANCE.
LOSS_TOLERANCE = 1e-3
VISION_TOLERANCE = 5e-2
START_TOLERANCE = 1e-5
CAUSAL_LOSSES = {"soft_target": {"weight": 1.0, "temperature": 1.0, "divergence": "jsd"}}
GUIDE_TEMPERATURE, GUIDE_LAMBDA = 5.0, 0.5
# fmt: off
SHAPES = {
    # batch and sequence length of the causal pair, batch and image side of the vision pair, timed steps after
    # warm-up steps per training run, rounds, and the batches of the vision pair's epoch (the cached contender)
    "full": {"lm_batch": 8, "lm_length": 128, "lm_steps": 4, "lm_warmup": 1, "lm_rounds": 3,
             "batch": 8, "image": 224, "epoch_batches": 6, "epochs": 3, "vision_rounds": 3},
    "quick": {"lm_batch": 2, "lm_length": 16, "lm_steps": 2, "lm_warmup": 1, "lm_rounds": 1,
              "batch": 2, "image": 32, "epoch_batches": 2, "epochs": 3, "vision_rounds": 1},
}
# fmt: on


# ---- the contenders ----------------------------------------------------------------------------------------


class GuideTrainer(Trainer):
    """The vision guide's distillation trainer as published (its `compute_loss`), accepting the
    `num_items_in_batch` argument that `Trainer.training_step` passes in transformers 5."""

    def __init__(self, *args, teacher_model=None, temperature=GUIDE_TEMPERATURE, lambda_param=GUIDE_LAMBDA, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher_model.to(self.args.device)
        self.teacher.eval()
        self.temperature, self.lambda_param = temperature, lambda_param
        self.loss_function = torch.nn.KLDivLoss(reduction="batchmean")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_output = model(**inputs)
        with torch.no_grad():
            teacher_output = self.teacher(**inputs)
        soft_teacher = F.softmax(teacher_output.logits / self.temperature, dim=-1)
        soft_student = F.log_softmax(student_output.logits / self.temperature, dim=-1)
        distillation_loss = self.loss_function(soft_student, soft_teacher) * self.temperature**2
        loss = (1.0 - self.lambda_param) * student_output.loss + self.lambda_param * distillation_loss
        return (loss, student_output) if return_outputs else loss


def common_arguments(scratch: str, batch: int, max_steps: int = -1, epochs: float = 1.0) -> dict:
    return dict(output_dir=scratch, per_device_train_batch_size=batch, max_steps=max_steps, num_train_epochs=epochs,
                learning_rate=1e-4, save_strategy="no", report_to="none", disable_tqdm=True, logging_strategy="no",
                dataloader_num_workers=0, bf16=torch.cuda.is_available(), seed=42)  # fmt: skip


def token_tokenizer():
    """TRL's trainer reads the pad token id from a tokenizer; the data are token ids already, so a two-word one does."""
    from tokenizers import Tokenizer  # noqa: PLC0415
    from tokenizers.models import WordLevel  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")),
        pad_token="<pad>",
        unk_token="<unk>",
    )


def causal_trainer(kind: str, teacher, student, data, shape: dict, scratch: str, callbacks=()):
    steps = shape["lm_steps"] + shape["lm_warmup"]
    arguments = common_arguments(scratch, shape["lm_batch"], max_steps=steps)
    if kind == "hf_distill":
        config = DistillationConfig(losses=CAUSAL_LOSSES, **arguments)
        return DistillationTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=data, callbacks=list(callbacks)
        )
    from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: PLC0415

    checkpointing = kind == "trl_default"  # GKDConfig (an SFTConfig) turns gradient checkpointing on by default
    config = GKDConfig(lmbda=0.0, beta=0.5, seq_kd=False, gradient_checkpointing=checkpointing, **arguments)
    return GKDTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=data, data_collator=default_data_collator,
        processing_class=token_tokenizer(), callbacks=list(callbacks),
    )  # fmt: skip


def vision_trainer(kind: str, teacher, student, data, shape: dict, scratch: str, callbacks=(), cache: str = ""):
    arguments = common_arguments(scratch, shape["batch"], epochs=shape["epochs"])
    if kind == "guide":
        return GuideTrainer(
            model=student, teacher_model=teacher, args=TrainingArguments(**arguments), train_dataset=data,
            callbacks=list(callbacks),
        )  # fmt: skip
    config = DistillationConfig(losses=run.VISION_LOSSES, teacher_cache=cache or None, **arguments)
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=data, callbacks=list(callbacks)
    )


CAUSAL_KINDS = ("hf_distill", "trl", "trl_default")
VISION_KINDS = ("hf_distill", "guide", "hf_distill_cached")


def pairs(shape: dict, quick: bool):
    """The two pairs at `shape`: (teacher, student, training data, fixed evaluation batch)."""
    count = shape["lm_steps"] + shape["lm_warmup"] + 1  # the training batches and one to check
    lm = {"batch": shape["lm_batch"], "length": shape["lm_length"], "steps": count, "warmup": 0}
    teacher, student, data, _ = run.causal_pair(lm, quick)
    causal = (teacher, student, data.select(range(len(data) - lm["batch"])), data[len(data) - lm["batch"] :])
    image = {"batch": shape["batch"], "image": shape["image"], "steps": shape["epoch_batches"] + 1, "warmup": 0}
    teacher, student, data, _ = run.vision_pair(image, quick)
    student.dropout.p = student.config.classifier_dropout_prob = 0.0  # no random masks: the same arithmetic for all
    vision = (teacher, student, data.select(range(len(data) - image["batch"])), data[len(data) - image["batch"] :])
    return {"causal": causal, "vision": vision}


@torch.no_grad()
def causal_check_loss(student, teacher, batch) -> float:
    """The student's Jensen-Shannon divergence from the teacher per predicted token (T = 1) on a fixed batch."""
    student.eval()
    inputs = {key: batch[key].to(run.device()) for key in ("input_ids", "attention_mask")}
    student_logits = student(**inputs).logits[:, :-1].float()
    teacher_logits = teacher.to(run.device())(**inputs).logits[:, :-1].float()
    return soft_target_loss(student_logits, teacher_logits, 1.0, "jsd", reduction="mean").item()


@torch.no_grad()
def vision_check_loss(student, teacher, batch) -> float:
    """The guide's loss of the student on a fixed batch, in evaluation mode."""
    student.eval()
    pixels, labels = batch["pixel_values"].to(run.device()), batch["labels"].to(run.device())
    student_logits = student(pixel_values=pixels).logits.float()
    teacher_logits = teacher.to(run.device()).eval()(pixel_values=pixels).logits.float()
    kd = F.kl_div(
        F.log_softmax(student_logits / GUIDE_TEMPERATURE, -1),
        F.softmax(teacher_logits / GUIDE_TEMPERATURE, -1),
        reduction="batchmean",
    )
    ce = F.cross_entropy(student_logits, labels)
    return ((1 - GUIDE_LAMBDA) * ce + GUIDE_LAMBDA * kd * GUIDE_TEMPERATURE**2).item()


def fresh(student, initial):
    """The student back at its starting weights, in its usual memory layout (a contender may have changed it)."""
    student.to(memory_format=torch.contiguous_format)
    student.load_state_dict(initial)
    student.train()
    return student


# ---- timing ------------------------------------------------------------------------------------------------


def time_causal(pair, shape: dict) -> dict:
    teacher, student, data, check = pair
    initial = {key: value.clone() for key, value in student.state_dict().items()}
    steps = {kind: [] for kind in CAUSAL_KINDS}
    losses = {}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(shape["lm_rounds"]):
            for kind in CAUSAL_KINDS:
                clock = run.StepClock()
                causal_trainer(kind, teacher, fresh(student, initial), data, shape, scratch, [clock]).train()
                steps[kind] += clock.times[shape["lm_warmup"] :]
                losses[kind] = causal_check_loss(student, teacher, check)
    fresh(student, initial)
    return {
        "step_s": {kind: statistics.median(times) for kind, times in steps.items()},
        "steps": {kind: len(times) for kind, times in steps.items()},
        "check_loss": losses,
        "initial_check_loss": causal_check_loss(student, teacher, check),
    }


def time_vision(pair, shape: dict) -> dict:
    teacher, student, data, check = pair
    initial = {key: value.clone() for key, value in student.state_dict().items()}
    steps = {kind: [] for kind in VISION_KINDS}
    totals = {kind: [] for kind in VISION_KINDS}
    losses = {}
    with tempfile.TemporaryDirectory() as scratch:
        # The same loss: each online contender's own compute_loss on the first batch at the common start.
        first = {key: value.to(run.device()) for key, value in data[: shape["batch"]].items()}
        start_loss = {}
        for kind in VISION_KINDS[:2]:
            trainer = vision_trainer(kind, teacher, fresh(student, initial), data, shape, scratch)
            with torch.no_grad():
                start_loss[kind] = trainer.compute_loss(student.eval(), dict(first)).item()
            del trainer
        for attempt in range(shape["vision_rounds"]):
            for kind in VISION_KINDS:
                clock = run.StepClock()
                cache = os.path.join(scratch, f"cache-{attempt}") if kind == "hf_distill_cached" else ""
                run.synchronize()
                start = time.perf_counter()
                trainer = vision_trainer(kind, teacher, fresh(student, initial), data, shape, scratch, [clock], cache)
                trainer.train()
                run.synchronize()
                totals[kind].append(time.perf_counter() - start)
                steps[kind] += clock.times[1:]  # the first step of a run warms up
                losses[kind] = vision_check_loss(student, teacher, check)
                del trainer
    fresh(student, initial)
    return {
        "step_s": {kind: statistics.median(times) for kind, times in steps.items()},
        "steps": {kind: len(times) for kind, times in steps.items()},
        "total_s": {kind: statistics.median(times) for kind, times in totals.items()},
        "check_loss": losses,
        "initial_check_loss": vision_check_loss(student, teacher, check),
        "start_loss": start_loss,
        "start_loss_gap": relative_gap(start_loss),
    }


# ---- peak memory, each contender in its own process ------------------------------------------------------------


def case_peak(case: str, quick: bool) -> int:
    """Peak bytes of one contender's training run above what its process held before, plus the teacher's weights."""
    shape = SHAPES["quick" if quick else "full"]
    pair, kind = case.split(":")
    teacher, student, data, _ = pairs(shape, quick)[pair]
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    with tempfile.TemporaryDirectory() as scratch:
        if pair == "causal":
            short = {**shape, "lm_steps": 2, "lm_warmup": 0}  # the peak of a step is reached in the first two
            work = lambda: causal_trainer(kind, teacher, student, data, short, scratch).train()  # noqa: E731
        else:
            work = lambda: vision_trainer(kind, teacher, student, data, {**shape, "epochs": 1}, scratch).train()  # noqa: E731
        return run.peak_bytes(work) + teacher_bytes


def measure_peaks(cases: list[str], quick: bool) -> dict[str, int]:
    """`run.py`'s way: each case in a fresh process forked from a server that has imported the libraries; two at a
    time on a CPU (a process's peak resident memory is its own), one at a time on a GPU."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "datasets", "hf_distill", "trl"])
    with context.Pool(1 if torch.cuda.is_available() else 2, maxtasksperchild=1) as pool:
        peaks = pool.starmap(case_peak, [(case, quick) for case in cases], chunksize=1)
    return dict(zip(cases, peaks, strict=True))


# ---- report ------------------------------------------------------------------------------------------------


def relative_gap(losses: dict[str, float]) -> float:
    values = list(losses.values())
    return (max(values) - min(values)) / abs(min(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds (not a result)")
    options = parser.parse_args()
    shape = SHAPES["quick" if options.quick else "full"]
    started = time.perf_counter()
    built = pairs(shape, options.quick)
    results = {"causal": time_causal(built["causal"], shape), "vision": time_vision(built["vision"], shape)}
    del built
    # Peaks after every timing, so that no measuring process shares the machine with a timed step.
    cases = [f"causal:{kind}" for kind in CAUSAL_KINDS] + [f"vision:{kind}" for kind in VISION_KINDS[:2]]
    peaks = measure_peaks(cases, options.quick)
    for case, peak in peaks.items():
        pair, kind = case.split(":")
        results[pair].setdefault("peak_bytes", {})[kind] = peak
    for pair in results.values():
        pair["loss_gap"] = relative_gap(pair["check_loss"])
    causal, vision = results["causal"], results["vision"]
    ratios = {
        "causal_lm_step_vs_trl": causal["step_s"]["hf_distill"] / causal["step_s"]["trl"],
        "causal_lm_peak_vs_trl": causal["peak_bytes"]["hf_distill"] / causal["peak_bytes"]["trl"],
        "causal_lm_step_vs_trl_default": causal["step_s"]["hf_distill"] / causal["step_s"]["trl_default"],
        "causal_lm_peak_vs_trl_default": causal["peak_bytes"]["hf_distill"] / causal["peak_bytes"]["trl_default"],
        "vision_online_vs_guide": vision["step_s"]["hf_distill"] / vision["step_s"]["guide"],
        "vision_cached_3_epochs_vs_guide": vision["total_s"]["hf_distill_cached"] / vision["total_s"]["guide"],
        "vision_online_peak_vs_guide": vision["peak_bytes"]["hf_distill"] / vision["peak_bytes"]["guide"],
    }
    results["machine"] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "versions": {name: version(name) for name in ("torch", "transformers", "trl", "accelerate", "hf_distill")},
        "shape": shape, "quick": options.quick, "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    report = format_peers(results, ratios)  # formatted in --quick too, so a formatting slip shows up there
    if options.quick:
        print(report)
    else:
        with open(os.path.join(HERE, "PEERS.md"), "w", encoding="utf-8") as handle:
            handle.write(report)
        with open(os.path.join(HERE, "peers.json"), "w", encoding="utf-8") as handle:
            json.dump({"results": results, "ratios": ratios}, handle, indent=1)
    for name, gap, tolerance in (("causal", causal["loss_gap"], LOSS_TOLERANCE),
                                 ("vision", vision["loss_gap"], VISION_TOLERANCE),
                                 ("vision start", vision["start_loss_gap"], START_TOLERANCE)):  # fmt: skip
        if gap > tolerance:
            print(f"warning: the {name} contenders' losses differ by {gap:.2e} (> {tolerance})")
    print(json.dumps(ratios))


def format_peers(results: dict, ratios: dict) -> str:
    """PEERS.md's text."""
    machine, causal, vision, shape = (
        results["machine"],
        results["causal"],
        results["vision"],
        results["machine"]["shape"],
    )
    versions = ", ".join(f"{name} {value}" for name, value in machine["versions"].items())
    gib = 2**30
    lines = [
        "# hf_distill next to its peers",
        "",
        f"Written by `python benchmarks/peers.py` on {machine['device']} ({machine['cpu_count']} cores, "
        f"{machine['torch_threads']} torch threads, {machine['platform']}) in {machine['seconds']} s; {versions}. "
        "Random weights, fp32"
        + (" (bf16 autocast on the GPU)" if torch.cuda.is_available() else "")
        + ". Ratios are hf_distill / peer: below 1, hf_distill is faster or smaller.",
        "",
        f"## Causal LM: GPT-2-small-shaped teacher (12 x 768, 50,257 tokens) -> 6 layers, batch {shape['lm_batch']} x "
        f"{shape['lm_length']} tokens",
        "",
        "| contender | median step (s) | timed steps | peak (GiB) | JSD to the teacher after the steps |",
        "|---|---|---|---|---|",
    ]
    names = {"hf_distill": "hf_distill `DistillationTrainer` (`soft_target`, jsd, T = 1)",
             "trl": "TRL `GKDTrainer` (lmbda 0, beta 0.5, seq_kd off), gradient checkpointing off",
             "trl_default": "TRL `GKDTrainer`, the same at its default gradient checkpointing (on)"}  # fmt: skip
    for kind in CAUSAL_KINDS:
        lines.append(
            f"| {names[kind]} | {causal['step_s'][kind]:.3f} | {causal['steps'][kind]} | "
            f"{causal['peak_bytes'][kind] / gib:.3f} | {causal['check_loss'][kind]:.6f} |"
        )
    lines += [
        "",
        f"Every contender starts from the same student (JSD {causal['initial_check_loss']:.6f} on the check batch) and "
        f"trains {shape['lm_steps'] + shape['lm_warmup']} steps per round ({shape['lm_warmup']} warm-up) over "
        f"{shape['lm_rounds']} interleaved rounds; the check losses differ by {causal['loss_gap']:.2e} (relative; "
        f"tolerance {LOSS_TOLERANCE}).",
        "",
        f"## Vision: ViT-base (patch 16) -> MobileNetV2-1.4, batch {shape['batch']} at {shape['image']} pixels",
        "",
        "| contender | median step (s) | timed steps | 3 epochs end to end (s) | peak (GiB) | guide loss after 3 "
        "epochs |",
        "|---|---|---|---|---|---|",
    ]
    names = {"hf_distill": "hf_distill online", "guide": "vision guide's trainer",
             "hf_distill_cached": "hf_distill from its teacher cache (built in the run)"}  # fmt: skip
    for kind in VISION_KINDS:
        peak = vision.get("peak_bytes", {}).get(kind)
        lines.append(
            f"| {names[kind]} | {vision['step_s'][kind]:.3f} | {vision['steps'][kind]} | {vision['total_s'][kind]:.1f} | "
            f"{'-' if peak is None else f'{peak / gib:.3f}'} | {vision['check_loss'][kind]:.6f} |"
        )
    lines += [
        "",
        f"An epoch is {shape['epoch_batches']} batches; each run is {shape['epochs']} epochs and the rounds "
        f"({shape['vision_rounds']}) interleave the three. End to end: constructing the trainer (the cached "
        "contender builds its cache then) and training. Median steps leave out each run's first. Same loss: on the "
        "first batch at the common start, the guide's `compute_loss` gives "
        f"{vision['start_loss']['guide']:.7f} and hf_distill's {vision['start_loss']['hf_distill']:.7f} (relative "
        f"gap {vision['start_loss_gap']:.1e}, tolerance {START_TOLERANCE}). After 3 epochs the check losses (from "
        f"{vision['initial_check_loss']:.6f}) differ by {vision['loss_gap']:.2e} (relative; tolerance "
        f"{VISION_TOLERANCE}: this batch-norm student amplifies rounding step after step, and hf_distill's "
        "channels-last convolutions round differently from the guide's).",
        "",
        *run.ratios_lines(
            "causal_lm_step_vs_trl <= 0.80, causal_lm_peak_vs_trl <= 0.60, vision_online_vs_guide <= 0.95, "
            "vision_cached_3_epochs_vs_guide <= 0.60",
            ratios,
        ),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

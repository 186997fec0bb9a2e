"""hf_distill next to the toolkits users would pick instead, on the same work, in one run; writes benchmarks/PEERS.md.

    python benchmarks/peers.py            # the two pairs below (~25 min on 2 CPU cores)
    python benchmarks/peers.py --quick    # tiny shapes, seconds: a spot check, printed, not a result
    python benchmarks/peers.py --only on_policy   # one part, measured again into the report's other parts
    (parts: causal, liger, vision, on_policy)

Pairs and contenders (the same teacher, student, data, batch, precision, optimizer, schedule and loss for each):
- causal LM, GPT-2-small-shaped teacher (12 x 768, 50,257 tokens) -> 6 of its layers, on fixed token sequences:
  hf_distill's `DistillationTrainer` with `soft_target` (`divergence: jsd`, T = 1) against TRL's `GKDTrainer`
  (`lmbda=0`, `seq_kd=False`: off-policy, token-level, on the given sequences; `beta=0.5`, the same
  Jensen-Shannon divergence), with TRL's gradient checkpointing off as in hf_distill ("trl") and at TRL's
  default, on ("trl_default").
- causal LM against Liger Kernel, the same pair: hf_distill with `soft_target` (jsd, T = 1, weight 0.5) and
  `hard_label` (weight 0.5) against a `transformers.Trainer` whose loss is Liger's `LigerFusedLinearJSDLoss` (the
  same 0.5 · CE + 0.5 · JSD, beta 0.5), at its defaults ("liger": compiled, chunks of 1,024 rows) and uncompiled
  ("liger_eager").
- ViT-base -> MobileNetV2-1.4 (`run.py`'s pair): the Hugging Face vision guide's trainer, its `compute_loss`
  `(1 - λ)·CE + λ·KL(batchmean)·T²` (λ = 0.5, T = 5) patched only to accept `num_items_in_batch`, against
  hf_distill online (`hard_label` 0.5 + `soft_target` 0.5 at T = 5, the same loss) and from its teacher cache.

- causal LM on-policy, the same pair: prompts of the first half of each sequence, the student samples the second
  half (`max_new_tokens` = half the length, temperature 1, top-k 0, top-p 1, the KV cache on), and the teacher
  scores it with the generalized JSD (beta 0.5): hf_distill (`lmbda=1`, `soft_target` `generalized_jsd`) against
  `GKDTrainer` (`lmbda=1`, `beta=0.5`, `temperature=1`), gradient checkpointing off ("trl") and at its default
  ("trl_default", which also turns the KV cache off in generation). A step is timed end to end here, from one
  optimizer step's end to the next, because hf_distill generates while it gathers the step's batches and TRL inside
  the step; the time in `generate` is read apart.

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
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator  # noqa: E402

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
# Liger Kernel's fused linear JSD computes weight_hard · CE + weight_soft · JSD (beta 0.5, T = 1): the same terms here.
LIGER_LOSSES = {"soft_target": {"weight": 0.5, "temperature": 1.0, "divergence": "jsd"}, "hard_label": {"weight": 0.5}}
ON_POLICY_LOSSES = {"soft_target": {"weight": 1.0, "temperature": 1.0, "divergence": "generalized_jsd", "beta": 0.5}}
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


class LigerJSDTrainer(Trainer):
    """`transformers.Trainer` with Liger Kernel's fused linear JSD (`liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`)
    as its loss, used as Liger's documentation shows: the student's and the teacher's last hidden states and output
    projections go in, the vocabulary projection and the loss run chunk by chunk inside it, and it returns
    `weight_hard_loss · CE + weight_soft_loss · JSD_beta`, each a mean over the labeled tokens. `compiled` is Liger's
    own switch (on by default: `torch.compile` of each chunk's work)."""

    def __init__(self, *args, teacher_model=None, compiled: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: PLC0415

        self.teacher = teacher_model.to(self.args.device).eval()
        self.liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=LIGER_LOSSES["hard_label"]["weight"],
            weight_soft_loss=LIGER_LOSSES["soft_target"]["weight"],
            beta=0.5,
            temperature=LIGER_LOSSES["soft_target"]["temperature"],
            compiled=compiled,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        body = {key: inputs[key] for key in ("input_ids", "attention_mask")}
        hidden = model.base_model(**body).last_hidden_state[:, :-1]  # position i predicts label i + 1
        with torch.no_grad():
            teacher_hidden = self.teacher.base_model(**body).last_hidden_state[:, :-1]
        loss = self.liger(
            hidden.reshape(-1, hidden.shape[-1]),
            model.get_output_embeddings().weight,
            teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
            self.teacher.get_output_embeddings().weight,
            inputs["labels"][:, 1:].reshape(-1),
        )
        return (loss, None) if return_outputs else loss


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


def liger_trainer(kind: str, teacher, student, data, shape: dict, scratch: str, callbacks=()):
    """hf_distill with `LIGER_LOSSES`, or Liger Kernel's fused linear JSD with the same weights ("liger": compiled,
    its default; "liger_eager": `compiled=False`)."""
    arguments = common_arguments(scratch, shape["lm_batch"], max_steps=shape["lm_steps"] + shape["lm_warmup"])
    if kind == "hf_distill":
        config = DistillationConfig(losses=LIGER_LOSSES, **arguments)
        return DistillationTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=data, callbacks=list(callbacks)
        )
    return LigerJSDTrainer(
        model=student, teacher_model=teacher, compiled=kind == "liger", args=TrainingArguments(**arguments),
        train_dataset=data, callbacks=list(callbacks),
    )  # fmt: skip


def on_policy_data(data, shape: dict):
    """The causal pair's sequences as prompts (the first half, labels -100) and completions, with the prompt alone in
    `prompts` and `prompt_attention_mask` too, where TRL's GKD trainer reads it."""
    prompt = shape["lm_length"] // 2

    def split(rows):
        labels = rows["labels"].clone()
        labels[:, :prompt] = -100
        return {"labels": labels, "prompts": rows["input_ids"][:, :prompt],
                "prompt_attention_mask": rows["attention_mask"][:, :prompt]}  # fmt: skip

    return data.map(split, batched=True).with_format("torch")


def on_policy_trainer(kind: str, teacher, student, data, shape: dict, scratch: str, callbacks=()):
    steps = shape["lm_steps"] + shape["lm_warmup"]
    arguments = common_arguments(scratch, shape["lm_batch"], max_steps=steps)
    new_tokens = shape["lm_length"] - shape["lm_length"] // 2
    if kind == "hf_distill":
        config = DistillationConfig(
            losses=ON_POLICY_LOSSES, lmbda=1.0, rollout_generation={"max_new_tokens": new_tokens}, **arguments
        )
        return DistillationTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=data.remove_columns(["prompts",
            "prompt_attention_mask"]), processing_class=token_tokenizer(), callbacks=list(callbacks),
        )  # fmt: skip
    from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: PLC0415

    checkpointing = kind == "trl_default"
    config = GKDConfig(lmbda=1.0, beta=0.5, temperature=1.0, max_new_tokens=new_tokens,
                       gradient_checkpointing=checkpointing, **arguments)  # fmt: skip
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
LIGER_KINDS = ("hf_distill", "liger", "liger_eager")
ON_POLICY_KINDS = CAUSAL_KINDS
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


def time_causal(pair, shape: dict, kinds=CAUSAL_KINDS, trainer=causal_trainer) -> dict:
    """Step times of `kinds` (built by `trainer`) in interleaved rounds: the median over every round, and each round's
    median apart (`round_step_s`), so that a ratio's spread over the rounds can be read."""
    teacher, student, data, check = pair
    initial = {key: value.clone() for key, value in student.state_dict().items()}
    steps = {kind: [] for kind in kinds}
    rounds = {kind: [] for kind in kinds}
    losses = {}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(shape["lm_rounds"]):
            for kind in kinds:
                clock = run.StepClock()
                trainer(kind, teacher, fresh(student, initial), data, shape, scratch, [clock]).train()
                steps[kind] += clock.times[shape["lm_warmup"] :]
                rounds[kind].append(statistics.median(clock.times[shape["lm_warmup"] :]))
                losses[kind] = causal_check_loss(student, teacher, check)
    fresh(student, initial)
    return {
        "step_s": {kind: statistics.median(times) for kind, times in steps.items()},
        "round_step_s": rounds,
        "steps": {kind: len(times) for kind, times in steps.items()},
        "check_loss": losses,
        "initial_check_loss": causal_check_loss(student, teacher, check),
    }


def time_liger(pair, shape: dict) -> dict:
    return time_causal(pair, shape, LIGER_KINDS, liger_trainer)


class CycleClock(TrainerCallback):
    """The time from one optimizer step's end to the next (the first from the start of training): everything a
    step costs, the gathering of its batches included."""

    def __init__(self):
        self.times, self.last = [], None

    def on_train_begin(self, args, state, control, **kwargs):
        run.synchronize()
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        run.synchronize()
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


class GenerationTimer:
    """Wraps a model's `generate` and adds up the seconds spent in it, per optimizer step of the clock beside it."""

    def __init__(self, model):
        self.model, self.original, self.seconds = model, model.generate, []

    def __enter__(self):
        def timed(*args, **kwargs):
            run.synchronize()
            start = time.perf_counter()
            out = self.original(*args, **kwargs)
            run.synchronize()
            self.seconds.append(time.perf_counter() - start)
            return out

        self.model.generate = timed
        return self

    def __exit__(self, *exc):
        del self.model.generate  # the class's method again


def time_on_policy(pair, shape: dict) -> dict:
    teacher, student, data, _ = pair
    data = on_policy_data(data, shape)
    initial = {key: value.clone() for key, value in student.state_dict().items()}
    steps = {kind: [] for kind in ON_POLICY_KINDS}
    generation = {kind: [] for kind in ON_POLICY_KINDS}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(shape["lm_rounds"]):
            for kind in ON_POLICY_KINDS:
                clock = CycleClock()
                with GenerationTimer(fresh(student, initial)) as timer:
                    on_policy_trainer(kind, teacher, student, data, shape, scratch, [clock]).train()
                steps[kind] += clock.times[shape["lm_warmup"] :]
                generation[kind] += timer.seconds[shape["lm_warmup"] :]
    fresh(student, initial)
    step = {kind: statistics.median(times) for kind, times in steps.items()}
    generate = {kind: statistics.median(times) for kind, times in generation.items()}
    return {
        "step_s": step,
        "generation_s": generate,
        "rest_s": {kind: step[kind] - generate[kind] for kind in ON_POLICY_KINDS},
        "steps": {kind: len(times) for kind, times in steps.items()},
        "generations": {kind: len(times) for kind, times in generation.items()},
    }


def time_vision(pair, shape: dict) -> dict:
    teacher, student, data, check = pair
    initial = {key: value.clone() for key, value in student.state_dict().items()}
    steps = {kind: [] for kind in VISION_KINDS}
    rounds = {kind: [] for kind in VISION_KINDS}
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
                rounds[kind].append(statistics.median(clock.times[1:]))
                losses[kind] = vision_check_loss(student, teacher, check)
                del trainer
    fresh(student, initial)
    return {
        "step_s": {kind: statistics.median(times) for kind, times in steps.items()},
        "steps": {kind: len(times) for kind, times in steps.items()},
        "round_step_s": rounds,
        "total_s": {kind: statistics.median(times) for kind, times in totals.items()},
        "round_total_s": totals,
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
    teacher, student, data, _ = pairs(shape, quick)["vision" if pair == "vision" else "causal"]
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    with tempfile.TemporaryDirectory() as scratch:
        short = {**shape, "lm_steps": 2, "lm_warmup": 0}  # the peak of a step is reached in the first two
        if pair == "causal":
            work = lambda: causal_trainer(kind, teacher, student, data, short, scratch).train()  # noqa: E731
        elif pair == "liger":
            work = lambda: liger_trainer(kind, teacher, student, data, short, scratch).train()  # noqa: E731
        elif pair == "on_policy":
            prompts = on_policy_data(data, shape)
            work = lambda: on_policy_trainer(kind, teacher, student, prompts, short, scratch).train()  # noqa: E731
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


PARTS = ("causal", "liger", "vision", "on_policy")


def liger_installed() -> bool:
    """Whether Liger Kernel is importable: it is not among hf_distill's extras (its package requires Triton, a 286 MB
    wheel its chunked losses do not use); `pip install --no-deps liger-kernel` is enough for the `liger` part."""
    from importlib.util import find_spec  # noqa: PLC0415

    return find_spec("liger_kernel") is not None


def default_parts() -> list[str]:
    return [part for part in PARTS if part != "liger" or liger_installed()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds (not a result)")
    parser.add_argument(
        "--only", choices=PARTS, nargs="+", default=default_parts(),
        help="measure these parts alone; the report keeps the other parts as peers.json last had them (by default "
        "every part, the liger one where Liger Kernel is installed)",
    )  # fmt: skip
    options = parser.parse_args()
    if "liger" in options.only and not liger_installed():
        parser.error("the liger part needs Liger Kernel: pip install --no-deps liger-kernel")
    shape = SHAPES["quick" if options.quick else "full"]
    started = time.perf_counter()
    built = pairs(shape, options.quick)
    timers = {"causal": time_causal, "liger": time_liger, "vision": time_vision, "on_policy": time_on_policy}
    results = {part: timers[part](built["vision" if part == "vision" else "causal"], shape) for part in options.only}
    del built
    # Peaks after every timing, so that no measuring process shares the machine with a timed step.
    kinds = {"causal": CAUSAL_KINDS, "liger": LIGER_KINDS, "vision": VISION_KINDS[:2], "on_policy": ON_POLICY_KINDS}
    cases = [f"{part}:{kind}" for part in options.only for kind in kinds[part]]
    for case, peak in measure_peaks(cases, options.quick).items():
        part, kind = case.split(":")
        results[part].setdefault("peak_bytes", {})[kind] = peak
    for part in ("causal", "liger", "vision"):
        if part in results:
            results[part]["loss_gap"] = relative_gap(results[part]["check_loss"])
    machine = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "versions": {name: version(name) for name in ("torch", "transformers", "trl", "accelerate", "hf_distill")},
        "shape": shape, "quick": options.quick, "seconds": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%d"), "parts": list(options.only),
    }  # fmt: skip
    for part in options.only:
        results[part]["measured"] = machine
    path = os.path.join(HERE, "peers.json")
    if (
        set(options.only) != set(default_parts()) and not options.quick
    ):  # the other parts as the last full report had them
        with open(path, encoding="utf-8") as handle:
            earlier = json.load(handle)["results"]
        for part in PARTS:  # each part kept says which run measured it
            if part in earlier and part not in results:
                earlier[part].setdefault("measured", earlier["machine"])
        results = {**earlier, **results}
    results["machine"] = machine
    ratios = peer_ratios(results)
    report = format_peers(results, ratios)  # formatted in --quick too, so a formatting slip shows up there
    if options.quick:
        print(report)
    else:
        with open(os.path.join(HERE, "PEERS.md"), "w", encoding="utf-8") as handle:
            handle.write(report)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"results": results, "ratios": ratios}, handle, indent=1)
    for name, gap, tolerance in (("causal", results.get("causal", {}).get("loss_gap"), LOSS_TOLERANCE),
                                 ("liger", results.get("liger", {}).get("loss_gap"), LOSS_TOLERANCE),
                                 ("vision", results.get("vision", {}).get("loss_gap"), VISION_TOLERANCE),
                                 ("vision start", results.get("vision", {}).get("start_loss_gap"), START_TOLERANCE)):  # fmt: skip
        if gap is not None and gap > tolerance:
            print(f"warning: the {name} contenders' losses differ by {gap:.2e} (> {tolerance})")
    print(json.dumps(ratios))


def peer_ratios(results: dict) -> dict:
    """hf_distill / peer for every part in `results`."""

    def against_trl(prefix: str, part: dict) -> dict:  # step and peak, against TRL and TRL at its default
        return {
            f"{prefix}_{what}_vs_{peer}": part[key]["hf_distill"] / part[key][peer]
            for peer in ("trl", "trl_default")
            for what, key in (("step", "step_s"), ("peak", "peak_bytes"))
        }

    ratios = against_trl("causal_lm", results["causal"]) if "causal" in results else {}
    if "vision" in results:
        vision = results["vision"]
        ratios.update({
            "vision_online_vs_guide": vision["step_s"]["hf_distill"] / vision["step_s"]["guide"],
            "vision_cached_3_epochs_vs_guide": vision["total_s"]["hf_distill_cached"] / vision["total_s"]["guide"],
            "vision_online_peak_vs_guide": vision["peak_bytes"]["hf_distill"] / vision["peak_bytes"]["guide"],
        })  # fmt: skip
    if "on_policy" in results:
        ratios.update(against_trl("on_policy", results["on_policy"]))
    if "liger" in results:
        liger = results["liger"]
        for peer, suffix in (("liger", ""), ("liger_eager", "_eager")):
            for what, key in (("step", "step_s"), ("peak", "peak_bytes")):
                ratios[f"causal_lm_{what}_vs_liger{suffix}"] = liger[key]["hf_distill"] / liger[key][peer]
    return ratios


def round_spread(part: dict, peer: str) -> tuple[float, float] | None:
    """The lowest and highest hf_distill / `peer` step ratio over a part's rounds (each round's medians)."""
    rounds = part.get("round_step_s")
    if not rounds:
        return None
    return spread([ours / theirs for ours, theirs in zip(rounds["hf_distill"], rounds[peer], strict=True)])


def spread(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


def spread_text(part: dict, peer: str) -> str:
    spread = round_spread(part, peer)
    if spread is None:
        return "not recorded"
    return f"{spread[0]:.3f}–{spread[1]:.3f} over {len(part['round_step_s'][peer])} rounds"


def format_peers(results: dict, ratios: dict) -> str:
    """PEERS.md's text: each part measured, with the facts of the run that measured it."""
    machine = results["machine"]
    lines = [
        "# hf_distill next to its peers",
        "",
        "Written by `python benchmarks/peers.py`. Random weights, fp32"
        + (" (bf16 autocast on the GPU)" if torch.cuda.is_available() else "")
        + ". Ratios are hf_distill / peer: below 1, hf_distill is faster or smaller.",
    ]
    sections = (("causal", causal_section), ("liger", liger_section), ("on_policy", on_policy_section),
                ("vision", vision_section))  # fmt: skip
    for part, section in sections:
        if part in results:
            lines += ["", *section(results[part], results[part].get("measured", machine))]
    lines += [
        "",
        *run.ratios_lines(
            "causal_lm_step_vs_trl <= 0.45, causal_lm_peak_vs_trl <= 0.60, causal_lm_step_vs_liger <= 1.0, "
            "causal_lm_peak_vs_liger <= 1.0, vision_online_vs_guide <= 0.95, "
            "vision_cached_3_epochs_vs_guide <= 0.60, on_policy_step_vs_trl <= 0.80, on_policy_peak_vs_trl <= 0.60",
            ratios,
        ),
    ]
    return "\n".join(lines) + "\n"


def measured_line(machine: dict) -> str:
    versions = ", ".join(f"{name} {value}" for name, value in machine["versions"].items())
    when = f" on {machine['date']}" if "date" in machine else ""
    return (
        f"Measured{when} on {machine['device']} ({machine['cpu_count']} cores, {machine['torch_threads']} torch "
        f"threads, {machine['platform']}), in a run of {machine['seconds']} s; {versions}."
    )


def section_head(title: str, machine: dict, columns: list[str]) -> list[str]:
    """A part's heading, the run that measured it, and its table's header."""
    return [
        f"## {title}", "", measured_line(machine), "",
        "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
    ]  # fmt: skip


def contender_rows(part: dict, kinds: tuple[str, ...], names: dict[str, str], spreads: bool) -> list[str]:
    """A causal part's table rows: median step, (with `spreads`, hf_distill / the contender per round,) timed steps,
    peak and check loss of each contender."""
    rows = []
    for kind in kinds:
        spread = [] if not spreads else ["" if kind == "hf_distill" else spread_text(part, kind)]
        cells = [names[kind], f"{part['step_s'][kind]:.3f}", *spread, str(part["steps"][kind]),
                 f"{part['peak_bytes'][kind] / 2**30:.3f}", f"{part['check_loss'][kind]:.6f}"]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def same_work(part: dict, shape: dict, warmup: str) -> str:
    """A causal part's closing sentence: the common start, the steps and rounds, and how far the check losses differ."""
    return (
        f"Every contender starts from the same student (JSD {part['initial_check_loss']:.6f} on the check batch) and "
        f"trains {shape['lm_steps'] + shape['lm_warmup']} steps per round ({shape['lm_warmup']} {warmup}) over "
        f"{shape['lm_rounds']} interleaved rounds; the check losses differ by {part['loss_gap']:.2e} (relative; "
        f"tolerance {LOSS_TOLERANCE})."
    )


def causal_section(causal: dict, machine: dict) -> list[str]:
    shape = machine["shape"]
    lines = section_head(
        f"Causal LM: GPT-2-small-shaped teacher (12 x 768, 50,257 tokens) -> 6 layers, batch {shape['lm_batch']} x "
        f"{shape['lm_length']} tokens",
        machine,
        ["contender", "median step (s)", "timed steps", "peak (GiB)", "JSD to the teacher after the steps"],
    )
    names = {"hf_distill": "hf_distill `DistillationTrainer` (`soft_target`, jsd, T = 1)",
             "trl": "TRL `GKDTrainer` (lmbda 0, beta 0.5, seq_kd off), gradient checkpointing off",
             "trl_default": "TRL `GKDTrainer`, the same at its default gradient checkpointing (on)"}  # fmt: skip
    lines += contender_rows(causal, CAUSAL_KINDS, names, spreads=False)
    return lines + [
        "",
        same_work(causal, shape, "warm-up")
        + f" hf_distill / TRL per round: {spread_text(causal, 'trl')}; at TRL's default: "
        f"{spread_text(causal, 'trl_default')}.",
    ]


def liger_section(liger: dict, machine: dict) -> list[str]:
    shape = machine["shape"]
    lines = section_head(
        f"Causal LM against Liger Kernel's fused linear JSD: the same pair, batch {shape['lm_batch']} x "
        f"{shape['lm_length']} tokens, 0.5 · CE + 0.5 · JSD (beta 0.5, T = 1)",
        machine,
        ["contender", "median step (s)", "hf_distill / it, per round", "timed steps", "peak (GiB)",
         "JSD to the teacher after the steps"],
    )  # fmt: skip
    names = {"hf_distill": "hf_distill `DistillationTrainer` (`soft_target` jsd 0.5, `hard_label` 0.5)",
             "liger": "`transformers.Trainer` + `LigerFusedLinearJSDLoss` (its defaults: compiled, chunk 1024)",
             "liger_eager": "the same with `compiled=False`"}  # fmt: skip
    lines += contender_rows(liger, LIGER_KINDS, names, spreads=True)
    return lines + [
        "",
        same_work(liger, shape, "warm-up, which holds Liger's compilation")
        + " Liger's peak includes what `torch.compile` holds in the process.",
    ]


def on_policy_section(on_policy: dict, machine: dict) -> list[str]:
    shape, gib = machine["shape"], 2**30
    prompt = shape["lm_length"] // 2
    lines = section_head(
        f"Causal LM on-policy: the same pair, batch {shape['lm_batch']}, prompts of {prompt} tokens, "
        f"{shape['lm_length'] - prompt} sampled",
        machine,
        ["contender", "median step (s)", "of which generating (s)", "the rest: teacher, loss, backward, update (s)",
         "timed steps", "peak (GiB)"],
    )  # fmt: skip
    names = {"hf_distill": "hf_distill (`lmbda=1`, `generalized_jsd` beta 0.5)",
             "trl": "TRL `GKDTrainer` (lmbda 1, beta 0.5), gradient checkpointing off",
             "trl_default": "TRL `GKDTrainer`, at its default gradient checkpointing (on: no KV cache in generation)"}  # fmt: skip
    for kind in ON_POLICY_KINDS:
        lines.append(
            f"| {names[kind]} | {on_policy['step_s'][kind]:.3f} | {on_policy['generation_s'][kind]:.3f} | "
            f"{on_policy['rest_s'][kind]:.3f} | {on_policy['steps'][kind]} | {on_policy['peak_bytes'][kind] / gib:.3f} |"
        )
    return lines + [
        "",
        "Both sample with temperature 1, top-k 0, top-p 1 and the same number of new tokens, from the same student "
        "weights at the start of every run; a random student rarely ends early, so both generate every token. "
        "Steps are timed from one optimizer step's end to the next; the generation column is the median time in "
        "`generate`, the rest is the step's median less it. The two losses on the same samples agree to 1e-5 "
        "(`tests/test_peers.py`).",
    ]


def vision_section(vision: dict, machine: dict) -> list[str]:
    shape, gib = machine["shape"], 2**30
    lines = section_head(
        f"Vision: ViT-base (patch 16) -> MobileNetV2-1.4, batch {shape['batch']} at {shape['image']} pixels",
        machine,
        ["contender", "median step (s)", "timed steps", "3 epochs end to end (s)", "peak (GiB)",
         "guide loss after 3 epochs"],
    )  # fmt: skip
    names = {"hf_distill": "hf_distill online", "guide": "vision guide's trainer",
             "hf_distill_cached": "hf_distill from its teacher cache (built in the run)"}  # fmt: skip
    for kind in VISION_KINDS:
        peak = vision.get("peak_bytes", {}).get(kind)
        lines.append(
            f"| {names[kind]} | {vision['step_s'][kind]:.3f} | {vision['steps'][kind]} | {vision['total_s'][kind]:.1f} | "
            f"{'-' if peak is None else f'{peak / gib:.3f}'} | {vision['check_loss'][kind]:.6f} |"
        )
    totals = vision.get("round_total_s")
    cached = "not recorded"
    if totals:
        low, high = spread([a / b for a, b in zip(totals["hf_distill_cached"], totals["guide"], strict=True)])
        cached = f"{low:.3f}–{high:.3f}"
    return lines + [
        "",
        f"hf_distill online / the guide per round (median steps): {spread_text(vision, 'guide')}; cached 3 epochs / "
        f"the guide per round (end to end): {cached}.",
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
    ]


if __name__ == "__main__":
    main()

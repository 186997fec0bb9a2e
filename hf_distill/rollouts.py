"""Where a causal-LM step's completions come from: the dataset, the student (on-policy) or the teacher (sequence-level).

    args = DistillationConfig(..., lmbda=1.0, rollout_generation={"max_new_tokens": 32, "temperature": 1.0},
                              losses={"soft_target": {"divergence": "generalized_jsd", "beta": 0.5}})

With `lmbda` > 0 (GKD's λ, Agarwal et al., 2024) each optimizer step, with probability λ, replaces the completions
of its batch by the student's own samples, so the student learns on the prefixes it will meet when it generates;
otherwise, with `seq_kd`, by the teacher's (sequence-level KD, Kim & Rush, 2016), otherwise it keeps the dataset's.
The draw is one per optimizer step, a function of `seed` and the step alone: the same on every process and on a
resumed run.

The prompt of an example is what precedes its first label that is not -100 (`labels` line up with `input_ids`, as
transformers' causal LMs take them); its completion is the rest. A generated completion ends at the first
end-of-sequence token (kept, as a label: the student learns to stop); anything after it is padding. The new batch
is right-padded, with `labels` -100 on the prompt and the padding, so every term counts completion tokens only, over
the whole accumulated (and global) batch. An encoder-decoder student (T5, BART: GKD's own experiments) keeps its
encoder inputs as the prompt and samples its decoder's: the new `labels` are the generated tokens after the decoder's
start token, -100 after the end, and the decoder inputs of both models are rebuilt from them.

Generation runs once per optimizer step, on the prompts of all its micro-batches together, the model in eval mode
(no dropout) with its KV cache, from a random stream drawn from `seed`, the step and the process (resuming
samples the same tokens), and with `synced_gpus` under DeepSpeed ZeRO-3 or FSDP, so a process whose samples end
early keeps stepping with the others. `RolloutBackend` is the interface a generation engine plugs into
(`GenerateBackend`, transformers' `generate`, is the default; docs/on-policy.md says what a vLLM one takes).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import GenerationConfig

from .model_kind import describe
from .randomness import preserved_random_state
from .teacher_sources import FrozenTeacher

#: What a step's completions can come from (the trainer's `completion_source` during that step).
SOURCES = ("data", "student", "teacher")
#: The keys a causal-LM batch may carry for rollouts (any other would not fit the generated sequences).
_BATCH_KEYS = frozenset({"input_ids", "attention_mask", "labels"})
#: An encoder-decoder's: its decoder inputs are rebuilt from the new labels.
_SEQ2SEQ_KEYS = _BATCH_KEYS | {"decoder_input_ids", "decoder_attention_mask"}
#: Sampling settings unless `rollout_generation` says otherwise (GKD's and TRL's: plain sampling at temperature 1).
DEFAULT_GENERATION = {"max_new_tokens": 128, "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def rollout_generation_config(value: GenerationConfig | Mapping[str, Any] | None) -> GenerationConfig:
    """A `GenerationConfig` from `rollout_generation` (a config, a mapping of its fields, or None for the defaults),
    with the KV cache on. Unknown fields are refused."""
    fields = value.to_diff_dict() if isinstance(value, GenerationConfig) else dict(value or {})
    fields.pop("transformers_version", None)
    unknown = sorted(key for key in fields if key not in GenerationConfig().to_dict())
    if unknown:
        raise ValueError(
            f"rollout_generation has fields GenerationConfig does not know: {unknown}; use its fields, such as "
            "max_new_tokens, temperature, top_k, top_p, do_sample"
        )
    fields = {**DEFAULT_GENERATION, **fields, "use_cache": True}
    new = fields["max_new_tokens"]
    if isinstance(new, bool) or not isinstance(new, int) or new < 1:
        raise ValueError(f"rollout_generation's max_new_tokens must be an integer >= 1, got {new!r}")
    try:
        config = GenerationConfig(**fields)
        config.validate(strict=True)
    except ValueError as error:
        raise ValueError(f"rollout_generation {fields}: {error}") from None
    return config


def draw_source(seed: int, step: int, lmbda: float, seq_kd: bool) -> str:
    """Where the completions of optimizer step `step` come from: `"student"` with probability `lmbda`, otherwise
    `"teacher"` with `seq_kd`, otherwise `"data"`. A function of (seed, step) alone."""
    if lmbda <= 0.0 and not seq_kd:
        return "data"
    draw = random.Random(f"hf_distill-rollout-{seed}-{step}").random()
    if draw < lmbda:
        return "student"
    return "teacher" if seq_kd else "data"


def generation_seed(seed: int, step: int, process: int) -> int:
    """The seed of a step's sampling on one process: the same on a resumed run, different on each process."""
    return random.Random(f"hf_distill-sampling-{seed}-{step}-{process}").getrandbits(63)


def split_prompts(batch: Mapping[str, Any]) -> list[torch.Tensor]:
    """Each example's prompt: its tokens (padding left out) before its first label that is not -100."""
    extra = sorted(key for key in batch if key not in _BATCH_KEYS)
    if extra:
        raise ValueError(
            f"on-policy and sequence-level distillation rebuild each batch from its prompts and new completions, so "
            f"the batch may hold only input_ids, attention_mask and labels, but it also has {extra}: drop those "
            "columns from the dataset (or the collator's output)"
        )
    if batch.get("labels") is None:
        raise ValueError(
            "lmbda > 0 or seq_kd needs labels: a prompt is what precedes an example's first label that is not -100; "
            "label the completion tokens and set the prompt's labels to -100"
        )
    input_ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    prompts = []
    for row in range(input_ids.shape[0]):
        labeled = (labels[row] != -100).nonzero()
        if labeled.numel() == 0:
            raise ValueError(
                f"an example (row {row} of a batch) has no label that is not -100, so it has no completion and no "
                "prompt: on-policy distillation needs each example's completion labeled"
            )
        start = int(labeled[0])
        if start == 0 or not mask[row, :start].any():
            raise ValueError(
                f"an example (row {row} of a batch) has a label at its first token, so its prompt is empty: set the "
                "prompt's labels to -100 (the prompt is what precedes the first label that is not -100)"
            )
        prompts.append(input_ids[row, :start][mask[row, :start]])
    return prompts


class RolloutBackend(Protocol):
    """How completions are generated: `generate(model, input_ids, attention_mask, generation_config, synced_gpus)`
    takes left-padded prompts `[batch, prompt_length]` and returns `[batch, prompt_length + new]` token ids (the
    prompts, then the new tokens, padded after each row's end); for an encoder-decoder, it takes the encoder inputs
    and returns the decoder's tokens, its start token first, as `generate` does. `model` is the unwrapped model that
    generates."""

    def generate(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generation_config: GenerationConfig,
        synced_gpus: bool,
    ) -> torch.Tensor: ...


class GenerateBackend:
    """transformers' `model.generate`, in the process that trains."""

    def generate(self, model, input_ids, attention_mask, generation_config, synced_gpus):
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config,
            synced_gpus=synced_gpus,
        )


@dataclass
class Rollouts:
    """What a trainer needs to replace a step's completions: the draw, the sampling and the new batches."""

    lmbda: float
    seq_kd: bool
    generation_config: GenerationConfig
    pad_token_id: int
    eos_token_ids: tuple[int, ...]
    backend: RolloutBackend
    #: An encoder-decoder student: the encoder inputs are the prompt, the decoder's tokens the completion.
    seq2seq: bool = False

    def source(self, seed: int, step: int) -> str:
        return draw_source(seed, step, self.lmbda, self.seq_kd)

    def replace(
        self,
        batches: Sequence[dict[str, Any]],
        model: nn.Module,
        seed: int,
        synced_gpus: bool,
        suppress: Sequence[int] = (),
    ) -> list[dict[str, Any]]:
        """The micro-batches of one step with their completions generated by `model` (all prompts in one call),
        each as large as it was; `suppress`: token ids never sampled (a teacher's tokens the student lacks)."""
        sizes = [int(batch["input_ids"].shape[0]) for batch in batches]
        if self.seq2seq:
            return self.replace_decoded(batches, sizes, model, seed, synced_gpus, suppress)
        prompts = [prompt for batch in batches for prompt in split_prompts(batch)]
        device = batches[0]["input_ids"].device
        completions = self.complete(model, prompts, seed, synced_gpus, device, suppress)
        out, start = [], 0
        for size in sizes:
            out.append(
                completed_batch(prompts[start : start + size], completions[start : start + size], self.pad_token_id)
            )
            start += size
        return out

    def replace_decoded(
        self,
        batches: Sequence[dict[str, Any]],
        sizes: list[int],
        model: nn.Module,
        seed: int,
        synced_gpus: bool,
        suppress: Sequence[int],
    ) -> list[dict[str, Any]]:
        """An encoder-decoder's micro-batches with new labels: its decoder's samples, from the encoder inputs of all
        of them at once (right-padded to the longest)."""
        for batch in batches:
            extra = sorted(key for key in batch if key not in _SEQ2SEQ_KEYS)
            if extra:
                raise ValueError(
                    f"on-policy and sequence-level distillation of an encoder-decoder rebuild each batch's labels, so "
                    f"the batch may hold only input_ids, attention_mask, labels and decoder inputs, but it also has "
                    f"{extra}: drop those columns from the dataset (or the collator's output)"
                )
        width = max(int(batch["input_ids"].shape[1]) for batch in batches)
        input_ids = torch.cat([nn.functional.pad(b["input_ids"], (0, width - b["input_ids"].shape[1]),
                                                 value=self.pad_token_id) for b in batches])  # fmt: skip
        masks = [b.get("attention_mask", torch.ones_like(b["input_ids"])) for b in batches]
        attention_mask = torch.cat([nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
        sequences = self.sample(model, input_ids, attention_mask, seed, synced_gpus, suppress)
        completions = [cut_after_end(row, self.eos_token_ids) for row in sequences[:, 1:]]  # after the start token
        out, start = [], 0
        for batch, size in zip(batches, sizes, strict=True):
            rows = completions[start : start + size]
            labels = torch.full((size, max(1, max(int(row.numel()) for row in rows))), -100, dtype=torch.long,
                                device=input_ids.device)  # fmt: skip
            for index, row in enumerate(rows):
                labels[index, : row.numel()] = row
            kept = {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch}
            out.append({**kept, "labels": labels})
            start += size
        return out

    def complete(
        self,
        model: nn.Module,
        prompts: list[torch.Tensor],
        seed: int,
        synced_gpus: bool,
        device: torch.device,
        suppress: Sequence[int] = (),
    ) -> list[torch.Tensor]:
        """Each prompt's sampled completion, cut after its first end-of-sequence token."""
        input_ids, attention_mask = left_padded(prompts, self.pad_token_id, device)
        sequences = self.sample(model, input_ids, attention_mask, seed, synced_gpus, suppress)
        new = sequences[:, input_ids.shape[1] :]
        return [cut_after_end(row, self.eos_token_ids) for row in new]

    def sample(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        seed: int,
        synced_gpus: bool,
        suppress: Sequence[int] = (),
    ) -> torch.Tensor:
        """What the backend generates from these inputs, in eval mode, from the random stream of `seed`."""
        config = self.generation_config
        if config.pad_token_id is None or config.eos_token_id is None or suppress:  # the model's, unless set
            config = GenerationConfig(**config.to_dict())
            if suppress:
                config.suppress_tokens = sorted({*(config.suppress_tokens or ()), *suppress})
            if config.pad_token_id is None:
                config.pad_token_id = self.pad_token_id
            if config.eos_token_id is None and self.eos_token_ids:
                config.eos_token_id = list(self.eos_token_ids)
        training = model.training
        model.eval()  # no dropout while sampling
        try:
            with preserved_random_state(), torch.no_grad():
                torch.manual_seed(seed)
                return self.backend.generate(model, input_ids, attention_mask, config, synced_gpus)
        finally:
            model.train(training)


def left_padded(prompts: Sequence[torch.Tensor], pad_token_id: int, device: torch.device):
    """Prompts of different lengths as one left-padded batch (generation continues every row at its end)."""
    length = max(int(prompt.numel()) for prompt in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        if prompt.numel():
            input_ids[row, -prompt.numel() :] = prompt
            attention_mask[row, -prompt.numel() :] = 1
    return input_ids, attention_mask


def cut_after_end(tokens: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """A generated row up to and including its first end-of-sequence token (all of it when there is none)."""
    if not eos_token_ids or tokens.numel() == 0:
        return tokens
    ends = torch.isin(tokens, torch.tensor(list(eos_token_ids), device=tokens.device)).nonzero()
    return tokens if ends.numel() == 0 else tokens[: int(ends[0]) + 1]


def completed_batch(
    prompts: Sequence[torch.Tensor], completions: Sequence[torch.Tensor], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """A right-padded batch of prompt + completion rows: `labels` are the completion tokens, -100 elsewhere."""
    lengths = [
        int(prompt.numel() + completion.numel()) for prompt, completion in zip(prompts, completions, strict=True)
    ]
    device = prompts[0].device
    input_ids = torch.full((len(prompts), max(lengths)), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        start, end = prompt.numel(), lengths[row]
        input_ids[row, :start] = prompt
        input_ids[row, start:end] = completion
        attention_mask[row, :end] = 1
        labels[row, start:end] = completion
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class RolloutMixin:
    """Replaces the completions of a step's micro-batches for `DistillationTrainer` (its `get_batch_samples` calls
    `_with_completions` before the items are counted). Reads the trainer's `args`, `model`, `roster`, `terms`,
    `state`, `accelerator` and `processing_class`."""

    #: Where the completions of the current optimizer step come from: "data", "student" or "teacher".
    completion_source: str = "data"
    rollouts: Rollouts | None = None

    def _set_up_rollouts(self, backend: RolloutBackend | None) -> None:
        student = self.accelerator.unwrap_model(self.model)
        sampler = next(iter(self._sampling_sources()), None)
        retokenizer = getattr(sampler, "retokenizer", None)
        if self.args.seq_kd and retokenizer is not None and not retokenizer.identical:
            raise ValueError(
                "seq_kd trains on the teacher's samples, written in the teacher's tokens, which the student cannot "
                "read: with a teacher of another tokenizer, train on the student's own samples (lmbda) or the "
                "dataset's completions (seq_kd=False)"
            )
        self.rollouts = build_rollouts(
            self.args, student, self._sampling_teachers(), self.terms.losses, self.processing_class, backend
        )

    def _sampling_sources(self) -> list[FrozenTeacher]:
        """The sources of the teachers in memory that can sample (`seq_kd` uses the first)."""
        return [source for source in self.roster.sources.values() if isinstance(source, FrozenTeacher)]

    def _sampling_teachers(self) -> list[nn.Module]:
        """The models of `_sampling_sources`."""
        return [source.model for source in self._sampling_sources()]

    def _with_completions(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The micro-batches of one optimizer step, their completions sampled from the student or the teacher when
        the step's draw says so: one generation for all of them."""
        step = self.state.global_step
        self.completion_source = self.rollouts.source(self.args.seed, step)
        if self.completion_source == "data":
            return batches
        model, suppress = self.model, ()
        if self.completion_source == "teacher":
            source = self._sampling_sources()[0]
            model, columns = source.model, source.columns
            if columns is not None:  # the teacher's tokens beyond the student's vocabulary are never sampled
                suppress = range(columns, source.reference.config.vocab_size)
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        synced = (zero3 or self.is_fsdp_enabled) and self.accelerator.num_processes > 1
        seed = generation_seed(self.args.seed, step, self.args.process_index)
        return self.rollouts.replace(batches, self.accelerator.unwrap_model(model), seed, synced, suppress)


def build_rollouts(
    args: Any,
    student: nn.Module,
    teachers: Sequence[nn.Module],
    losses: Mapping[str, Any],
    processing_class: Any,
    backend: RolloutBackend | None,
) -> Rollouts | None:
    """What replaces a step's completions under `args.lmbda` / `args.seq_kd` (None without either), after refusing
    what cannot work: a student that is not a causal LM, `seq_kd` without a teacher in memory (`teachers`), terms
    that all learn the dataset's completions only."""
    if not (args.lmbda > 0 or args.seq_kd):
        if backend is not None:
            raise ValueError("rollout_backend generates completions for lmbda > 0 or seq_kd; set one of them")
        return None
    kind = describe(student)
    if not (kind.causal_lm or kind.seq2seq):
        raise ValueError(
            f"lmbda and seq_kd sample completions from a causal LM or an encoder-decoder, but the student is a "
            f"{type(student).__name__}: set lmbda=0 and seq_kd=False, or distil a *ForCausalLM or "
            "*ForConditionalGeneration student"
        )
    if args.seq_kd and not teachers:
        raise ValueError("seq_kd samples completions from the teacher: pass teacher_model=(a causal LM)")
    if all(loss.dataset_completions_only for loss in losses.values()):
        raise ValueError(
            f"lmbda and seq_kd train on generated completions, but every term ({list(losses)}) learns the dataset's "
            "completions only: add a term that reads the teacher, such as soft_target"
        )
    pad, eos = special_tokens(student, processing_class)
    return Rollouts(
        lmbda=float(args.lmbda),
        seq_kd=args.seq_kd,
        generation_config=rollout_generation_config(args.rollout_generation),
        pad_token_id=pad,
        eos_token_ids=eos,
        backend=GenerateBackend() if backend is None else backend,
        seq2seq=kind.seq2seq,
    )


def special_tokens(model: nn.Module, processing_class: Any) -> tuple[int, tuple[int, ...]]:
    """The padding token and the end-of-sequence tokens generation uses: the model's generation config first, then
    its config, then the tokenizer's; the padding token falls back to the (first) end-of-sequence token."""
    sources = [getattr(model, "generation_config", None), getattr(model, "config", None), processing_class]
    sources += [getattr(processing_class, "tokenizer", None)]
    eos = next((s.eos_token_id for s in sources if getattr(s, "eos_token_id", None) is not None), None)
    pad = next((s.pad_token_id for s in sources if getattr(s, "pad_token_id", None) is not None), None)
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    if pad is None:
        if not eos_ids:
            raise ValueError(
                "on-policy and sequence-level distillation pad generated completions, but neither the student's "
                "generation config, its config nor the tokenizer names a pad_token_id or an eos_token_id: set "
                "model.generation_config.pad_token_id (and eos_token_id)"
            )
        pad = eos_ids[0]
    return int(pad), eos_ids

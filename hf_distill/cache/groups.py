"""A teacher cache for a teacher with another tokenizer (`uld`, `gold`): the aligned groups and the teacher's merged
distribution of each, in its own vocabulary.

Online, every batch is re-tokenized for the teacher and aligned into groups ([`hf_distill.alignment`]), and the
cross-tokenizer losses merge each group's distribution from the teacher's logits. A cache stores the result of both
for each training example, so a later run needs neither the teacher nor the re-tokenization:

- the alignment, from the student's side: each scored group's first and last token, as positions counted from the
  example's first real token (`group.start`, `group.stop`), so any padding of a later batch finds them again;
- for each (temperature, merge) a loss reads, the teacher's merged log-distribution of each group over the teacher's
  vocabulary: every column (`teacher_cache_top_k=0`, exact, or k at least the teacher's vocabulary), or the top k
  log-probabilities and their ids (`group.<i>.values`, `group.<i>.indices`) with the log of the group's whole mass
  (`group.<i>.log_mass`: a merged distribution sums to the probability of the group's other tokens, not to 1), the
  rest of that mass spread evenly over the other columns when read (an approximation, as the top-k rows of
  `soft_target`);
- with `hidden_state` beside them, each group's mean of the teacher's hidden states at the layers it reads
  (`group.hidden.<layer>`).

The record holds a hash of both tokenizers (`tokenizer_sha256`): the stored alignment holds for those two only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

from ..alignment import ALIGNMENT_KEY, Alignment, tokenizer_of
from ..losses.cross_tokenizer import group_log_probs

#: The smallest share of a top-k group's leftover mass given to each of its other columns (keeps the log finite).
_TINY = torch.finfo(torch.float32).tiny


def tokenizer_sha256(tokenizer: Any) -> str:
    """A hash of a tokenizer's vocabulary (every token and id) and its special tokens' ids."""
    tokenizer = tokenizer_of(tokenizer)
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text = json.dumps([sorted(tokenizer.get_vocab().items()), special, sorted(tokenizer.all_special_ids)])
    return hashlib.sha256(text.encode()).hexdigest()


def group_contents(losses: list[Any], retokenizer: Any, teacher: Any, top_k: int) -> dict[str, Any] | None:
    """The `groups` part of a cache's contents for the cross-tokenizer losses among `losses` (None without any):
    the (temperature, merge) pairs they read, the teacher's vocabulary width, the top k kept (None: every column),
    whether hidden states are stored as group means, and the two tokenizers' hashes."""
    readers = [loss for loss in losses if getattr(loss, "cross_tokenizer", False)]
    if not readers:
        return None
    width = int(teacher.config.vocab_size)
    dense = top_k <= 0 or top_k >= width
    variants = sorted({(float(loss.temperature), loss.merge) for loss in readers})
    return {
        "variants": [list(variant) for variant in variants],
        "width": width,
        "top_k": None if dense else int(top_k),
        "aligned_hidden": not retokenizer.identical and any(getattr(loss, "aligned", False) for loss in losses),
        "tokenizer_sha256": [tokenizer_sha256(retokenizer.student), tokenizer_sha256(retokenizer.teacher)],
    }


def groups_mismatch(stored: dict[str, Any] | None, needed: dict[str, Any] | None) -> list[str]:
    """Why a cache's `groups` cannot serve losses that need `needed` (empty when they can)."""
    if needed is None:
        return []
    if stored is None:
        return ["the cache holds no aligned groups of a teacher with another tokenizer (uld, gold)"]
    problems = []
    if stored["tokenizer_sha256"] != needed["tokenizer_sha256"]:
        problems.append("the student's or the teacher's tokenizer differs from the ones the cache was aligned with")
    for key in ("width", "top_k", "aligned_hidden"):
        if stored[key] != needed[key]:
            problems.append(f"groups {key} is {stored[key]} in the cache, {needed[key]} now")
    missing = [variant for variant in needed["variants"] if variant not in stored["variants"]]
    if missing:
        problems.append(f"the (temperature, merge) pairs {missing} are needed but the cache has {stored['variants']}")
    return problems


def _first_positions(inputs: Mapping[str, Any], examples: int, device: torch.device) -> torch.Tensor:
    """Each example's first real position (its left padding), from the attention mask."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.zeros(examples, dtype=torch.long, device=device)
    return mask.to(device).long().argmax(1)


@torch.no_grad()
def stored_groups(inputs: Mapping[str, Any], outputs: Any, contents: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What a shard keeps of a batch's aligned groups (see the module's docstring), from the teacher's outputs (which
    carry the batch's `Alignment`)."""
    groups = contents["groups"]
    alignment: Alignment = outputs[ALIGNMENT_KEY]
    examples, length = inputs["input_ids"].shape
    rows = alignment.student_rows.cpu()
    owner = torch.div(rows, length, rounding_mode="floor")
    sizes = torch.ones_like(rows)
    later = alignment.student_later.cpu()
    if later.numel():
        sizes = sizes.index_add(0, later[:, 2], torch.ones(later.shape[0], dtype=torch.long))
    start = rows % length + 1 - _first_positions(inputs, examples, torch.device("cpu"))[owner]
    stored = {
        "group_rows": torch.bincount(owner, minlength=examples),
        "group.start": start,
        "group.stop": start + sizes,
    }
    logits = outputs.logits
    teacher_rows, teacher_first, teacher_later = alignment.side("teacher")
    for index, (temperature, merge) in enumerate(groups["variants"]):
        log_probs = group_log_probs(logits, teacher_rows, teacher_later, temperature, teacher_first, merge).float()
        if groups["top_k"] is None:
            stored[f"group.{index}.log_probs"] = log_probs.cpu()
        else:
            values, indices = log_probs.topk(groups["top_k"], dim=-1)
            stored[f"group.{index}.values"], stored[f"group.{index}.indices"] = values.cpu(), indices.int().cpu()
            stored[f"group.{index}.log_mass"] = log_probs.logsumexp(-1).cpu()
    if groups["aligned_hidden"]:
        for layer in contents["hidden_layers"]:
            stored[f"group.hidden.{layer}"] = alignment.group_means(outputs.hidden_states[layer], "teacher").cpu()
    return stored


class GroupTargets:
    """A batch's cached groups: the student's side of the `alignment` (rebuilt from the batch's tokens), and the
    teacher's merged log-distribution of each group (`log_probs`)."""

    def __init__(self, gathered: dict[str, torch.Tensor], inputs: Mapping[str, Any], contents: dict[str, Any],
                 device: torch.device):  # fmt: skip
        self.contents, self.gathered, self.device = contents["groups"], gathered, device
        input_ids = inputs["input_ids"].to(device)
        examples, length = input_ids.shape
        counts = gathered["group_rows"].to(device).long()
        owner = torch.repeat_interleave(torch.arange(examples, device=device), counts)
        offset = owner * length + _first_positions(inputs, examples, device)[owner]
        first = gathered["group.start"].to(device).long()
        sizes = gathered["group.stop"].to(device).long() - first
        start = first + offset  # flat position of each group's first token
        count = start.numel()
        group = torch.repeat_interleave(torch.arange(count, device=device), sizes - 1)
        step = torch.arange(group.numel(), device=device) - torch.repeat_interleave(
            (sizes - 1).cumsum(0) - (sizes - 1), sizes - 1
        )
        token = start[group] + 1 + step  # flat position of each later token
        flat = input_ids.flatten()
        later = torch.stack([token - 1, flat[token], group], dim=-1).reshape(-1, 3)
        rows = start - 1
        nothing = torch.zeros(count, dtype=torch.long, device=device)
        self.alignment = Alignment(rows, nothing, later, torch.zeros((0, 3), dtype=torch.long, device=device),
                                   flat[start], nothing, teacher_grouped=True)  # fmt: skip

    def log_probs(self, temperature: float, merge: str) -> torch.Tensor:
        """The teacher's merged log-distribution of each group `[groups, teacher vocab]`."""
        variants = self.contents["variants"]
        if [float(temperature), merge] not in variants:
            raise ValueError(
                f"the teacher cache holds the teacher's groups for (temperature, merge) {variants}, not "
                f"{[temperature, merge]}: rebuild it with the losses you train with"
            )
        index = variants.index([float(temperature), merge])
        if self.contents["top_k"] is None:
            return self.gathered[f"group.{index}.log_probs"].to(self.device)
        values = self.gathered[f"group.{index}.values"].to(self.device)
        indices = self.gathered[f"group.{index}.indices"].to(self.device).long()
        mass = self.gathered[f"group.{index}.log_mass"].to(self.device).double().exp()
        width, k = self.contents["width"], values.shape[-1]
        rest = (mass - values.double().exp().sum(-1)).clamp(min=0.0) / (width - k)
        full = rest.clamp(min=_TINY).log().float()[:, None].expand(-1, width).clone()
        return full.scatter(-1, indices, values)

    def hidden_layers(self) -> dict[int, torch.Tensor]:
        """The teacher's group means at each cached layer (`[groups, width]`)."""
        prefix = "group.hidden."
        return {int(name[len(prefix):]): tensor.to(self.device)
                for name, tensor in self.gathered.items() if name.startswith(prefix)}  # fmt: skip

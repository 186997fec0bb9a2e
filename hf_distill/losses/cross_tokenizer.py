"""Losses between a causal-LM student and a teacher with another tokenizer, over aligned groups of tokens.

The teacher reads its own tokenization of the text and the two sequences are aligned into groups
([`hf_distill.alignment`]). For a group the student writes as tokens y_1..y_n, its distribution is merged from
its tokens: the distribution that predicts y_1 times the probability of each later token it wrote,
Q_g(v) = q(v | prefix) · Π_{k>1} q(y_k | prefix, y_<k) (Boizard et al.'s ULD and TRL's GOLD do the same); the
teacher's P_g likewise from its own tokens. Where both tokenizers write the group as one token this is the plain
next-token distribution. Q_g and P_g live in different vocabularies, so they are compared:

- `uld` (Boizard et al., 2024): the L1 distance between the two sorted in decreasing order, the shorter
  zero-padded to the longer vocabulary: Σ_r |sort↓(Q_g)_r − sort↓(P_g)_r|. It compares the shapes of the two
  distributions only: which token holds the mass does not enter.
- `gold` (the hybrid of TRL's GOLD): the tokens whose strings are in both vocabularies (the matched set M) are
  compared column to column by the generalized JSD with `beta` (on the matched columns' probabilities as they are,
  not renormalised, which stays ≥ 0 and is 0 only where they agree), times T²; the rest by ULD's sorted distance
  over the unmatched columns; weighted |M| / V_teacher and 1 − |M| / V_teacher (or `matched_weight`). With one
  tokenizer on both sides every token is matched and it is `soft_target` with `generalized_jsd`.

Each loss sums over the scored groups; its items are the student's predicted completion tokens, so with one
tokenizer (every group one token) it is the mean over tokens, and gradient accumulation and several processes
stay exact as for the other token-level terms. Groups the alignment cannot score (a teacher input cut shorter, a
tail where the two never end on the same byte) add nothing. A teacher cache stores the alignment and the teacher's
merged distributions ([`hf_distill.cache.groups`]).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..alignment import ALIGNMENT_KEY, Alignment, tokenizer_of
from ..model_kind import describe
from ..positions import logit_positions
from .base import DistillationLoss, TeacherEnsemble, register_loss
from .functional import Divergence

#: How a group's distribution is merged from its tokens (`group_log_probs`).
MERGES = ("first", "last")


def group_log_probs(
    logits: torch.Tensor,
    rows: torch.Tensor,
    later: torch.Tensor,
    temperature: float,
    first: torch.Tensor | None = None,
    merge: str = "first",
) -> torch.Tensor:
    """log of each group's merged distribution `[groups, vocab]`, at `temperature`. `rows`: the position predicting
    each group's first token (`first`), `later`: (position predicting it, token, group) of each later token, in order.

    `merge="first"`: the distribution over the first token times the probabilities of the later ones (TRL's
    "observed"); `"last"`: the distribution over the last token, given the ones before it, times their probabilities
    (TRL's "bayesian", the chain rule). One-token groups are the same either way."""
    flat = logits.flatten(0, -2)
    base, scalars = rows, later
    if merge == "last" and later.numel():
        count = rows.shape[0]
        order = torch.arange(later.shape[0], device=later.device)
        last = torch.full((count,), -1, dtype=torch.long, device=later.device)
        last = last.scatter_reduce(0, later[:, 2], order, reduce="amax")
        several = last >= 0
        base = torch.where(several, later[last.clamp(min=0), 0], rows)
        kept = torch.ones(later.shape[0], dtype=torch.bool, device=later.device)
        kept[last[several]] = False
        groups = torch.arange(count, device=rows.device)
        firsts = torch.stack([rows[several], first[several], groups[several]], dim=-1)
        scalars = torch.cat([firsts, later[kept]])
    merged = F.log_softmax(flat[base].float() / temperature, dim=-1)
    if scalars.numel():
        tokens = F.log_softmax(flat[scalars[:, 0]].float() / temperature, dim=-1)
        taken = tokens.gather(-1, scalars[:, 1:2]).squeeze(-1)
        offsets = torch.zeros(rows.shape[0], dtype=merged.dtype, device=merged.device)
        merged = merged + offsets.index_add(0, scalars[:, 2], taken)[:, None]
    return merged


def sorted_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Per row, Σ_r |sort↓(q)_r − sort↓(p)_r|, the narrower zero-padded to the wider (ULD)."""
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    student = F.pad(student_probs.sort(dim=-1, descending=True).values, (0, width - student_probs.shape[-1]))
    teacher = F.pad(teacher_probs.sort(dim=-1, descending=True).values, (0, width - teacher_probs.shape[-1]))
    return (student - teacher).abs().sum(-1)


def uld_loss(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """ULD's sorted L1 distance of every group, from the merged log-distributions."""
    return sorted_distance(student_log_probs.exp(), teacher_log_probs.exp())


def gold_loss(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    student_matched: torch.Tensor,
    teacher_matched: torch.Tensor,
    beta: float,
    matched_weight: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """GOLD's hybrid of every group: `matched_weight` × generalized JSD_β × T² over the matched columns (student
    column `student_matched[i]` against teacher column `teacher_matched[i]`), plus (1 − `matched_weight`) × the
    sorted distance over the other columns of each side."""
    total = torch.zeros(student_log_probs.shape[0], dtype=student_log_probs.dtype, device=student_log_probs.device)
    if student_matched.numel():
        divergence = Divergence("generalized_jsd", beta)
        jsd = divergence(student_log_probs[:, student_matched], teacher_log_probs[:, teacher_matched])
        total = total + matched_weight * temperature**2 * jsd
    student_rest = _others(student_log_probs.shape[-1], student_matched)
    teacher_rest = _others(teacher_log_probs.shape[-1], teacher_matched)
    if matched_weight < 1 and (student_rest.numel() or teacher_rest.numel()):
        rest = sorted_distance(student_log_probs[:, student_rest].exp(), teacher_log_probs[:, teacher_rest].exp())
        total = total + (1 - matched_weight) * rest
    return total


def _others(width: int, matched: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(width, dtype=torch.bool, device=matched.device)
    keep[matched] = False
    return keep.nonzero().squeeze(-1)


def matched_vocabulary(student_tokenizer: Any, teacher_tokenizer: Any, student_width: int, teacher_width: int):
    """The tokens whose strings are in both vocabularies, as (student ids, teacher ids), within each model's width."""
    student = tokenizer_of(student_tokenizer).get_vocab()
    teacher = tokenizer_of(teacher_tokenizer).get_vocab()
    pairs = sorted((student[token], index) for token, index in teacher.items() if token in student)
    pairs = [(mine, theirs) for mine, theirs in pairs if mine < student_width and theirs < teacher_width]
    return (
        torch.tensor([mine for mine, _ in pairs], dtype=torch.long),
        torch.tensor([theirs for _, theirs in pairs], dtype=torch.long),
    )


class CrossTokenizerLoss(DistillationLoss):
    """The part `uld` and `gold` share: the student's and teacher's groups, the items, the checks."""

    student_outputs = teacher_outputs = frozenset({"logits"})
    #: Read by the trainer: this loss takes a teacher with another tokenizer (its inputs re-tokenized and aligned).
    cross_tokenizer = True

    def __init__(self, temperature: float = 1.0, merge: str = "first"):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"{type(self).__name__} temperature must be a number > 0, got {temperature!r}")
        if merge not in MERGES:
            raise ValueError(f"{type(self).__name__} merge must be one of {MERGES}, got {merge!r}")
        self.temperature, self.merge = float(temperature), merge
        self.kind = None

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self.kind = describe(student)
        if not self.kind.causal_lm or (teacher is not None and not describe(teacher).causal_lm):
            raise ValueError(
                f"{self.term} distils a causal LM from a causal LM across tokenizers; the student is a "
                f"{type(student).__name__} and the teacher a {type(teacher).__name__}: for other models use "
                "soft_target with one tokenizer"
            )

    def count_items(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        return logit_positions(self.kind, inputs).sum().float()

    def groups(self, student_outputs: Any, teacher_outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(teacher_outputs, TeacherEnsemble):
            raise ValueError(
                f"{self.term} reads one teacher: with several teachers, give it a 'teacher' entry (one term per "
                "teacher, each with its own tokenizer)"
            )
        alignment = teacher_outputs.get(ALIGNMENT_KEY) if hasattr(teacher_outputs, "get") else None
        if not isinstance(alignment, Alignment):
            raise ValueError(
                f"{self.term}'s teacher outputs carry no token alignment: it is computed when the trainer knows both "
                "tokenizers (processing_class for the student's, teacher_processing_class for the teacher's)"
            )
        rows, first, later = alignment.side("student")
        student = group_log_probs(student_outputs.logits, rows, later, self.temperature, first, self.merge)
        cached = getattr(teacher_outputs, "group_targets", None)
        if cached is not None:  # a teacher cache: the teacher's groups as they were merged when it was built
            return student, cached.log_probs(self.temperature, self.merge)
        with torch.no_grad():
            rows, first, later = alignment.side("teacher")
            teacher = group_log_probs(
                teacher_outputs.logits.detach(), rows, later, self.temperature, first, self.merge
            )
        return student, teacher


@register_loss("uld")
class ULDLoss(CrossTokenizerLoss):
    """Universal Logit Distillation (Boizard et al., 2024) across tokenizers: per aligned group, the L1 distance
    between the student's and the teacher's merged distributions sorted in decreasing order
    ([`hf_distill.losses.cross_tokenizer`]).

    Options:
        temperature (`float`, defaults to 1.0): both distributions are softmaxes at this temperature.
        merge (`str`, defaults to `"first"`): a group's distribution is the one over its first token times the
            probabilities of the others (`"first"`), or the one over its last token times those of the ones before
            (`"last"`) ([`group_log_probs`]).
    """

    def forward(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        student, teacher = self.groups(student_outputs, teacher_outputs)
        return uld_loss(student, teacher).sum()


@register_loss("gold")
class GOLDLoss(CrossTokenizerLoss):
    """GOLD's hybrid across tokenizers (TRL's `GOLDTrainer`): per aligned group, the generalized JSD over the tokens
    both vocabularies hold and ULD's sorted distance over the rest ([`hf_distill.losses.cross_tokenizer`]).

    Options:
        temperature (`float`, defaults to 1.0): both distributions are softmaxes at this temperature; the JSD part is
            multiplied by T², as `soft_target`.
        beta (`float`, defaults to 0.5): the generalized JSD's weight of the teacher (0: forward KL, 1: reverse KL).
        matched_weight (`float`, *optional*): the weight of the matched part, in [0, 1]; by default the share of
            the teacher's vocabulary that is matched, |M| / V_teacher (the rest weighs 1 − that).
        merge (`str`, defaults to `"first"`): as for `uld`.
    """

    def __init__(
        self, temperature: float = 1.0, beta: float = 0.5, matched_weight: float | None = None, merge: str = "first"
    ):
        super().__init__(temperature, merge)
        Divergence("generalized_jsd", beta)  # refuses a beta outside [0, 1]
        if matched_weight is not None and (
            isinstance(matched_weight, bool) or not isinstance(matched_weight, (int, float))
            or not 0 <= matched_weight <= 1
        ):  # fmt: skip
            raise ValueError(f"gold matched_weight must be a number in [0, 1] (or unset), got {matched_weight!r}")
        self.beta, self.matched_weight = float(beta), matched_weight
        self.register_buffer("student_matched", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("teacher_matched", torch.zeros(0, dtype=torch.long), persistent=False)
        self.weight_matched = 1.0

    def match(self, student_tokenizer: Any, teacher_tokenizer: Any, student_width: int, teacher_width: int) -> None:
        """Set the matched columns from the two tokenizers (the trainer calls it once both are known)."""
        mine, theirs = matched_vocabulary(student_tokenizer, teacher_tokenizer, student_width, teacher_width)
        self.student_matched = mine.to(self.student_matched.device)
        self.teacher_matched = theirs.to(self.teacher_matched.device)
        share = len(theirs) / teacher_width
        self.weight_matched = share if self.matched_weight is None else float(self.matched_weight)

    def forward(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        student, teacher = self.groups(student_outputs, teacher_outputs)
        matched = (self.student_matched.to(student.device), self.teacher_matched.to(student.device))
        return gold_loss(student, teacher, *matched, self.beta, self.weight_matched, self.temperature).sum()

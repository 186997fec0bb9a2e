"""A teacher with its own tokenizer: the student's batch re-tokenized for it, and the two token sequences aligned.

The teacher cannot read the student's token ids, so it gets its own tokenization of the same text. For each
example the student's prompt (the tokens before the first label) and completion (the rest) are decoded to text
separately, and each is encoded with the teacher's tokenizer (the prompt with its special tokens, the completion
without; the teacher's end-of-sequence token follows when the student's completion ends with its own). Both
completions are then aligned by their UTF-8 byte offsets into groups: a group closes where both tokenizations end a
token on the same byte, so each group is a piece of text that one model writes as `n` tokens and the other as `m`
(1:1 where the two tokenizers agree). Special tokens are zero-width; an end-of-sequence token on both sides is a
group of its own.

    retokenizer = Retokenizer(student_tokenizer, teacher_tokenizer, max_length=teacher.config.n_positions)
    teacher_inputs, alignment = retokenizer(inputs)  # input_ids / attention_mask for the teacher, and the groups

A group is scored where both models predict its first token from a position before it (the prompt or an earlier
group): `alignment.student_rows` / `teacher_rows` are those positions, flattened over the batch, and
`student_later` / `teacher_later` the (position, token, group) of each later token of a group, whose probability
multiplies the group's distribution (`hf_distill.losses.cross_tokenizer`).

Byte offsets: the teacher's come from its tokenizer's offset mapping (characters, turned into bytes). The student's
tokens are the ones given (a data set's, or the student's own samples, which need not be how its tokenizer would
encode the text): when encoding the decoded text gives them back, its offsets are used; otherwise each token's end
is measured by decoding the tokens up to it. A token that ends inside a multi-byte character (byte-level BPE) never
closes a group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .model_kind import ModelKind
from .positions import logit_positions

#: The key of a cross-tokenizer teacher's outputs that holds the batch's `Alignment`.
ALIGNMENT_KEY = "alignment"
#: How the positions of a causal LM's loss are counted (`logit_positions`).
_CAUSAL_LM = ModelKind("causal LM", causal_lm=True, language_model=True)
#: Decoding and encoding flags that keep the text exactly as the tokens spell it.
_DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer of a tokenizer or of a processor holding one."""
    inner = getattr(processor, "tokenizer", None)
    return processor if callable(getattr(processor, "get_vocab", None)) or inner is None else inner


def same_tokenizer(student: Any, teacher: Any) -> bool:
    """Whether two tokenizers map every token to the same id and share their special tokens."""
    student, teacher = tokenizer_of(student), tokenizer_of(teacher)
    return student.get_vocab() == teacher.get_vocab() and all(
        getattr(student, name, None) == getattr(teacher, name, None)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    )


def _byte_ends(text: str, char_ends: Sequence[int]) -> list[int]:
    """Character offsets into `text` as UTF-8 byte offsets."""
    prefix = [0]
    for character in text:
        prefix.append(prefix[-1] + len(character.encode("utf-8")))
    return [prefix[end] for end in char_ends]


def _closable_by_ends(ends: Sequence[int]) -> list[bool]:
    """Tokens that share an end offset split one character: only the last of them can close a group."""
    return [index == len(ends) - 1 or ends[index + 1] != end for index, end in enumerate(ends)]


@dataclass
class Spans:
    """A token sequence's byte ends (zero-width for special tokens) and which of its tokens may close a group."""

    ends: list[int]
    closable: list[bool]


def encoded_spans(tokenizer: Any, text: str, special: set[int], add_special_tokens: bool = False):
    """`text` encoded by `tokenizer`: its ids and their `Spans`."""
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), [tuple(pair) for pair in encoding["offset_mapping"]]
    content = [index for index, token in enumerate(ids) if token not in special]
    ends = _byte_ends(text, [offsets[index][1] for index in content])
    closable = _closable_by_ends(ends)
    return ids, _merge_special(len(ids), content, ends, closable)


def _merge_special(length: int, content: list[int], ends: list[int], closable: list[bool]) -> Spans:
    """Spans of a whole sequence from its content tokens' spans: a special token ends where the text before it ends
    and may close a group (an end-of-sequence token is a group of its own)."""
    all_ends, all_closable, position, last = [], [], 0, 0
    for index in range(length):
        if position < len(content) and content[position] == index:
            last = ends[position]
            all_ends.append(last)
            all_closable.append(closable[position])
            position += 1
        else:
            all_ends.append(last)
            all_closable.append(True)
    return Spans(all_ends, all_closable)


def given_spans(tokenizer: Any, ids: Sequence[int], special: set[int]) -> tuple[str, Spans]:
    """The text of the tokens `ids` and their `Spans`: from encoding the text again when that gives them back, else
    by decoding them one prefix at a time."""
    ids = list(ids)
    text = tokenizer.decode(ids, **_DECODE)
    content_ids = [token for token in ids if token not in special]
    encoded, spans = encoded_spans(tokenizer, text, special)
    if [token for token in encoded if token not in special] == content_ids:
        content_spans = [end for token, end in zip(encoded, spans.ends, strict=True) if token not in special]
        content_closable = [flag for token, flag in zip(encoded, spans.closable, strict=True) if token not in special]
    else:  # not how the tokenizer would write this text (a sample): measure each token by decoding up to it
        data = text.encode("utf-8")
        content_spans, content_closable = [], []
        for index in range(1, len(content_ids) + 1):
            prefix = tokenizer.decode(content_ids[:index], **_DECODE).encode("utf-8")
            whole = data.startswith(prefix) and not prefix.endswith("\ufffd".encode())
            content_spans.append(len(prefix) if whole else (content_spans[-1] if content_spans else 0))
            content_closable.append(whole)
        if content_closable:
            content_closable[-1] = content_spans[-1] == len(data)
    content = [index for index, token in enumerate(ids) if token not in special]
    return text, _merge_special(len(ids), content, content_spans, content_closable)


def align(student: Spans, teacher: Spans) -> list[tuple[range, range]]:
    """Groups of (student tokens, teacher tokens), each closing where both sides end a closable token on the same
    byte; tokens after the last such point are in no group."""
    groups, i, j, start_i, start_j = [], 0, 0, 0, 0
    while i < len(student.ends) and j < len(teacher.ends):
        mine, theirs = student.ends[i], teacher.ends[j]
        if mine == theirs and student.closable[i] and teacher.closable[j]:
            groups.append((range(start_i, i + 1), range(start_j, j + 1)))
            i, j = i + 1, j + 1
            start_i, start_j = i, j
        elif mine < theirs or (mine == theirs and not student.closable[i]):
            i += 1
        else:
            j += 1
    return groups


@dataclass
class Alignment:
    """A batch's groups, as flat indices into the two models' `[batch, length]` positions.

    Attributes:
        student_rows, teacher_rows (`torch.Tensor`, `[groups]`): the position whose distribution predicts each
            group's first token.
        student_later, teacher_later (`torch.Tensor`, `[n, 3]`): (position, token, group) of each later token, in
            order within each group.
        student_first, teacher_first (`torch.Tensor`, `[groups]`): each group's first token.
        groups (`list[list[tuple[range, range]]]`): each example's scored groups (student, teacher token indices).
        teacher_grouped (`bool`): the teacher's side is already one row per group (read from a teacher cache): its
            outputs need no merging, and `group_means` returns its rows as they are.
    """

    student_rows: torch.Tensor
    teacher_rows: torch.Tensor
    student_later: torch.Tensor
    teacher_later: torch.Tensor
    student_first: torch.Tensor
    teacher_first: torch.Tensor
    groups: list[list[tuple[range, range]]] = field(default_factory=list)
    teacher_grouped: bool = False

    @property
    def count(self) -> int:
        return int(self.student_rows.numel())

    def group_means(self, hidden: torch.Tensor, side: str) -> torch.Tensor:
        """`[groups, width]`: the mean of `hidden` (`[batch, length, width]`, one side's) over each group's tokens."""
        if side == "teacher" and self.teacher_grouped:
            return hidden
        rows, _, later = self.side(side)
        groups = torch.arange(rows.numel(), device=rows.device)
        positions = torch.cat([rows + 1, later[:, 0] + 1])  # a group's tokens follow the positions predicting them
        owners = torch.cat([groups, later[:, 2]])
        flat = hidden.flatten(0, -2)
        sums = torch.zeros(rows.numel(), flat.shape[-1], dtype=flat.dtype, device=flat.device)
        sums = sums.index_add(0, owners, flat[positions])
        counts = torch.zeros(rows.numel(), dtype=flat.dtype, device=flat.device).index_add(
            0, owners, torch.ones_like(owners, dtype=flat.dtype)
        )
        return sums / counts[:, None]

    def to(self, device: torch.device) -> Alignment:
        names = ("student_rows", "teacher_rows", "student_later", "teacher_later", "student_first", "teacher_first")
        return Alignment(**{name: getattr(self, name).to(device) for name in names}, groups=self.groups,
                         teacher_grouped=self.teacher_grouped)  # fmt: skip

    def side(self, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One side's (rows, first tokens, later tokens)."""
        return getattr(self, f"{side}_rows"), getattr(self, f"{side}_first"), getattr(self, f"{side}_later")


def teacher_retokenizer(
    student: Any, teacher: Any, losses: Sequence[Any], student_tokenizer: Any, teacher_tokenizer: Any, name: str
) -> Retokenizer | None:
    """The `Retokenizer` of teacher `name` when the losses that read it distil across tokenizers (`uld`, `gold`),
    after checking that all of them do and that both tokenizers are known; None when none of them does. A loss that
    matches vocabularies (`gold`) is told the two tokenizers here."""
    cross = [loss for loss in losses if getattr(loss, "cross_tokenizer", False)]
    if not cross:
        return None
    terms = [loss.term for loss in cross]
    if student_tokenizer is None or teacher_tokenizer is None:
        raise ValueError(
            f"{terms} distil across tokenizers and need both: pass the student's tokenizer as processing_class and "
            f"the teacher's as teacher_processing_class (read from the teacher's folder when {name!r} is given as a "
            "path or Hub id)"
        )
    identical = same_tokenizer(student_tokenizer, teacher_tokenizer)
    others = [loss.term for loss in losses if not getattr(loss, "cross_tokenizer", False)
              and "logits" in getattr(loss, "teacher_outputs", ())]  # fmt: skip
    if others and not identical:
        raise ValueError(
            f"teacher {name!r} has another tokenizer than the student's, which {terms} handle, but {others} read its "
            "logits position by position as if it shared the student's: use uld or gold for every logit term of "
            "this teacher"
        )
    readers = [loss.term for loss in losses if not getattr(loss, "cross_tokenizer", False)
               and not hasattr(loss, "align_groups") and getattr(loss, "teacher_outputs", ())]  # fmt: skip
    if readers and not identical:
        raise ValueError(
            f"{readers} read teacher {name!r}'s attention maps or relations, which are not aligned across "
            f"tokenizers: with a teacher of another tokenizer, use {terms} and hidden_state (over aligned groups)"
        )
    for loss in losses:
        if hasattr(loss, "align_groups") and not identical:
            loss.align_groups()
    student_width, teacher_width = student.config.vocab_size, teacher.config.vocab_size
    for loss in cross:
        match = getattr(loss, "match", None)
        if match is not None:
            match(student_tokenizer, teacher_tokenizer, student_width, teacher_width)
    limit = getattr(teacher.config, "max_position_embeddings", None) or getattr(teacher.config, "n_positions", None)
    return Retokenizer(student_tokenizer, teacher_tokenizer, limit, identical=identical)


class Retokenizer:
    """The student's batches for a teacher with another tokenizer (see the module's docstring).

    Args:
        student_tokenizer, teacher_tokenizer: the two tokenizers (or processors holding them).
        max_length (`int`, *optional*): the teacher's longest input; longer rows are cut, and the groups past the cut
            are not scored.
        identical (`bool`): both tokenizers are the same: the teacher reads the student's inputs as they are, and each
            predicted completion token is a group of its own.
    """

    def __init__(
        self, student_tokenizer: Any, teacher_tokenizer: Any, max_length: int | None = None, identical: bool = False
    ):
        self.student, self.teacher = tokenizer_of(student_tokenizer), tokenizer_of(teacher_tokenizer)
        self.identical = identical
        for side, tokenizer in (("student", self.student), ("teacher", self.teacher)):
            if not getattr(tokenizer, "is_fast", False):
                raise ValueError(
                    f"the {side}'s tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer: aligning two "
                    "tokenizations needs their offset mappings; load it with use_fast=True"
                )
        self.max_length = max_length
        self.student_special = set(self.student.all_special_ids)
        self.teacher_special = set(self.teacher.all_special_ids)
        pad = self.teacher.pad_token_id
        self.teacher_pad = pad if pad is not None else (self.teacher.eos_token_id or 0)

    def __call__(self, inputs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], Alignment]:
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        labels = inputs.get("labels")
        if self.identical:
            return self.same(inputs)
        rows, per_example = [], []
        for row in range(input_ids.shape[0]):
            keep = mask[row].bool() if mask is not None else torch.ones_like(input_ids[row], dtype=torch.bool)
            positions = keep.nonzero().squeeze(-1)
            ids = input_ids[row, positions].tolist()
            if labels is not None:
                labeled = (labels[row, positions] != -100).nonzero()
                start = int(labeled[0]) if labeled.numel() else len(ids)
            else:
                start = 0
            teacher_ids, groups = self.example(ids, start)
            offset = int(positions[0]) if positions.numel() else 0  # left padding shifts the student's positions
            rows.append(teacher_ids)
            per_example.append([(range(s.start + offset, s.stop + offset), t) for s, t in groups])
        return self.batch(rows, per_example, input_ids)

    def same(self, inputs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], Alignment]:
        """One tokenizer: the student's inputs, and a group for each position a causal LM's loss counts."""
        positions = logit_positions(_CAUSAL_LM, inputs).flatten().nonzero().squeeze(-1)
        empty = torch.zeros((0, 3), dtype=torch.long, device=positions.device)
        first = inputs["input_ids"].flatten()[positions + 1]
        teacher_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask") if key in inputs}
        return teacher_inputs, Alignment(positions, positions, empty, empty, first, first)

    def example(self, ids: list[int], start: int) -> tuple[list[int], list[tuple[range, range]]]:
        """One example: the teacher's ids, and the groups of the completion (`ids[start:]`) with a position before
        them on both sides, as indices into `ids` and into the teacher's ids."""
        if start == 0 and ids and ids[0] in self.student_special:
            start = 1  # a leading special token (BOS) is read, never predicted: the prompt
        prompt_text = self.student.decode(ids[:start], **_DECODE)
        prompt_ids = list(self.teacher(prompt_text, add_special_tokens=True)["input_ids"]) if start else []
        text, student_spans = given_spans(self.student, ids[start:], self.student_special)
        completion_ids, teacher_spans = encoded_spans(self.teacher, text, self.teacher_special)
        ends_with_eos = ids and ids[-1] == self.student.eos_token_id and len(ids) > start
        if ends_with_eos and self.teacher.eos_token_id is not None:
            completion_ids = [*completion_ids, self.teacher.eos_token_id]
            teacher_spans.ends.append(teacher_spans.ends[-1] if teacher_spans.ends else 0)
            teacher_spans.closable.append(True)
        teacher_ids = list(prompt_ids) + completion_ids
        if self.max_length is not None:
            teacher_ids = teacher_ids[: self.max_length]
        groups = []
        for mine, theirs in align(student_spans, teacher_spans):
            mine = range(mine.start + start, mine.stop + start)
            theirs = range(theirs.start + len(prompt_ids), theirs.stop + len(prompt_ids))
            if mine.start >= 1 and theirs.start >= 1 and theirs.stop <= len(teacher_ids):
                groups.append((mine, theirs))
        return teacher_ids, groups

    def batch(
        self, rows: list[list[int]], per_example: list[list[tuple[range, range]]], input_ids: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], Alignment]:
        """The teacher's padded batch and the groups as flat indices."""
        student_length, device = input_ids.shape[1], input_ids.device
        width = max((len(row) for row in rows), default=1) or 1
        teacher_ids = torch.full((len(rows), width), self.teacher_pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            teacher_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[index, : len(row)] = 1
        student_rows, teacher_rows, student_later, teacher_later, student_first, teacher_first = [], [], [], [], [], []
        for example, groups in enumerate(per_example):
            for mine, theirs in groups:
                group = len(student_rows)
                student_rows.append(example * student_length + mine.start - 1)
                teacher_rows.append(example * width + theirs.start - 1)
                student_first.append(int(input_ids[example, mine.start]))
                teacher_first.append(int(teacher_ids[example, theirs.start]))
                student_later += [(example * student_length + k - 1, int(input_ids[example, k]), group)
                                  for k in mine[1:]]  # fmt: skip
                teacher_later += [(example * width + k - 1, int(teacher_ids[example, k]), group) for k in theirs[1:]]
        alignment = Alignment(
            torch.tensor(student_rows, dtype=torch.long),
            torch.tensor(teacher_rows, dtype=torch.long),
            torch.tensor(student_later, dtype=torch.long).reshape(-1, 3),
            torch.tensor(teacher_later, dtype=torch.long).reshape(-1, 3),
            torch.tensor(student_first, dtype=torch.long),
            torch.tensor(teacher_first, dtype=torch.long),
            per_example,
        )
        teacher_inputs = {"input_ids": teacher_ids.to(device), "attention_mask": attention.to(device)}
        return teacher_inputs, alignment.to(device)

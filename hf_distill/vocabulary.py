"""A teacher whose vocabulary is the student's plus more: padding rows of its embedding table, or tokens added after
the student's (chat markers, a tokenizer extended for another language) that the student never produces.

The teacher reads the student's `input_ids` unchanged (every id the student writes means the same token to it), and
its logits are cut to the student's columns, so every loss sees one vocabulary: the teacher's distribution is
renormalised over the shared ids (a softmax over the first `columns` logits), the mass it gives its extra tokens left
out. Where the teacher's projection is deferred to the losses, the cut is of its weight's rows: no extra work.

This is decided from the two tokenizers, never from the sizes alone: the student's tokens must keep their ids in the
teacher's tokenizer, and the teacher may have no other token among the student's ids.

    columns = shared_columns(student, teacher, student_tokenizer, teacher_tokenizer)  # None: same width
    outputs = cut_logits(outputs, columns)  # the teacher's outputs, logits over the student's vocabulary
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from .alignment import tokenizer_of
from .logit_rows import ProjectedRows

#: The columns of the teacher whose losses are being set up (`teacher_columns`); None: all of them.
_SETUP_COLUMNS: ContextVar[int | None] = ContextVar("hf_distill_teacher_columns", default=None)
#: Special tokens that must mean the same to both tokenizers when the student has them.
SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "cls_token_id", "sep_token_id",
                  "mask_token_id")  # fmt: skip
PASS_TOKENIZERS = (
    "pass the student's tokenizer as processing_class and the teacher's as teacher_processing_class (it is read from "
    "the teacher's folder when the teacher is given as a path or Hub id)"
)


def shared_columns(student: nn.Module, teacher: Any, student_tokenizer: Any, teacher_tokenizer: Any) -> int | None:
    """The student's vocabulary size when the teacher's vocabulary extends it (a language model teacher's logits are
    then cut to it); None when both have the same size. A `ValueError` that says what to do for any other pair."""
    width = getattr(getattr(student, "config", None), "vocab_size", None)
    teacher_width = getattr(getattr(teacher, "config", None), "vocab_size", None)
    if width is None or teacher_width is None or width == teacher_width:
        return None
    if width > teacher_width:
        raise ValueError(
            f"the student's vocabulary has {width} entries and the teacher's {teacher_width}: the student reads or "
            f"predicts ids the teacher has no embedding or logit for. If both use one tokenizer, resize the student's "
            f"embeddings to the teacher's (student.resize_token_embeddings({teacher_width})); for two different "
            "tokenizers, distil a causal LM with the uld or gold loss (docs/cross-tokenizer.md)"
        )
    if student_tokenizer is None or teacher_tokenizer is None:
        raise ValueError(
            f"the teacher's vocabulary has {teacher_width} entries and the student's {width}: to distil over the "
            f"student's vocabulary (the teacher's extra entries left out), hf_distill checks that the student's ids "
            f"mean the same tokens to the teacher's tokenizer: {PASS_TOKENIZERS}"
        )
    student_vocab, teacher_vocab = _vocab(student_tokenizer), _vocab(teacher_tokenizer)
    moved = [(token, index, teacher_vocab.get(token)) for token, index in student_vocab.items()
             if teacher_vocab.get(token) != index]  # fmt: skip
    if moved:
        shown = ", ".join(f"{token!r} {index} (student) vs {other} (teacher)" for token, index, other in sorted(
            moved, key=lambda item: item[1])[:5])  # fmt: skip
        raise ValueError(
            f"the student's tokens do not keep their ids in the teacher's tokenizer ({len(moved)} differ, e.g. "
            f"{shown}), so the teacher would read other words: distil from a teacher whose tokenizer extends the "
            "student's, or, for causal LMs, the uld or gold loss, which re-tokenize the text for the teacher"
        )
    among = sorted((index, token) for token, index in teacher_vocab.items() if index < width and token not in
                   student_vocab)  # fmt: skip
    if among:
        raise ValueError(
            f"the teacher's tokenizer has tokens among the student's ids that the student's has not (e.g. "
            f"{among[:5]}): its extra tokens are not all after the student's {width} columns, so its logits cannot "
            "be cut to the student's vocabulary; use a teacher whose tokenizer extends the student's"
        )
    for name in SPECIAL_TOKENS:
        mine, theirs = getattr(student_tokenizer, name, None), getattr(teacher_tokenizer, name, None)
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(
                f"the student's tokenizer has {name} {mine} and the teacher's {theirs}: set the same special token in "
                "both (the teacher reads the student's inputs)"
            )
    return width


def _vocab(tokenizer: Any) -> dict[str, int]:
    """The token -> id mapping of a tokenizer or of a processor holding one."""
    source = tokenizer_of(tokenizer)
    if source is None or not callable(getattr(source, "get_vocab", None)):
        raise ValueError(f"a {type(tokenizer).__name__} has no get_vocab(): {PASS_TOKENIZERS}")
    return dict(source.get_vocab())


def cut_logits(outputs: Any, columns: int | None) -> Any:
    """`outputs` with `logits` (a tensor or deferred `ProjectedRows`) cut to their first `columns` entries."""
    logits = getattr(outputs, "logits", None) if columns is not None else None
    if isinstance(logits, ProjectedRows):
        bias = None if logits.bias is None else logits.bias[:columns]
        outputs["logits"] = ProjectedRows(logits.hidden, logits.weight[:columns], bias)
    elif isinstance(logits, torch.Tensor) and logits.shape[-1] > columns:
        outputs["logits"] = logits[..., :columns]
    return outputs


@contextmanager
def teacher_columns(columns: int | None) -> Iterator[None]:
    """While the losses are set up against a teacher whose logits are cut to `columns` (see `setup_columns`)."""
    token = _SETUP_COLUMNS.set(columns)
    try:
        yield
    finally:
        _SETUP_COLUMNS.reset(token)


def setup_columns(teacher: Any) -> int | None:
    """The teacher's logit width as the losses being set up will see it: cut to the student's, or its own."""
    columns = _SETUP_COLUMNS.get()
    return columns if columns is not None else getattr(getattr(teacher, "config", None), "vocab_size", None)

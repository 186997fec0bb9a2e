"""Aligning two tokenizations of one text (hf_distill.alignment), on tokenizers built here whose splits are known."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from hf_distill.alignment import Retokenizer, align, encoded_spans, given_spans

LETTERS = [*"abcdefghijklmnopqrstuvwxyz =+"]


def pieces_tokenizer(pieces: list[str], bos: bool = True, eos: str | None = "</s>") -> PreTrainedTokenizerFast:
    """A tokenizer whose tokens are `pieces` (the longest first) and the single characters among them."""
    special = ["<pad>", "<s>", *([eos] if eos else [])]
    vocab = {token: index for index, token in enumerate([*special, *dict.fromkeys(pieces)])}
    pattern = "|".join(re.escape(piece) for piece in sorted(vocab, key=len, reverse=True) if piece not in special)
    model = Tokenizer(models.WordLevel(vocab, unk_token=None))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    model.decoder = decoders.Fuse()
    if bos:
        model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", bos_token="<s>", eos_token=eos)


def byte_tokenizer(merges: tuple[tuple[str, str], ...] = ()) -> PreTrainedTokenizerFast:
    """Byte-level, with `merges` only: a character of n UTF-8 bytes is n tokens unless merged."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    merged = ["".join(pair) for pair in merges]
    vocab = {token: index for index, token in enumerate(["<pad>", "<s>", "</s>", *sorted(alphabet), *merged])}
    model = Tokenizer(models.BPE(vocab, list(merges)))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


WORDS = pieces_tokenizer(["hel", "lo", " wor", "ld", *LETTERS, "é", "😀"])
CHARACTERS = pieces_tokenizer([*LETTERS, "é", "😀"])


def groups_of(student, teacher, text: str) -> list[tuple[list[str], list[str]]]:
    """The groups of `text` as each tokenizer encodes it, as token strings."""
    special_s, special_t = set(student.all_special_ids), set(teacher.all_special_ids)
    ids_s, spans_s = encoded_spans(student, text, special_s)
    ids_t, spans_t = encoded_spans(teacher, text, special_t)
    return [
        (
            student.convert_ids_to_tokens([ids_s[i] for i in mine]),
            teacher.convert_ids_to_tokens([ids_t[j] for j in theirs]),
        )
        for mine, theirs in align(spans_s, spans_t)
    ]


def test_words_split_differently_group_where_both_tokenizers_end_a_token_on_the_same_byte():
    assert groups_of(WORDS, CHARACTERS, "hello world") == [
        (["hel"], ["h", "e", "l"]), (["lo"], ["l", "o"]), ([" wor"], [" ", "w", "o", "r"]), (["ld"], ["l", "d"])
    ]  # fmt: skip
    # Splits that cross: "ab|c" against "a|bc" close only at the end.
    left, right = pieces_tokenizer(["ab", *LETTERS]), pieces_tokenizer(["bc", *LETTERS])
    assert groups_of(left, right, "abcab") == [(["ab", "c"], ["a", "bc"]), (["ab"], ["a", "b"])]


def test_a_multi_byte_character_split_over_byte_tokens_is_one_group():
    """é is 2 UTF-8 bytes and 😀 4: byte-level tokens that end inside them close no group."""
    groups = groups_of(CHARACTERS, byte_tokenizer(), "é😀a")
    assert [(len(mine), len(theirs)) for mine, theirs in groups] == [(1, 2), (1, 4), (1, 1)]
    # The byte tokens' ends: both halves of é end on its last byte, and only the second may close.
    _, spans = encoded_spans(byte_tokenizer(), "é😀a", set())
    assert spans.ends == [2, 2, 6, 6, 6, 6, 7] and spans.closable == [False, True, False, False, False, True, True]


def test_tokens_that_are_not_how_the_tokenizer_would_write_the_text_are_measured_by_decoding():
    """A student's sample "h e l lo" (its tokenizer would write "hel lo") and byte tokens cut inside a character."""
    ids = WORDS.convert_tokens_to_ids(["h", "e", "l", "lo"])
    text, spans = given_spans(WORDS, ids, set(WORDS.all_special_ids))
    assert text == "hello" and spans.ends == [1, 2, 3, 5] and all(spans.closable)
    # Byte-level with é's two bytes merged: a sample that writes them as two tokens (as sampling may).
    tokens = byte_tokenizer(merges=(("Ã", "©"),))
    assert tokens.convert_ids_to_tokens(tokens("aé", add_special_tokens=False)["input_ids"]) == ["a", "Ã©"]
    text, spans = given_spans(tokens, tokens.convert_tokens_to_ids(["a", "Ã", "©"]), set())
    assert text == "aé" and spans.ends == [1, 1, 3] and spans.closable == [True, False, True]


def batch_of(tokenizer, prompts: list[str], completions: list[str], left: bool = False) -> dict[str, torch.Tensor]:
    """Prompt (with special tokens) + completion + EOS, labels on the completion, padded."""
    rows = []
    for prompt, completion in zip(prompts, completions, strict=True):
        head = tokenizer(prompt)["input_ids"]
        tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((head + tail, [-100] * len(head) + tail))
    width = max(len(ids) for ids, _ in rows)
    batch = {name: torch.full((len(rows), width), fill) for name, fill in
             (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0), ("labels", -100))}  # fmt: skip
    for index, (ids, labels) in enumerate(rows):
        place = slice(width - len(ids), width) if left else slice(0, len(ids))
        batch["input_ids"][index, place] = torch.tensor(ids)
        batch["attention_mask"][index, place] = 1
        batch["labels"][index, place] = torch.tensor(labels)
    return batch


@pytest.mark.parametrize("left", [False, True])
def test_the_teacher_reads_its_own_tokens_and_each_group_is_predicted_from_the_position_before_it(left):
    """Prompt "ab=", completion "hello": the teacher gets <s> a b = h e l l o </s>; the groups are the completion's
    and the end-of-sequence tokens'; each is predicted from the position before its first token on both sides."""
    batch = batch_of(WORDS, ["ab=", "a="], ["hello", "lo"], left=left)
    teacher_inputs, alignment = Retokenizer(WORDS, CHARACTERS)(batch)
    teacher = CHARACTERS.batch_decode(teacher_inputs["input_ids"])
    assert teacher[0].replace("<pad>", "") == "<s>ab=hello</s>"
    assert teacher[1].replace("<pad>", "") == "<s>a=lo</s>"
    assert teacher_inputs["attention_mask"].sum(-1).tolist() == [10, 6]
    shift = batch["input_ids"].shape[1] - 7 if left else 0  # the student's first row: <s> a b = hel lo </s>
    first = alignment.groups[0]
    assert [(list(mine), list(theirs)) for mine, theirs in first] == [
        ([4 + shift], [4, 5, 6]), ([5 + shift], [7, 8]), ([6 + shift], [9])
    ]  # fmt: skip
    width_s, width_t = batch["input_ids"].shape[1], teacher_inputs["input_ids"].shape[1]
    assert alignment.student_rows.tolist()[:3] == [3 + shift, 4 + shift, 5 + shift]
    assert alignment.teacher_rows.tolist()[:3] == [3, 6, 8]
    # The later tokens of a group: (position before them, the token, the group), flat over the batch.
    later = alignment.teacher_later.tolist()
    assert later[:3] == [[4, CHARACTERS.convert_tokens_to_ids("e"), 0], [5, CHARACTERS.convert_tokens_to_ids("l"), 0],
                         [7, CHARACTERS.convert_tokens_to_ids("o"), 1]]  # fmt: skip
    second = alignment.groups[1]
    assert [len(theirs) for _, theirs in second] == [2, 1] and alignment.student_later.numel() == 0
    assert alignment.count == 5 and width_t == 10 and alignment.teacher_rows.max() < 2 * width_t
    assert alignment.student_rows.max() < 2 * width_s


def test_a_teacher_input_cut_shorter_scores_only_the_groups_before_the_cut():
    batch = batch_of(WORDS, ["ab="], ["hello world"])
    _, whole = Retokenizer(WORDS, CHARACTERS)(batch)
    _, cut = Retokenizer(WORDS, CHARACTERS, max_length=9)(batch)  # <s> a b = h e l l o | " world</s>" cut off
    assert [len(theirs) for _, theirs in whole.groups[0]] == [3, 2, 4, 2, 1]
    assert [len(theirs) for _, theirs in cut.groups[0]] == [3, 2]


def test_a_student_completion_cut_inside_a_word_aligns_what_is_there():
    ids = WORDS("ab=")["input_ids"] + WORDS.convert_tokens_to_ids(["hel"])
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "labels": torch.tensor([[-100] * 4 + ids[4:]])}  # fmt: skip
    inputs, alignment = Retokenizer(WORDS, CHARACTERS)(batch)
    assert CHARACTERS.decode(inputs["input_ids"][0]) == "<s>ab=hel" and len(alignment.groups[0]) == 1


def test_a_teacher_without_an_end_of_sequence_token_leaves_the_students_unscored():
    plain = pieces_tokenizer([*LETTERS], eos=None)
    batch = batch_of(WORDS, ["a="], ["lo"])
    inputs, alignment = Retokenizer(WORDS, plain)(batch)
    assert plain.decode(inputs["input_ids"][0]) == "<s>a=lo" and len(alignment.groups[0]) == 1


def test_one_tokenizer_on_both_sides_gives_the_students_inputs_and_a_group_per_counted_position():
    batch = batch_of(WORDS, ["ab=", "a="], ["hello", "lo"])
    inputs, alignment = Retokenizer(WORDS, WORDS, identical=True)(batch)
    assert inputs["input_ids"] is batch["input_ids"]
    width = batch["input_ids"].shape[1]
    expected = [3, 4, 5] + [width + 2, width + 3]  # the positions before each completion token and </s>
    assert alignment.student_rows.tolist() == alignment.teacher_rows.tolist() == expected
    # Aligning the two tokenizations would give the same groups.
    _, aligned = Retokenizer(WORDS, WORDS)(batch)
    assert aligned.student_rows.tolist() == aligned.teacher_rows.tolist() == expected


def test_slow_tokenizers_are_refused_with_the_fix():
    class Slow:
        is_fast = False

        def get_vocab(self):
            return {}

    with pytest.raises(ValueError, match="use_fast=True"):
        Retokenizer(Slow(), CHARACTERS)

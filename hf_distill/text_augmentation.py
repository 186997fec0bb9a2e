"""Contextual word replacement (TinyBERT's data augmentation, Jiao et al., 2020), built once and saved.

    mlm, tokenizer = load_masked_lm("path/to/masked-lm")
    copies = word_replacement(train, "text", mlm, tokenizer, WordReplacement(rate=0.4, candidates=15, copies=20))
    train = with_transfer_set(train, copies)   # the copies carry no label: the teacher supplies their targets

Each word of an example gets up to `candidates` replacements: for a word the masked LM's tokenizer keeps in one
piece, the masked LM's top predictions with that word masked (the rest of the example as context); for a word
of several pieces, its nearest whole words by the cosine of their input embeddings (the mean of the pieces'),
where TinyBERT uses GloVe neighbours. Each copy then replaces each word, with probability `rate`, by one of its
candidates drawn at random (capitalised where the word was). Only alphabetic words are replaced; punctuation
and numbers stay.

The candidates cost one masked-LM forward per replaceable word, whatever the number of copies; the copies come
from `seed` alone, so the same settings give the same set. `build_word_replacement` saves the set and reuses it
when the texts, the masked LM's weights and the settings match, so that a teacher-output cache built on it
stays valid across runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, load_from_disk
from tqdm.auto import tqdm
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .cache.teacher_cache import weights_sha256
from .logit_rows import project_rows, supports_rows
from .saving import staged_folder

logger = logging.getLogger(__name__)

#: The record a saved set is recognised by, written last into its folder.
RECORD_NAME = "word_replacement.json"
# Word-start markers of SentencePiece and byte-level BPE vocabularies; WordPiece marks the other pieces ("##").
_WORD_START_MARKS = ("▁", "Ġ")


@dataclass(frozen=True)
class WordReplacement:
    """Settings of contextual word replacement.

    Args:
        rate (`float`): the probability that a copy replaces a word (TinyBERT: 0.4).
        candidates (`int`): replacements considered per word (TinyBERT: K = 15).
        copies (`int`): augmented copies per example (TinyBERT: 20).
        seed (`int`): draws the replacements; the same seed gives the same copies.
        max_length (`int`): tokens of context the masked LM sees; words beyond it are never replaced.
        batch_size (`int`): masked sequences per masked-LM forward.
    """

    rate: float = 0.4
    candidates: int = 15
    copies: int = 20
    seed: int = 42
    max_length: int = 128
    batch_size: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 < self.rate <= 1:
            raise ValueError(f"word replacement rate must be in (0, 1] (TinyBERT: 0.4), got {self.rate!r}")
        for name in ("candidates", "copies", "max_length", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"word replacement {name} must be an integer >= 1, got {value!r}")


def load_masked_lm(name_or_path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A masked LM and its fast tokenizer, from a folder or a Hub id (safetensors only).

    Refused: a model without a masked-LM head, and a checkpoint that lacks any of the head's weights (a sentence
    encoder, say), whose candidates would come from random weights.
    """
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(
            name_or_path, output_loading_info=True, use_safetensors=True
        )
    except ValueError as error:
        raise ValueError(
            f"{name_or_path!r} cannot load as a masked LM ({error}): word replacement needs a masked LM (BERT, "
            "RoBERTa, ...) to propose words; give a masked-LM folder or Hub id"
        ) from error
    if info["missing_keys"]:
        raise ValueError(
            f"{name_or_path!r} has no trained masked-LM head: {sorted(info['missing_keys'])} are not in its checkpoint, "
            "so its word candidates would be random. Give a masked LM whose head is trained, or train one first "
            "(e.g. `hf-distill --recipe minilm-mlm`, whose teacher lands in <output_dir>/teacher)"
        )
    return model.eval(), masked_lm_tokenizer(name_or_path)


def masked_lm_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The masked LM's tokenizer, which must be a fast one with a mask token (for word boundaries and offsets)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if not tokenizer.is_fast or tokenizer.mask_token_id is None:
        raise ValueError(
            f"the tokenizer of {name_or_path!r} is not a fast tokenizer with a mask token, which word replacement "
            "needs for word boundaries; give a masked LM with a tokenizer.json"
        )
    return tokenizer


def _whole_words(tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, list[str]]:
    """Which vocabulary entries are a whole alphabetic word (a boolean mask), and every entry as text."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    marked = any(token.startswith(_WORD_START_MARKS) for token in tokens if token)
    special = set(tokenizer.all_special_ids)
    words, keep = [], []
    for index, token in enumerate(tokens):
        token = token or ""
        starts = token.startswith(_WORD_START_MARKS) if marked else not token.startswith("##")
        word = token.lstrip("".join(_WORD_START_MARKS)) if marked else token
        words.append(word)
        keep.append(starts and word.isalpha() and index not in special)
    return torch.tensor(keep), words


def _words(tokenizer: PreTrainedTokenizerBase, text: str) -> list[tuple[str, tuple[int, int]]]:
    """The words of `text` as the tokenizer splits them (before its sub-word model), with their character spans."""
    return tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)


def replacement_candidates(
    texts: list[str], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: WordReplacement
) -> list[list[tuple[tuple[int, int], list[str]]]]:
    """Per text, its replaceable words: `(character span, candidate words)`, the candidates best first."""
    whole, vocabulary = _whole_words(tokenizer)
    embeddings = model.get_input_embeddings().weight.detach()
    neighbours = torch.nn.functional.normalize(embeddings[whole].float(), dim=-1)
    neighbour_ids = whole.nonzero().squeeze(-1)
    # (text, word, input ids with the word masked, its position, its token)
    masked: list[tuple[int, int, list[int], int, int]] = []
    found: list[list[tuple[tuple[int, int], list[str]]]] = []
    for text_index, text in enumerate(texts):
        words = _words(tokenizer, text)
        encoded = tokenizer([word for word, _ in words], is_split_into_words=True, truncation=True,
                            max_length=settings.max_length)  # fmt: skip
        pieces: dict[int, list[int]] = {}
        for position, word_index in enumerate(encoded.word_ids()):
            if word_index is not None:
                pieces.setdefault(word_index, []).append(position)
        spans = []
        for word_index, (word, span) in enumerate(words):
            if word_index not in pieces or not word.isalpha():
                continue
            positions = pieces[word_index]
            if len(positions) == 1:
                ids = list(encoded.input_ids)
                ids[positions[0]] = tokenizer.mask_token_id
                masked.append((text_index, len(spans), ids, positions[0], encoded.input_ids[positions[0]]))
                spans.append((span, []))
            else:  # several pieces: the whole words nearest to their mean input embedding
                vector = embeddings[[encoded.input_ids[p] for p in positions]].float().mean(0)
                similarity = neighbours @ torch.nn.functional.normalize(vector, dim=0)
                order = neighbour_ids[similarity.topk(min(settings.candidates + 1, len(similarity))).indices].tolist()
                choices = [vocabulary[i] for i in order if vocabulary[i] != word.lower()]
                spans.append((span, choices[: settings.candidates]))
        found.append(spans)
    excluded = ~whole
    compact = supports_rows(model)
    device = next(model.parameters()).device
    masked.sort(key=lambda item: len(item[2]))  # similar lengths share a batch: little padding
    batches = range(0, len(masked), settings.batch_size)
    with torch.no_grad():
        for start in tqdm(batches, desc="Word replacement: masked-LM candidates", unit="batch"):
            batch = masked[start : start + settings.batch_size]
            length = max(len(ids) for _, _, ids, *_ in batch)
            input_ids = torch.full((len(batch), length), tokenizer.pad_token_id or 0, dtype=torch.long)
            for row, (_, _, ids, *_) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
            lengths = torch.tensor([len(ids) for _, _, ids, *_ in batch])
            attention_mask = (torch.arange(length) < lengths[:, None]).long()
            padded = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
            rows = torch.zeros_like(input_ids, dtype=torch.bool)
            rows[torch.arange(len(batch)), torch.tensor([position for *_, position, _ in batch])] = True
            with project_rows(model, rows if compact else None):
                logits = model(**padded).logits
            logits = (logits if compact else logits[rows]).float()
            logits[:, excluded.to(logits.device)] = float("-inf")
            original = torch.tensor([token for *_, token in batch], device=logits.device)
            logits[torch.arange(len(batch)), original] = float("-inf")
            best = logits.topk(min(settings.candidates, logits.shape[-1]), dim=-1)
            for (text_index, word, *_), ids, scores in zip(
                batch, best.indices.tolist(), best.values.tolist(), strict=True
            ):
                found[text_index][word][1].extend(
                    vocabulary[i] for i, score in zip(ids, scores, strict=True) if score > -1e30
                )
    return found


def replaced_copies(
    texts: list[str], candidates: list[list[tuple[tuple[int, int], list[str]]]], settings: WordReplacement
) -> list[str]:
    """`settings.copies` copies of each text (text-major order), each word replaced with probability `rate`."""
    generator = np.random.default_rng(settings.seed)
    copies = []
    for text, words in zip(texts, candidates, strict=True):
        for _ in range(settings.copies):
            pieces, end = [], 0
            for (start, stop), choices in words:
                if choices and generator.random() < settings.rate:
                    choice = choices[generator.integers(len(choices))]
                    pieces += [text[end:start], choice.capitalize() if text[start].isupper() else choice]
                    end = stop
            copies.append("".join(pieces) + text[end:])
    return copies


def word_replacement(
    dataset: Dataset,
    text_column: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: WordReplacement | None = None,
) -> Dataset:
    """The augmented copies of `dataset[text_column]`: a data set of that one column, `settings.copies` rows per
    example in the examples' order (copy `i` comes from example `i // copies`)."""
    return _copies(_texts(dataset, text_column), text_column, model, tokenizer, settings or WordReplacement())


def _texts(dataset: Dataset, text_column: str) -> list[str]:
    if text_column not in dataset.column_names:
        raise ValueError(f"word replacement: no {text_column!r} column (columns: {dataset.column_names})")
    return list(dataset[text_column])


def _copies(
    texts: list[str],
    text_column: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: WordReplacement,
) -> Dataset:
    found = replacement_candidates(texts, model, tokenizer, settings)
    return Dataset.from_dict({text_column: replaced_copies(texts, found, settings)})


def _record(texts: list[str], model: PreTrainedModel, settings: WordReplacement) -> dict[str, Any]:
    return {
        "texts_sha256": hashlib.sha256("\0".join(texts).encode()).hexdigest(),
        "num_texts": len(texts),
        "masked_lm_sha256": weights_sha256(model),
        "settings": asdict(settings),
    }


def build_word_replacement(
    dataset: Dataset,
    text_column: str,
    masked_lm: str,
    settings: WordReplacement | None = None,
    save_dir: str | None = None,
) -> Dataset:
    """`word_replacement` with the masked LM `masked_lm` (a folder or Hub id), saved in `save_dir` and reused from
    there when the texts, the masked LM's weights and the settings are the ones it was built with.

    A set built for other texts or settings in `save_dir` is replaced; the folder is written whole or not at all.
    """
    settings = settings or WordReplacement()
    texts = _texts(dataset, text_column)  # before the masked LM loads: a wrong column fails at once
    model, tokenizer = load_masked_lm(masked_lm)
    record = _record(texts, model, settings)
    saved_path = None if save_dir is None else os.path.join(save_dir, RECORD_NAME)
    if saved_path is not None and os.path.exists(saved_path):
        with open(saved_path, encoding="utf-8") as handle:
            if json.load(handle) == record:
                logger.info("Word replacement: reusing the %s copies saved in %s", settings.copies, save_dir)
                return load_from_disk(save_dir)
        logger.info("Word replacement: the set in %s was built for other texts or settings; rebuilding", save_dir)
    copies = _copies(texts, text_column, model, tokenizer, settings)
    if save_dir is not None:
        with staged_folder(save_dir, last=(RECORD_NAME,)) as staging:
            copies.save_to_disk(staging)
            with open(os.path.join(staging, RECORD_NAME), "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=1)
        # The saved set, as a later run reuses it: the same data-set fingerprint, so a teacher cache keyed on it holds.
        copies = load_from_disk(save_dir)
    return copies

"""Tiny local stand-ins for what the recipes load from the Hub: teachers, tokenizers and data sets on disk."""

from __future__ import annotations

import os

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from helpers import VOCAB, bert_config
from transformers import BertForMaskedLM, BertModel, BertTokenizer, MobileNetV2Config, ViTImageProcessor

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Alphabetic, so that word replacement (which replaces only alphabetic words) has words to replace.
WORDS = [f"w{chr(97 + index // 26)}{chr(97 + index % 26)}" for index in range(VOCAB - len(SPECIAL))]
GOOD, BAD = WORDS[:20], WORDS[20:40]


def write_tokenizer(folder: str) -> BertTokenizer:
    """A WordPiece tokenizer over the tiny models' 64-token vocabulary."""
    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=32)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_encoder_teacher(folder: str, layers: int = 4) -> str:
    """A pretrained-encoder-like teacher: a BERT encoder with no task head, plus its tokenizer."""
    torch.manual_seed(0)
    BertModel(bert_config(layers=layers), add_pooling_layer=False).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def write_masked_lm_teacher(folder: str, layers: int = 4) -> str:
    """A teacher with its masked-LM head (nothing to train first), plus its tokenizer."""
    torch.manual_seed(0)
    BertForMaskedLM(bert_config(layers=layers)).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def write_sentiment_dataset(folder: str, size: int = 48) -> str:
    """A saved DatasetDict whose label is whether the words come from the GOOD or the BAD list."""
    generator = np.random.default_rng(0)
    rows = {"text": [], "label": []}
    for index in range(size):
        words = GOOD if index % 2 else BAD
        rows["text"].append(" ".join(generator.choice(words, size=int(generator.integers(3, 10)))))
        rows["label"].append(index % 2)
    features = Features({"text": Value("string"), "label": ClassLabel(names=["bad", "good"])})
    data = Dataset.from_dict(rows, features=features)
    data.train_test_split(test_size=0.25, seed=0).save_to_disk(folder)
    return folder


def write_text_files(folder: str, lines: int = 60) -> str:
    """Two plain text files of word sequences (masked-LM data); returns a glob matching both."""
    os.makedirs(folder, exist_ok=True)
    generator = np.random.default_rng(1)
    for part in range(2):
        with open(os.path.join(folder, f"part{part}.txt"), "w", encoding="utf-8") as handle:
            for _ in range(lines // 2):
                handle.write(" ".join(generator.choice(WORDS, size=int(generator.integers(4, 12)))) + "\n")
            handle.write("\n")  # an empty line, as raw corpora have
    return os.path.join(folder, "*.txt")


def write_image_dataset(folder: str, size: int = 36) -> str:
    """A saved DatasetDict of 28x28 grey images in 3 classes, told apart by brightness."""
    generator = np.random.default_rng(2)
    labels = [index % 3 for index in range(size)]
    images = [np.clip(generator.normal(60 + 70 * label, 20, (28, 28)), 0, 255).astype(np.uint8) for label in labels]
    features = Features({"image": Image(), "label": ClassLabel(names=["dark", "grey", "light"])})
    splits = Dataset.from_dict({"image": images, "label": labels}, features=features).train_test_split(0.25, seed=0)
    DatasetDict(train=splits["train"], test=splits["test"]).save_to_disk(folder)
    return folder


def write_mobilenet_config(folder: str) -> str:
    """A MobileNetV2 config folder, as `google/mobilenet_v2_1.4_224` holds one (smaller)."""
    MobileNetV2Config(depth_multiplier=0.35, image_size=32).save_pretrained(folder)
    return folder


def write_vit_processor(folder: str) -> str:
    """An image processor folder, as a Hub ViT teacher holds one."""
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


TINY_VIT = {
    "model_type": "vit",
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}

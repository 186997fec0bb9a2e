"""Stage 0: the data, tokenised or turned into pixels once, with the collators each task trains and tests with.

    data = prepare_data(args.data_settings, seed=42)   # PreparedData: train / teacher_train / eval splits, collators

Causal LM: prompt + completion examples, labels on the completion alone ([`hf_distill.pipeline.causal`]).

Masked LM: training batches are masked afresh by `DataCollatorForLanguageModeling`; the held-out split is
masked once, with a fixed seed, so that teacher, student and baseline are scored on the same masked tokens.
With a teacher cache the training split is masked once too (`fix_training_masks`): the teacher's cached
outputs belong to one masking of each example.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, concatenate_datasets
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    DefaultDataCollator,
)
from transformers.utils import is_torchvision_available

from ..augmentation import augmented_image_copies
from ..text_augmentation import build_word_replacement
from ..transfer import with_transfer_set
from . import causal
from .settings import CAUSAL_LM, IMAGE_CLASSIFICATION, MASKED_LM, TEXT_CLASSIFICATION, UNUSED_EXAMPLES, DataSettings
from .sources import load_raw_dataset, resolve_model

# Held-out share carved from the training split when a data set has no validation or test split.
_CARVED_EVAL_FRACTION = 0.1


@dataclass
class PreparedData:
    """Everything the stages need to know about the data, ready for `Trainer`s."""

    task: str
    processor: Any
    train: Dataset
    teacher_train: Dataset
    eval: Dataset
    train_collator: Any
    eval_collator: Any
    label_names: list[str] | None
    image_size: int | None = None
    #: `train` followed by the transfer set's examples (label -100), when there is a transfer set.
    train_with_transfer: Dataset | None = None
    #: How many of the transfer examples are augmented copies of `train`'s examples (word replacement, images).
    augmented_examples: int = 0
    #: The settings the data was prepared with.
    settings: DataSettings | None = None
    #: Causal LM: the held-out prompt and completion texts, in `eval`'s order, for scoring generated completions.
    eval_references: Dataset | None = None
    #: Causal LM with a teacher of another tokenizer (`--teacher_processor`): the same splits in the teacher's tokens,
    #: which the teacher trains and is scored on.
    teacher_view: PreparedData | None = None

    def for_teacher(self) -> PreparedData:
        """The data as the teacher reads it: `teacher_view` when it has its own tokenizer, else this."""
        return self if self.teacher_view is None else self.teacher_view

    @property
    def distill_train(self) -> Dataset:
        """What the student distils on: the training split, with the transfer set when there is one."""
        return self.train if self.train_with_transfer is None else self.train_with_transfer

    @property
    def transfer_examples(self) -> int:
        """How many examples without labels the student distils on besides `train`."""
        return len(self.distill_train) - len(self.train)

    def example_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """A batch of held-out inputs (no labels), for timing the models."""
        rows = [self.eval[i % len(self.eval)] for i in range(batch_size)]
        batch = self.eval_collator(rows)
        return {key: value for key, value in batch.items() if key != "labels"}

    def calibration_batches(self, count: int, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
        """The first `count` examples the student distils on, as batches of inputs (no labels), for ranking the
        units a pruned student keeps."""
        rows = self.distill_train.select(range(min(count, len(self.distill_train))))
        batches = []
        for start in range(0, len(rows), batch_size):
            batch = self.train_collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            batches.append({key: value for key, value in batch.items() if key != "labels"})
        return batches


def load_processor(settings: DataSettings):
    """The tokenizer or image processor: `--processor`, else the teacher's, else (a teacher built here) a
    ViT-style processor that resizes to `--image_size` and scales pixels to [-1, 1]."""
    args = DataSettings.of(settings)
    source = resolve_model(args.processor)
    if args.task == IMAGE_CLASSIFICATION:
        if source is None:
            # Imported here, by backend: naming ViTImageProcessor without torchvision warns, even for text runs.
            if is_torchvision_available():
                from transformers import ViTImageProcessor
            else:
                from transformers import ViTImageProcessorPil as ViTImageProcessor
            return ViTImageProcessor(
                size={"height": args.image_size, "width": args.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
            )
        processor = AutoImageProcessor.from_pretrained(source)
        if args.image_size is not None:
            processor.size = {"height": args.image_size, "width": args.image_size}
        return processor
    if source is None:
        raise ValueError("a text teacher built from teacher_config needs --processor (a tokenizer id or folder)")
    return AutoTokenizer.from_pretrained(source)


def _splits(args: DataSettings, raw: DatasetDict | Dataset, seed: int) -> tuple[Dataset, Dataset]:
    if isinstance(raw, Dataset):
        raw = DatasetDict({args.train_split: raw})
    if args.train_split not in raw:
        raise ValueError(f"the data set has no {args.train_split!r} split (it has {list(raw)}); set --train_split")
    if args.eval_split is not None:
        if args.eval_split not in raw:
            raise ValueError(f"the data set has no {args.eval_split!r} split (it has {list(raw)}); set --eval_split")
        return raw[args.train_split], raw[args.eval_split]
    held_out = _held_out_name(raw, args)
    if held_out is not None:
        return raw[args.train_split], raw[held_out]
    carved = raw[args.train_split].train_test_split(test_size=_CARVED_EVAL_FRACTION, seed=seed)
    return carved["train"], carved["test"]


def _check_columns(data: Dataset, columns: list[str], flags: list[str]) -> None:
    for column, flag in zip(columns, flags, strict=True):
        if column not in data.column_names:
            raise ValueError(f"the data set has no column {column!r} (it has {data.column_names}); set {flag}")


def _label_names(train: Dataset, column: str) -> list[str]:
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(value) for value in sorted(set(train[column]))]


def _transfer_examples(args: DataSettings, full_train: Dataset, used: int, seed: int) -> Dataset | None:
    """The raw transfer set (`--transfer_dataset`), shuffled with `seed` and cut to `--transfer_max_samples`."""
    if args.transfer_dataset is None:
        return None
    if args.transfer_dataset == UNUSED_EXAMPLES:
        if used == len(full_train):
            raise ValueError(
                f"--transfer_dataset unused: --max_train_samples {args.max_train_samples} keeps all {len(full_train)} "
                "training examples, so none is left over; lower --max_train_samples or name another transfer set"
            )
        transfer = full_train.select(range(used, len(full_train)))
    else:
        raw = load_raw_dataset(args.transfer_dataset, args.transfer_dataset_config_name)
        split = args.transfer_split or args.train_split
        if isinstance(raw, Dataset):
            raw = DatasetDict({args.train_split: raw})  # as `_splits` reads one
        if split not in raw:
            raise ValueError(
                f"the transfer set {args.transfer_dataset!r} has no {split!r} split (it has {list(raw)}); set "
                "--transfer_split"
            )
        held_out = args.eval_split or _held_out_name(raw, args)
        if args.transfer_dataset == args.dataset and split == (held_out or args.train_split):
            raise ValueError(
                f"--transfer_split {split!r} is (or, carved from it, holds) the split every model is evaluated on: "
                "distilling on it would leak the test set; choose another split, or --transfer_dataset unused for "
                "the training examples --max_train_samples leaves out"
            )
        raw = raw[split]
        transfer = raw.shuffle(seed=seed)
    column = args.image_column if args.task == IMAGE_CLASSIFICATION else args.text_column
    _check_columns(transfer, [column], ["--image_column" if column == args.image_column else "--text_column"])
    if args.transfer_max_samples is not None:
        transfer = transfer.select(range(min(args.transfer_max_samples, len(transfer))))
    return transfer.select_columns([column])


def _held_out_name(raw: DatasetDict, args: DataSettings) -> str | None:
    """The split `_splits` evaluates on when --eval_split is not given (None: carved from the training split)."""
    return next((name for name in ("validation", "test") if name in raw and name != args.train_split), None)


def _word_replacement_copies(args: DataSettings, train: Dataset, seed: int, save_dir: str | None) -> Dataset:
    """The word-replacement copies of the labeled training texts (`--word_replacement_mlm`), built or reused."""
    save_dir = args.word_replacement_dir or save_dir
    texts = train.select_columns([args.text_column])
    mlm = resolve_model(args.word_replacement_mlm)
    return build_word_replacement(texts, args.text_column, mlm, args.word_replacement(seed), save_dir)


def prepare_data(
    settings: DataSettings, seed: int, processor=None, word_replacement_dir: str | None = None
) -> PreparedData:
    """Load, split, subsample and preprocess the data for `settings.task`; word-replacement copies are saved in
    `word_replacement_dir` unless `--word_replacement_dir` names another folder."""
    args = DataSettings.of(settings)
    processor = load_processor(args) if processor is None else processor
    train, held_out = _splits(args, load_raw_dataset(args.dataset, args.dataset_config_name), seed)
    train = train.shuffle(seed=seed)
    full_train = train
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        held_out = held_out.select(range(min(args.max_eval_samples, len(held_out))))
    teacher_train = full_train
    if args.teacher_max_train_samples is not None:
        teacher_train = full_train.select(range(min(args.teacher_max_train_samples, len(full_train))))
    transfer = _transfer_examples(args, full_train, len(train), seed)

    if args.task == IMAGE_CLASSIFICATION:
        _check_columns(train, [args.image_column, args.label_column], ["--image_column", "--label_column"])
        label_names = _label_names(train, args.label_column)

        def to_pixels(batch):
            images = [image.convert("RGB") for image in batch[args.image_column]]
            return {
                "pixel_values": processor(images, return_tensors="pt")["pixel_values"],
                "labels": batch["labels"],
            }

        def labeled(split: Dataset) -> Dataset:
            return split.select_columns([args.image_column, args.label_column]).rename_columns(
                {args.label_column: "labels"} if args.label_column != "labels" else {}
            )

        splits = [labeled(split) for split in (train, teacher_train, held_out)]
        augmented = 0
        if args.image_augmentation_copies is not None:
            copies, augmentation = args.image_copies()
            views = augmented_image_copies(list(train[args.image_column]), augmentation, copies, seed)
            views = Dataset.from_dict({args.image_column: views}, features=Features({args.image_column: Image()}))
            augmented = len(views)
            transfer = views if transfer is None else concatenate_datasets([transfer.cast(views.features), views])
        if transfer is not None:
            splits.append(with_transfer_set(splits[0], transfer))
        splits = [split.with_transform(to_pixels) for split in splits]
        size = processor.size.get("height") if isinstance(processor.size, dict) else None
        collator = DefaultDataCollator()
        return PreparedData(
            args.task, processor, *splits[:3], collator, collator, label_names, size, *splits[3:],
            augmented_examples=augmented, settings=args,
        )  # fmt: skip

    if args.task == CAUSAL_LM:
        data = _causal_lm_data(args, processor, train, teacher_train, held_out)
        if args.teacher_processor is not None:  # the teacher reads the same text in its own tokens
            teacher_tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.teacher_processor))
            data.teacher_view = _causal_lm_data(args, teacher_tokenizer, train, teacher_train, held_out)
        return data

    _check_columns(train, [args.text_column], ["--text_column"])

    def tokenize(batch):
        return processor(batch[args.text_column], truncation=True, max_length=args.max_length)

    if args.task == TEXT_CLASSIFICATION:
        _check_columns(train, [args.label_column], ["--label_column"])
        augmented = 0
        if args.word_replacement_mlm is not None:
            copies = _word_replacement_copies(args, train, seed, word_replacement_dir)
            augmented = len(copies)
            transfer = copies if transfer is None else concatenate_datasets([transfer, copies])
        label_names = _label_names(train, args.label_column)
        to_index = {name: index for index, name in enumerate(label_names)}
        is_class_label = isinstance(train.features[args.label_column], ClassLabel)

        def encode(batch):
            encoded = tokenize(batch)
            labels = batch[args.label_column]
            encoded["labels"] = labels if is_class_label else [to_index[str(label)] for label in labels]
            return encoded

        splits = [
            split.map(encode, batched=True, remove_columns=split.column_names, desc=f"Tokenising {name}")
            for name, split in (("train", train), ("teacher train", teacher_train), ("eval", held_out))
        ]
        if transfer is not None:
            tokenised = transfer.map(tokenize, batched=True, remove_columns=transfer.column_names,
                                     desc="Tokenising transfer set")  # fmt: skip
            splits.append(with_transfer_set(splits[0], tokenised))
        collator = DataCollatorWithPadding(processor)
        return PreparedData(
            args.task, processor, *splits[:3], collator, collator, label_names, None, *splits[3:],
            augmented_examples=augmented, settings=args,
        )  # fmt: skip

    # Masked LM: drop empty lines, tokenise; the eval split is masked once with a fixed seed.
    splits = [
        split.filter(lambda text: bool(text.strip()), input_columns=args.text_column).map(
            tokenize, batched=True, remove_columns=split.column_names, desc=f"Tokenising {name}"
        )
        for name, split in (("train", train), ("teacher train", teacher_train), ("eval", held_out))
    ]
    for name, split in (("training", splits[0]), ("held-out", splits[2])):
        if len(split) == 0:
            raise ValueError(
                f"the {name} split of {args.dataset!r} has no line of text ({args.text_column!r} is empty on every "
                "row): give text files (or a data set) with non-empty lines"
            )
    masking = DataCollatorForLanguageModeling(processor, mlm_probability=args.mlm_probability)
    splits[2] = mask_once(splits[2], masking, seed)
    eval_collator = DataCollatorForTokenClassification(processor)
    return PreparedData(args.task, processor, *splits, masking, eval_collator, None, settings=args)


def _causal_lm_data(args: DataSettings, tokenizer, train, teacher_train, held_out) -> PreparedData:
    """Prompt + completion examples (labels on the completion alone), padded on the right; the held-out texts are
    kept (`eval_references`) for scoring generated completions."""
    columns = [args.prompt_column, args.completion_column]
    _check_columns(train, columns, ["--prompt_column", "--completion_column"])
    _check_columns(held_out, columns, ["--prompt_column", "--completion_column"])
    causal.check_tokenizer(tokenizer)
    causal.scorer(causal.metric_name(args.generation_metric, args.dataset))  # an unknown metric fails here, early

    def encode(split: Dataset, name: str) -> Dataset:
        return split.map(
            causal.tokenize, batched=True, remove_columns=split.column_names, desc=f"Tokenising {name}",
            fn_kwargs={"tokenizer": tokenizer, "prompt": args.prompt_column, "completion": args.completion_column,
                       "max_length": args.max_length},
        )  # fmt: skip

    splits = [encode(split, name) for name, split in (("train", train), ("teacher train", teacher_train),
                                                      ("eval", held_out))]  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    return PreparedData(
        args.task, tokenizer, *splits, collator, collator, None, None, settings=args,
        eval_references=held_out.select_columns(columns),
    )  # fmt: skip


def fix_training_masks(data: PreparedData, seed: int) -> PreparedData:
    """Mask a masked-LM training split once with a fixed seed and pad it without masking again, for a teacher
    cache. Other tasks are returned as they are (their preprocessing has no randomness)."""
    if data.task != MASKED_LM:
        return data
    return dataclasses.replace(
        data, train=mask_once(data.train, data.train_collator, seed), train_collator=data.eval_collator
    )


def mask_once(data: Dataset, masking: DataCollatorForLanguageModeling, seed: int) -> Dataset:
    """Apply the masking collator once to every example with a fixed seed, keeping the masked `input_ids` and
    `labels` (-100 where unmasked) as columns, so that every model is scored on the same masked tokens."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:

        def apply(batch):
            rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            masked = masking.torch_call(rows)
            lengths = [len(row["input_ids"]) for row in rows]
            return {
                **{key: batch[key] for key in batch if key not in ("input_ids", "labels")},
                "input_ids": [masked["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)],
                "labels": [masked["labels"][i, :n].tolist() for i, n in enumerate(lengths)],
            }

        return data.map(apply, batched=True, batch_size=256, desc="Masking once", load_from_cache_file=False)
    finally:
        torch.random.set_rng_state(generator_state)

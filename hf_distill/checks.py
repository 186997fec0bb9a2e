"""Checks of the trainer's inputs that run before the first step: each bad input is an error that names the fix.

check_data(terms, student, args, train_dataset, eval_dataset, collator)    # labels, sizes, columns
check_same_inputs(student, teacher, processing_class, teacher_source)      # vocabularies, tokenizers, pixels
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
)
from transformers.image_processing_utils import BaseImageProcessor

from .model_kind import SPAN_LABELS, describe
from .vocabulary import shared_columns

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("label", "labels", "label_ids")
#: What a preprocessing step changes in the pixels a model reads.
_PIXEL_SETTINGS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "size", "crop_size")
_SPECIAL_TOKENS = ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id", "bos_token_id", "eos_token_id",
                   "unk_token_id")  # fmt: skip


def check_data(
    terms: dict[str, tuple[float, Any]],
    model: nn.Module,
    args: Any,
    train_dataset: Any,
    eval_dataset: Any,
    collator: Any,
) -> None:
    """Refuse training data that would fail or mislead after the first step: empty, too small to make one batch,
    without labels for a loss that needs them, with labels the model cannot predict, or an eval set that lacks
    model inputs the training set has."""
    size = _length(train_dataset)
    if size == 0:
        raise ValueError(
            "the training set is empty (0 examples): check the split, the filters and max_train_samples that built it"
        )
    batch = args.per_device_train_batch_size * max(1, args.world_size)
    if size is not None and args.dataloader_drop_last and size < batch:
        raise ValueError(
            f"the training set has {size} examples, fewer than one batch of {batch} "
            f"(per_device_train_batch_size x processes), and dataloader_drop_last drops that batch: no step would "
            "run. Give it more examples, lower per_device_train_batch_size, or set dataloader_drop_last=False"
        )
    if isinstance(eval_dataset, Dataset) and len(eval_dataset) == 0:
        raise ValueError("the eval set is empty (0 examples): pass eval_dataset=None, or an eval set with examples")
    if isinstance(collator, DataCollatorForLanguageModeling):
        return  # it makes its own labels from the inputs
    columns = getattr(train_dataset, "column_names", None)
    uses_labels = [term for term, (_, loss) in terms.items() if loss.needs_labels]
    span = describe(model).span
    if uses_labels and isinstance(columns, list) and not set(columns) & {*LABEL_COLUMNS, *SPAN_LABELS}:
        add = "'start_positions' and 'end_positions' columns" if span else "a 'label' column"
        raise ValueError(
            f"losses {uses_labels} train on labels, but the training dataset has no label column (columns: "
            f"{columns}); add {add}, or drop {uses_labels} to distil from the teacher alone"
        )
    for name, dataset in (("training", train_dataset), ("eval", eval_dataset)):
        if isinstance(dataset, Dataset):
            _check_label_range(model, dataset, name)
    if isinstance(eval_dataset, Dataset) and isinstance(columns, list):
        inputs = set(inspect.signature(model.forward).parameters) - {*LABEL_COLUMNS, *SPAN_LABELS}
        missing = sorted(set(columns) & inputs - set(eval_dataset.column_names))
        if missing:
            raise ValueError(
                f"the eval set lacks the columns {missing}, which the training set gives the models (eval columns: "
                f"{eval_dataset.column_names}): preprocess the eval set as the training set"
            )


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # an iterable dataset: its size is unknown before it runs
        return None


def _check_label_range(model: nn.Module, dataset: Dataset, name: str) -> None:
    """Class labels must lie in 0..num_labels-1 (-100, ignored by the losses, aside)."""
    num_labels = getattr(model.config, "num_labels", None)
    if not describe(model).class_labels or getattr(model.config, "problem_type", None) not in (
        None, "single_label_classification") or not num_labels or num_labels < 2:  # fmt: skip
        return
    column = next((c for c in LABEL_COLUMNS if c in dataset.column_names), None)
    if column is None:
        return
    values = dataset.data.column(column) if dataset._indices is None else dataset.with_format("arrow")[column]
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):  # per-token labels
        values = pc.list_flatten(values)
    if not pa.types.is_integer(values.type):
        return  # floats (regression, soft labels): not class indices
    values = pc.filter(values, pc.not_equal(values, -100))
    if len(values) == 0:
        return
    low, high = pc.min_max(values).values()
    low, high = low.as_py(), high.as_py()
    if low < 0 or high >= num_labels:
        raise ValueError(
            f"the {name} set's '{column}' column holds labels from {low} to {high}, but the model predicts "
            f"{num_labels} classes (0..{num_labels - 1}): set num_labels (and id2label) when building the models, "
            "or map the labels to 0..num_labels-1"
        )


def check_same_inputs(
    student: nn.Module,
    teacher: nn.Module | None,
    processing_class: Any = None,
    teacher_source: str | None = None,
    teacher_processing_class: Any = None,
) -> int | None:
    """The teacher reads the student's inputs, so both must read them alike: the same vocabulary for token ids, or a
    teacher's that extends the student's (`hf_distill.vocabulary`; the columns its logits are cut to are returned),
    and, when both tokenizers are known, the same tokens and special tokens; for pixels, a warning when the two
    image processors prepare them differently. `teacher_processing_class`, when not given, is read from
    `teacher_source` (the teacher's folder or Hub id)."""
    if teacher is None:
        return None
    student_vocab = getattr(student.config, "vocab_size", None)
    teacher_vocab = getattr(teacher.config, "vocab_size", None)
    reads_tokens = "input_ids" in inspect.signature(student.forward).parameters
    tokenizer = isinstance(processing_class, PreTrainedTokenizerBase) or isinstance(
        getattr(processing_class, "tokenizer", None), PreTrainedTokenizerBase
    )
    if teacher_processing_class is None and teacher_source is not None and tokenizer and reads_tokens:
        teacher_processing_class = _load_quietly(AutoTokenizer, teacher_source)
    if reads_tokens and None not in (student_vocab, teacher_vocab) and student_vocab != teacher_vocab:
        columns = shared_columns(student, teacher, processing_class, teacher_processing_class)
        kind = describe(student)
        return columns if kind.language_model or kind.seq2seq else None
    if isinstance(processing_class, PreTrainedTokenizerBase):
        if isinstance(teacher_processing_class, PreTrainedTokenizerBase):
            _compare_tokenizers(
                processing_class, teacher_processing_class, teacher_source or "teacher_processing_class"
            )
    elif isinstance(processing_class, BaseImageProcessor) and teacher_source is not None:
        teacher_processor = _load_quietly(AutoImageProcessor, teacher_source)
        if teacher_processor is not None:
            _compare_image_processors(processing_class, teacher_processor, teacher_source)
    return None


def load_tokenizer(source: str) -> Any:
    """The tokenizer in a teacher's folder or Hub repository, None when it has none."""
    return _load_quietly(AutoTokenizer, source)


def _load_quietly(auto_class: type, source: str) -> Any:
    """The teacher's own tokenizer or image processor, None when its folder or repository has none."""
    try:
        return auto_class.from_pretrained(source)
    except (OSError, ValueError, KeyError):
        return None


def _compare_tokenizers(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, source: str) -> None:
    fix = (
        "use a teacher trained with the student's tokenizer, or, for causal LMs, the uld or gold loss, which "
        "re-tokenize the text for the teacher (docs/cross-tokenizer.md)"
    )
    if student.get_vocab() != teacher.get_vocab():
        differ = sorted(set(student.get_vocab().items()) ^ set(teacher.get_vocab().items()))[:5]
        raise ValueError(
            f"the student's tokenizer and the teacher's ({source}) map tokens to ids differently (e.g. "
            f"{differ}), so the teacher would read other words: {fix}"
        )
    special = {name: (getattr(student, name), getattr(teacher, name)) for name in _SPECIAL_TOKENS}
    differ = {name: ids for name, ids in special.items() if ids[0] != ids[1]}
    if differ:
        shown = ", ".join(f"{name} {s} (student) vs {t} (teacher)" for name, (s, t) in differ.items())
        raise ValueError(
            f"the student's tokenizer and the teacher's ({source}) differ in special tokens: {shown}; {fix}"
        )


def _compare_image_processors(student: BaseImageProcessor, teacher: BaseImageProcessor, source: str) -> None:
    differ = {name: (getattr(student, name, None), getattr(teacher, name, None)) for name in _PIXEL_SETTINGS}
    differ = {name: values for name, values in differ.items() if values[0] != values[1]}
    if differ:
        shown = "; ".join(f"{name} {s} (student) vs {t} (teacher)" for name, (s, t) in differ.items())
        logger.warning(
            "The teacher (%s) was trained on pixels prepared otherwise than the student's image processor prepares "
            "them (%s), and it reads the student's pixel_values: pass the teacher's image processor as "
            "processing_class and use it for the data, as the Hugging Face vision guide does, unless the student "
            "needs its own",
            source,
            shown,
        )

"""Transfer sets: examples without labels, on which the student learns from the teacher alone.

    train = with_transfer_set(labeled, unlabeled)   # labeled rows first, then unlabeled rows with label -100
    DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train).train()

Every term that reads the teacher counts every example; `hard_label` counts only the labeled ones (label -100 is
no label, as in `torch.nn.CrossEntropyLoss`), so a batch that mixes both, or a gradient-accumulation window
that does, trains on the exact per-item means. One label per example (sequence and image classification) is
what this marks: per-token labels mark the positions every token-level term counts, so an unlabeled text there
would be read by none.
"""

from __future__ import annotations

from datasets import ClassLabel, Dataset, Value, concatenate_datasets

from .checks import LABEL_COLUMNS

#: The label of an example that has none; the value every loss and model of the stack ignores.
UNLABELED = -100


def label_column(dataset: Dataset) -> str | None:
    """The column that holds the labels (`label`, `labels` or `label_ids`), or None."""
    return next((column for column in LABEL_COLUMNS if column in dataset.column_names), None)


def with_transfer_set(labeled: Dataset, unlabeled: Dataset) -> Dataset:
    """`labeled` followed by `unlabeled`, whose label (any it has is dropped) becomes `UNLABELED`.

    Both must have the same columns besides the label; the label column must hold one class index per example.
    The trainer's sampler shuffles the result, so labeled and unlabeled examples share batches.
    """
    column = label_column(labeled)
    if column is None:
        raise ValueError(
            f"the labeled set has no label column (columns: {labeled.column_names}); name it one of {LABEL_COLUMNS}"
        )
    feature = labeled.features[column]
    if not isinstance(feature, ClassLabel) and not (isinstance(feature, Value) and feature.dtype.startswith("int")):
        raise ValueError(
            f"the labeled set's {column!r} column is {feature}, not one class index per example: a transfer set marks "
            "an example without a label by -100, which only class indices have (sequence or image classification). "
            "For per-token labels or regression targets, give every example its labels"
        )
    unlabeled = unlabeled.remove_columns([name for name in LABEL_COLUMNS if name in unlabeled.column_names])
    expected, given = set(labeled.column_names) - {column}, set(unlabeled.column_names)
    if expected != given:
        raise ValueError(
            f"the transfer set's columns {sorted(given)} differ from the labeled set's {sorted(expected)} (label "
            "aside): preprocess both alike"
        )
    # ClassLabel cannot hold -100: both sides become plain integers.
    labeled = labeled.cast_column(column, Value("int64"))
    unlabeled = unlabeled.add_column(column, [UNLABELED] * len(unlabeled), feature=Value("int64"))
    return concatenate_datasets([labeled, unlabeled.cast(labeled.features)])

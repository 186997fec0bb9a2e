"""The pipeline's settings grouped by the stage that reads them.

`PipelineArguments` is the flat surface of the command line and the recipe files (one flag, one key); each stage
receives only its group, a frozen view taken from it:

    data = prepare_data(args.data_settings, seed)              # DataSettings
    teachers = prepare_teachers(args.teacher_settings, ...)     # TeacherSettings
    student, layer_map = make_student(args.student_settings, teacher, data, seed)
    refinement.refine(..., args.refinement_settings, ...)       # RefinementSettings
    describe_models(..., args.measurement_settings...)          # MeasurementSettings

`run_pipeline` is the only function that reads the whole `PipelineArguments`. A stage function also accepts the
whole object and takes its group from it (`DataSettings.of(args)`), as notebooks written against the flat
arguments call it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..augmentation import ImageAugmentation
from ..text_augmentation import WordReplacement

TASKS = ("text-classification", "masked-lm", "image-classification", "causal-lm")
TEXT_CLASSIFICATION, MASKED_LM, IMAGE_CLASSIFICATION, CAUSAL_LM = TASKS
#: `--transfer_dataset` value: the training split's examples that `--max_train_samples` leaves out.
UNUSED_EXAMPLES = "unused"
#: `--word_replacement_mlm` value: the teacher's own checkpoint, when it has a masked-LM head.
TEACHER_MLM = "teacher"


class _Group:
    """A group of settings: `of(value)` is the group itself, or the group taken from a `PipelineArguments`;
    `from_arguments(args)` copies each field from the flag of the same name, or of the name `_flags` gives."""

    _attribute: ClassVar[str] = ""
    _flags: ClassVar[dict[str, str]] = {}

    @classmethod
    def of(cls, value: Any):
        if isinstance(value, cls):
            return value
        group = getattr(value, cls._attribute, None)
        if not isinstance(group, cls):
            raise TypeError(f"expected {cls.__name__} (or PipelineArguments), got {type(value).__name__}")
        return group

    @classmethod
    def from_arguments(cls, args: Any, **derived: Any):
        values = {
            field.name: getattr(args, cls._flags.get(field.name, field.name))
            for field in dataclasses.fields(cls)
            if field.name not in derived
        }
        return cls(**values, **derived)


@dataclass(frozen=True)
class DataSettings(_Group):
    """What `prepare_data` reads: the data set, its splits and columns, sample caps, the transfer set and the
    augmented copies, and how the examples are tokenised or turned into pixels."""

    _attribute: ClassVar[str] = "data_settings"

    task: str
    dataset: str
    dataset_config_name: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "image"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    #: How held-out generations are scored (causal LM): a metric or checker name, `module:function`, None (the
    #: data set's own).
    generation_metric: str | None = None
    eval_max_new_tokens: int = 64
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    teacher_max_train_samples: int | None = None
    transfer_dataset: str | None = None
    transfer_dataset_config_name: str | None = None
    transfer_split: str | None = None
    transfer_max_samples: int | None = None
    #: The masked LM that proposes replacements (a folder or Hub id; `teacher` already resolved to the teacher's).
    word_replacement_mlm: str | None = None
    word_replacement_rate: float = 0.4
    word_replacement_candidates: int = 15
    word_replacement_copies: int = 20
    word_replacement_dir: str | None = None
    image_augmentation_copies: dict | None = None
    max_length: int = 128
    mlm_probability: float = 0.15
    #: The tokenizer or image processor to load (`--processor`, else the teacher's; None: built here).
    processor: str | None = None
    #: Causal LM: the teacher's own tokenizer when it is not the student's (`--teacher_processor`).
    teacher_processor: str | None = None
    image_size: int | None = None

    @classmethod
    def from_arguments(cls, args: Any, **derived: Any):
        mlm = args.teacher if args.word_replacement_mlm == TEACHER_MLM else args.word_replacement_mlm
        return super().from_arguments(args, word_replacement_mlm=mlm, processor=args.processor or args.teacher)

    def image_copies(self) -> tuple[int, ImageAugmentation]:
        """`--image_augmentation_copies` read: the copies per image and the augmentation that draws them."""
        return read_image_copies(self.image_augmentation_copies)

    def word_replacement(self, seed: int) -> WordReplacement:
        """The word-replacement settings of the `--word_replacement_*` flags, drawing with `seed`."""
        return WordReplacement(
            rate=self.word_replacement_rate,
            candidates=self.word_replacement_candidates,
            copies=self.word_replacement_copies,
            seed=seed,
            max_length=self.max_length,
        )


@dataclass(frozen=True)
class TeacherSettings(_Group):
    """What `prepare_teachers` and `load_initial_teacher` read: which teacher(s), and how one without a trained
    task head is trained first and kept."""

    _attribute: ClassVar[str] = "teacher_settings"
    _flags: ClassVar[dict[str, str]] = {
        "num_train_epochs": "teacher_num_train_epochs",
        "learning_rate": "teacher_learning_rate",
        "train_new_weights_only": "teacher_train_new_weights_only",
    }

    task: str
    teacher: str | None = None
    #: With several teachers, `{name: Hub id or folder}` in order (`teacher` is the first one's).
    teachers: dict[str, str] | None = None
    teacher_config: dict | None = None
    num_train_epochs: float = 3.0
    learning_rate: float = 5e-5
    train_new_weights_only: bool = False
    #: Where a teacher trained here is kept (None: `<output_dir>/teacher`).
    teacher_dir: str | None = None


@dataclass(frozen=True)
class StudentSettings(_Group):
    """What `make_student` reads: the student's shape, start and number format."""

    _attribute: ClassVar[str] = "student_settings"
    _flags: ClassVar[dict[str, str]] = {
        name: "student_" + name for name in ("layers", "num_layers", "config", "width", "init", "quantization")
    }

    task: str
    layers: list[int] | None = None
    num_layers: int | None = None
    config: dict | str | None = None
    width: dict | None = None
    init: str = "teacher"
    quantization: str | None = None
    calibration_examples: int = 256


@dataclass(frozen=True)
class DistillationSettings(_Group):
    """What the distillation stage reads beyond `DistillationConfig`: where the teacher signal comes from (the
    teacher, the student's moving average, born-again generations) and whether a labels-only baseline is trained."""

    _attribute: ClassVar[str] = "distillation_settings"

    ema_teacher: bool = False
    generations: int = 1
    baseline: bool = False


@dataclass(frozen=True)
class RefinementSettings(_Group):
    """What refinement reads: on the same task (`epochs` > 0) or on another task's labeled data set."""

    _attribute: ClassVar[str] = "refinement_settings"
    _flags: ClassVar[dict[str, str]] = {
        name: "refine_" + name
        for name in ("epochs", "learning_rate", "losses", "dataset", "task", "max_train_samples")
    }

    epochs: float = 0.0
    learning_rate: float | None = None
    losses: dict | None = None
    dataset: str | None = None
    task: str = TEXT_CLASSIFICATION
    max_train_samples: int | None = None

    @property
    def on_another_task(self) -> bool:
        return self.dataset is not None

    @property
    def on_the_same_task(self) -> bool:
        return bool(self.epochs) and self.dataset is None


@dataclass(frozen=True)
class MeasurementSettings(_Group):
    """What evaluation and the report read: the latency protocol and the seeds figure the margin is judged by."""

    _attribute: ClassVar[str] = "measurement_settings"

    @classmethod
    def from_arguments(cls, args: Any, **derived: Any):
        return super().from_arguments(args, latency_batch_sizes=tuple(args.latency_batch_sizes))

    latency_batch_sizes: tuple[int, ...] = (1, 32)
    latency_repeats: int = 20
    latency_compiled: bool = False
    seeds_margin: dict | None = None


def read_image_copies(options: Any) -> tuple[int, ImageAugmentation]:
    """`--image_augmentation_copies` read: the copies per image and the augmentation that draws them."""
    if not isinstance(options, dict) or "copies" not in options:
        raise ValueError(
            "image_augmentation_copies must be a mapping with copies and image_augmentation keys (in YAML, or "
            f'a JSON string such as \'{{"copies": 4, "crop_scale": [0.35, 1.0], "flip": true}}\'), got {options!r}'
        )
    copies = options["copies"]
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"image_augmentation_copies copies must be an integer >= 1, got {copies!r}")
    return copies, ImageAugmentation.from_config({k: v for k, v in options.items() if k != "copies"})

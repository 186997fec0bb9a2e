"""The pipeline's own settings (`PipelineArguments`); `command_line` parses them: defaults < recipe YAML < flags."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..augmentation import ImageAugmentation
from ..text_augmentation import WordReplacement
from .settings import (
    CAUSAL_LM,
    IMAGE_CLASSIFICATION,
    MASKED_LM,
    TASKS,
    TEACHER_MLM,
    TEXT_CLASSIFICATION,
    UNUSED_EXAMPLES,
    DataSettings,
    DistillationSettings,
    MeasurementSettings,
    RefinementSettings,
    StudentSettings,
    TeacherSettings,
    read_image_copies,
)


class UsageError(ValueError):
    """A mistake in the command line, a recipe file or a name the user gave; its message names the fix, and
    `hf-distill` prints it on one line instead of a traceback."""


#: The value that turns off a recipe's transfer set or augmentation on the command line (`--transfer_dataset none`).
OFF = "none"


@dataclass
class PipelineArguments:
    """What the pipeline distils: the task, the teacher, the student and the data.

    Every field is a command-line flag of `scripts/distill.py` and a key of a recipe file. The stages do not read
    this object: each receives its group (`data_settings`, `teacher_settings`, `student_settings`,
    `distillation_settings`, `refinement_settings`, `measurement_settings`; [`hf_distill.pipeline.settings`]).
    """

    task: str = field(default=TEXT_CLASSIFICATION, metadata={"help": "What the models do: " + ", ".join(TASKS) + "."})
    teacher: list[str] | None = field(
        default=None,
        metadata={
            "help": "The teacher: a Hub id or a local folder (safetensors weights), or several as name=path pairs "
            "(--teacher bert=PATH mini=PATH; a mapping in a recipe), whose distributions soft_target mixes "
            "(--teacher_weights). A checkpoint with no trained head for the task is fine-tuned first and kept in "
            "<output_dir>/teacher (several: <output_dir>/teachers/<name>). The student is built from the first."
        },
    )
    teacher_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Build the teacher from scratch from this config (a mapping with model_type, or a JSON "
            "string) and train it first, instead of loading --teacher. Needs --processor settings via "
            "--image_size for images."
        },
    )
    teacher_num_train_epochs: float = field(
        default=3.0, metadata={"help": "Epochs of teacher training, when the teacher has no trained head."}
    )
    teacher_learning_rate: float = field(
        default=5e-5, metadata={"help": "Learning rate of teacher training, when the teacher has no trained head."}
    )
    teacher_train_new_weights_only: bool = field(
        default=False,
        metadata={
            "help": "When the teacher is trained first, train only the weights its checkpoint lacks (a head "
            "warm-up: the pretrained encoder stays as it is, and each step costs little more than inference)."
        },
    )
    teacher_max_train_samples: int | None = field(
        default=None, metadata={"help": "Train the teacher on the first N training examples (default: all)."}
    )
    student_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Teacher layers the student is built from, in order (e.g. 0 2 4 7 9 11). Default: "
            "--student_num_layers layers spread evenly from the first to the last."
        },
    )
    student_num_layers: int | None = field(
        default=None, metadata={"help": "Depth of a student built from the teacher's layers (default: half)."}
    )
    student_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Build a fresh, randomly initialised student from this config instead of from the teacher's "
            "layers: a Hub id or folder holding a config (e.g. google/mobilenet_v2_1.4_224), a mapping with "
            "model_type, or a JSON string."
        },
    )
    student_width: dict | str | None = field(
        default=None,
        metadata={
            "help": "A narrower student: its hidden_size, num_attention_heads and intermediate_size (a mapping or "
            'JSON string, e.g. \'{"hidden_size": 256, "num_attention_heads": 8}\'; a width left out keeps the '
            "teacher's), pruned from the teacher's layers by activation importance on --calibration_examples "
            "training examples. BERT-style encoders and ViT."
        },
    )
    student_init: str = field(
        default="teacher",
        metadata={
            "help": "'teacher': the student starts from the teacher's weights (its layers, pruned to "
            "--student_width); 'random': the same shape, randomly initialised (what the teacher's weights are "
            "compared against)."
        },
    )
    student_quantization: str | None = field(
        default=None,
        metadata={
            "help": "'int8': quantization-aware distillation; the student trains with int8 fake quantization of its "
            "linear layers and word embeddings and is saved as a real int8 model (torchao, through TorchAoConfig) "
            "that plain from_pretrained loads. Its baseline is post-training quantization. Needs torchao."
        },
    )
    student_kinds: list[str] | None = field(
        default=None,
        metadata={
            "help": "Compare several kinds of student on one teacher in one run (e.g. layers width int8): each "
            "distilled with its own baseline in <output_dir>/<kind>, side by side in <output_dir>/report.*. A kind "
            "is the run's own student with --student_kind_settings over it; layers and int8 need none."
        },
    )
    student_kind_settings: dict | str | None = field(
        default=None,
        metadata={
            "help": "Each kind's settings over the run's (a mapping or JSON string): student settings (e.g. "
            "student_num_layers, student_width, student_quantization) and training settings (e.g. learning_rate, "
            "num_train_epochs)."
        },
    )
    teacher_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where a teacher trained here is kept and reused by later runs with the same settings "
            "(default: <output_dir>/teacher)."
        },
    )
    calibration_examples: int = field(
        default=256, metadata={"help": "Training examples whose activations rank the units --student_width keeps."}
    )
    processor: str | None = field(
        default=None,
        metadata={"help": "Tokenizer or image processor (Hub id or folder). Default: the teacher's own."},
    )
    teacher_processor: str | None = field(
        default=None,
        metadata={
            "help": "Causal LM: the teacher's tokenizer when it is not the student's (--processor): the teacher "
            "trains and is scored in its own tokens, and the student learns from it with the uld or gold loss "
            "(docs/cross-tokenizer.md). The student needs --student_config. Default: the student's tokenizer."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Side in pixels the images are resized to (default: the processor's; required with "
            "--teacher_config)."
        },
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "A Hub id, a folder written by Dataset.save_to_disk, local text files (masked LM; a path, "
            "glob or comma-separated list), or an offline source: offline:rotten_tomatoes, "
            "offline:fashion_mnist, offline:wordnet_fortunes."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub configuration of --dataset."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Held-out split every model is evaluated on. Default: validation, else test, else 10%% of "
            "the training split held out with a fixed seed."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class label."})
    prompt_column: str = field(default="prompt", metadata={"help": "Causal LM: the column holding the prompts."})
    completion_column: str = field(
        default="completion", metadata={"help": "Causal LM: the column holding the reference completions."}
    )
    generation_metric: str | None = field(
        default=None,
        metadata={
            "help": "Causal LM: how held-out greedy completions are scored: exact_match, perplexity (nothing "
            "generated), a checker that ships (letters) or module:function, a function (prompt, completion) -> bool. "
            "Default: the data set's own checker (offline:letters), else exact_match."
        },
    )
    eval_max_new_tokens: int = field(
        default=64, metadata={"help": "Causal LM: the most tokens a model generates per held-out prompt."}
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the image."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Distil on the first N training examples (shuffled with --seed)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N held-out examples."})
    transfer_dataset: str | None = field(
        default=None,
        metadata={
            "help": "A transfer set: examples without labels that the student also distils on (every term that "
            "reads the teacher counts them, hard_label skips them; the baseline never sees them). Any --dataset "
            "form, or 'unused': the training split's examples beyond --max_train_samples, their labels dropped "
            "('none': no transfer set, to turn a recipe's off). Text and image classification."
        },
    )
    transfer_dataset_config_name: str | None = field(
        default=None, metadata={"help": "Hub configuration of --transfer_dataset."}
    )
    transfer_split: str | None = field(
        default=None, metadata={"help": "Split of --transfer_dataset to take (default: --train_split)."}
    )
    transfer_max_samples: int | None = field(
        default=None, metadata={"help": "Take the first N transfer examples (shuffled with --seed; default: all)."}
    )
    word_replacement_mlm: str | None = field(
        default=None,
        metadata={
            "help": "Augment the labeled training texts by contextual word replacement (TinyBERT): this masked LM "
            "(a folder or Hub id with a trained masked-LM head, or 'teacher' when the teacher is one) proposes "
            "each word's replacements. The copies join the transfer set, without labels (the teacher labels "
            "them); the baseline never sees them. Built once and saved (--word_replacement_dir). 'none': off. "
            "Text classification."
        },
    )
    word_replacement_rate: float = field(
        default=0.4, metadata={"help": "Probability that a copy replaces a word (TinyBERT: 0.4)."}
    )
    word_replacement_candidates: int = field(
        default=15, metadata={"help": "Replacements considered per word (TinyBERT: 15)."}
    )
    word_replacement_copies: int = field(
        default=20, metadata={"help": "Augmented copies per labeled example (TinyBERT: 20)."}
    )
    word_replacement_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the augmented copies are saved and reused from when the texts, masked LM and settings "
            "match (default: <output_dir>/word-replacement)."
        },
    )
    image_augmentation_copies: dict | str | None = field(
        default=None,
        metadata={
            "help": "Fixed augmented copies of the labeled training images, drawn once with --seed, for a "
            "--teacher_cache (which cannot serve views drawn anew at every step): a mapping (or JSON string) of "
            'copies (per image) and the image_augmentation keys, e.g. \'{"copies": 4, "crop_scale": '
            "[0.35, 1.0], \"flip\": true}'. The copies join the transfer set, without labels. 'none': off. "
            "Image classification."
        },
    )
    max_length: int = field(default=128, metadata={"help": "Longest tokenised text; longer texts are truncated."})
    mlm_probability: float = field(
        default=0.15, metadata={"help": "Share of tokens masked for masked LM (80%% [MASK], 10%% random, 10%% kept)."}
    )
    ema_teacher: bool = field(
        default=False,
        metadata={
            "help": "Self-distillation: the student learns from an exponential moving average of itself (mean "
            "teacher, --ema_momentum) instead of from --teacher, which still gives the student's layers and the "
            "report's reference."
        },
    )
    generations: int = field(
        default=1,
        metadata={
            "help": "Born-again generations: after the student learns from the teacher (generation 1), each next one, "
            "of the same architecture and start, learns from the one before (frozen). The report shows every "
            "generation; the last is the saved student."
        },
    )
    refine_epochs: float = field(
        default=0.0,
        metadata={
            "help": "Refinement: after distillation, train the student this many more epochs on the task labels "
            "(--refine_losses; 0: no refinement). The report shows the student before and after; the baseline "
            "trains for as many steps in all."
        },
    )
    refine_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of refinement (default: --learning_rate)."}
    )
    refine_losses: dict | str | None = field(
        default=None,
        metadata={
            "help": "Losses of refinement, as --losses (default: hard_label alone; soft_target and the rest still "
            "read the teacher)."
        },
    )
    refine_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Refine on another task's labeled data set (any --dataset form), DistilBERT's flow: the "
            "student's layers carry over into a --refine_task model fine-tuned on it for --refine_epochs, beside "
            "the same architecture from the teacher's layers fine-tuned without the distillation stage."
        },
    )
    refine_task: str = field(default=TEXT_CLASSIFICATION, metadata={"help": "Task of --refine_dataset."})
    refine_max_train_samples: int | None = field(
        default=None, metadata={"help": "Refine on the first N examples of --refine_dataset (default: all)."}
    )
    baseline: bool = field(
        default=False,
        metadata={"help": "Also train the same student without the teacher (hard labels only) and compare."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Run into an --output_dir that already holds a run's report and student, replacing them (its "
            "trained teacher is reused either way). Without it such a folder is refused."
        },
    )
    seeds_margin: dict | str | None = field(
        default=None,
        metadata={
            "help": "What seeds vary the student's margin over the baseline by, for the report to say whether this "
            'run\'s margin is beyond it: {"mean": points, "std": points, "seeds": [...]} measured with --seeds (a '
            "recipe quotes its figure from docs/results.md)."
        },
    )
    seeds: list[int] | None = field(
        default=None,
        metadata={
            "help": "Run the whole pipeline once per seed (e.g. --seeds 1 2 3; --seed is then unused), each in "
            "<output_dir>/seed-<seed>, and write one report of every figure's mean ± std over them, with whether "
            "the student's margin over the baseline exceeds twice its standard deviation."
        },
    )
    latency_batch_sizes: list[int] = field(
        default_factory=lambda: [1, 32],
        metadata={"help": "Batch sizes at which CPU latency is measured for the report."},
    )
    latency_repeats: int = field(
        default=20,
        metadata={"help": "Timed forward passes per model and batch size, the models taking turns (median reported)."},
    )
    latency_compiled: bool = field(
        default=False,
        metadata={
            "help": "Also time every model under torch.compile (int8 kernels are fast on the CPU only compiled); "
            "the report then gives eager and compiled figures. Compiling takes a while per model and batch size."
        },
    )

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        #: With several teachers, `{name: Hub id or folder}` in order; `teacher` is then the first one's.
        self.teachers: dict[str, str] | None = None
        self.teacher = self._read_teachers(self.teacher)
        for name in (
            "transfer_dataset",
            "word_replacement_mlm",
            "image_augmentation_copies",
            "student_width",
            "student_quantization",
        ):
            if isinstance(getattr(self, name), str) and getattr(self, name).lower() == OFF:
                setattr(self, name, None)  # a recipe's setting turned off on the command line
        for name in (
            "teacher_config",
            "student_config",
            "student_width",
            "student_kind_settings",
            "refine_losses",
            "image_augmentation_copies",
            "seeds_margin",
        ):
            value = getattr(self, name)
            if isinstance(value, str) and value.lstrip().startswith("{"):
                setattr(self, name, json.loads(value))
        if self.teacher is None and self.teacher_config is None:
            raise ValueError("name a teacher: --teacher <Hub id or folder>, or --teacher_config to train one here")
        if self.teacher_config is not None and not isinstance(self.teacher_config, dict):
            raise ValueError("teacher_config must be a mapping with model_type (in YAML) or a JSON string")
        if self.teacher_config is not None and self.task == IMAGE_CLASSIFICATION and self.image_size is None:
            raise ValueError("a teacher built from --teacher_config needs --image_size for its image processor")
        if self.dataset is None:
            raise ValueError("name the data: --dataset <Hub id, folder, text files or offline:<source>>")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must lie in (0, 1), got {self.mlm_probability}")
        if isinstance(self.generations, bool) or not isinstance(self.generations, int) or self.generations < 1:
            raise ValueError(
                f"generations must be an integer >= 1 (1: no born-again generations), got {self.generations!r}"
            )
        if self.eval_max_new_tokens < 1:
            raise ValueError(f"eval_max_new_tokens must be >= 1, got {self.eval_max_new_tokens}")
        if self.task == CAUSAL_LM and self.teacher_config is not None and self.processor is None:
            raise ValueError(
                "a causal-LM teacher built from --teacher_config needs a tokenizer: --processor <Hub id or folder> "
                "(offline:letters for the letters task)"
            )
        if self.teacher_processor is not None:
            if self.task != CAUSAL_LM:
                raise ValueError(
                    "--teacher_processor (a teacher with another tokenizer) applies to --task causal-lm alone"
                )
            if self.student_config is None:
                raise ValueError(
                    "a teacher with another tokenizer (--teacher_processor) has embeddings over other tokens, so the "
                    "student cannot be made of its layers: give --student_config (a config whose vocabulary comes "
                    "from --processor)"
                )
            if self.generations > 1 or self.ema_teacher or self.teachers:
                raise ValueError("--teacher_processor names one teacher's tokenizer: drop --generations, --ema_teacher "
                                 "and --teachers (their teachers read the student's tokens)")  # fmt: skip
        if self.transfer_dataset is not None:
            if self.task == CAUSAL_LM:
                raise ValueError(
                    "a transfer set is for classification: a causal-LM example's completion is its label; add the "
                    "extra prompts and completions to --dataset instead (with --lmbda the student writes its own)"
                )
            if self.task == MASKED_LM:
                raise ValueError(
                    "a transfer set is for classification: masked-LM training text has no labels to leave out, so "
                    "add the extra text to --dataset instead of --transfer_dataset"
                )
            if self.transfer_dataset == UNUSED_EXAMPLES and self.max_train_samples is None:
                raise ValueError(
                    "--transfer_dataset unused takes the training examples beyond --max_train_samples, but every "
                    "example already has its label: set --max_train_samples, or name another --transfer_dataset"
                )
        if self.image_augmentation_copies is not None:
            if self.task != IMAGE_CLASSIFICATION:
                raise ValueError(f"--image_augmentation_copies augments images, but the task is {self.task}")
            self.image_copies()  # refuses bad keys and values before any stage
        if self.word_replacement_mlm == TEACHER_MLM and self.teacher is None:
            raise ValueError(
                "--word_replacement_mlm teacher names the teacher's checkpoint, but this run's teacher is built from "
                "--teacher_config (no masked-LM head): give a masked-LM folder or Hub id instead"
            )
        if self.word_replacement_mlm is not None:
            self.word_replacement(seed=0)  # refuses a rate, candidate or copy count out of range, before any stage
        if self.word_replacement_mlm is not None and self.task != TEXT_CLASSIFICATION:
            raise ValueError(
                f"word replacement augments labeled texts for text classification, not {self.task}: drop "
                "--word_replacement_mlm (for masked LM, add more text to --dataset instead)"
            )
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"--seeds takes distinct seeds, at least one, got {self.seeds}")
        if self.transfer_max_samples is not None and self.transfer_max_samples < 1:
            raise ValueError(f"transfer_max_samples must be >= 1, got {self.transfer_max_samples}")
        if self.student_layers is not None and self.student_config is not None:
            raise ValueError("give either student_layers (a student from the teacher) or student_config, not both")
        self._check_student_kind()

    def _check_student_kind(self) -> None:
        if self.student_init not in ("teacher", "random"):
            raise ValueError(f"student_init must be 'teacher' or 'random', got {self.student_init!r}")
        if self.student_quantization not in (None, "int8"):
            raise ValueError(f"student_quantization must be 'int8' (or left out), got {self.student_quantization!r}")
        if self.student_config is not None and (self.student_width is not None or self.student_init == "random"):
            raise ValueError(
                "--student_width and --student_init shape a student built from the teacher; --student_config "
                "builds a fresh one: give one or the other"
            )
        margin = self.seeds_margin
        if margin is not None and not (
            isinstance(margin, dict)
            and set(margin) == {"mean", "std", "seeds"}
            and all(isinstance(margin[key], (int, float)) for key in ("mean", "std"))
            and isinstance(margin["seeds"], list)
        ):
            raise ValueError(
                'seeds_margin must be a mapping {"mean": points, "std": points, "seeds": [1, 2, 3]} (in YAML, or a '
                f"JSON string), the margin measured with --seeds; got {margin!r}"
            )
        if self.student_width is not None:
            widths = ("hidden_size", "num_attention_heads", "intermediate_size")
            if (
                not isinstance(self.student_width, dict)
                or not self.student_width
                or set(self.student_width) - set(widths)
            ):
                raise ValueError(
                    f"student_width must be a mapping of {', '.join(widths)} to integers (in YAML, or a JSON "
                    f'string such as \'{{"hidden_size": 256, "num_attention_heads": 8}}\'), got {self.student_width!r}'
                )
        if self.student_quantization == "int8":
            if self.task == MASKED_LM:
                raise ValueError(
                    "int8 students are for classification: a masked LM ties its word embeddings to its output "
                    "layer, which the int8 format quantizes two ways; drop --student_quantization for masked LM"
                )
            if self.generations > 1 or self.ema_teacher:
                raise ValueError(
                    "an int8 student learns from a full-precision teacher: drop --generations / --ema_teacher, or "
                    "--student_quantization"
                )
        if self.student_kind_settings is not None and not isinstance(self.student_kind_settings, dict):
            raise ValueError(
                "student_kind_settings must map each kind to its settings (in YAML, or a JSON string such as "
                f'\'{{"width": {{"student_width": {{"hidden_size": 256}}}}}}\'), got {self.student_kind_settings!r}'
            )
        self._check_refinement()
        if self.calibration_examples < 1:
            raise ValueError(f"calibration_examples must be >= 1, got {self.calibration_examples}")

    def _check_refinement(self) -> None:
        if self.refine_epochs < 0:
            raise ValueError(f"refine_epochs must be >= 0 (0: no refinement), got {self.refine_epochs}")
        if self.refine_losses is not None and not isinstance(self.refine_losses, dict):
            raise ValueError(f"refine_losses must be a mapping of loss terms, as --losses, got {self.refine_losses!r}")
        if self.refine_dataset is None:
            return
        if self.refine_task not in TASKS or self.refine_task == MASKED_LM:
            raise ValueError(
                f"refine_task must be a labeled task ({', '.join(TASKS[:1])}, ...), got {self.refine_task!r}"
            )
        if not self.refine_epochs:
            raise ValueError("--refine_dataset needs --refine_epochs > 0: how long to fine-tune on it")
        if self.teachers:
            raise ValueError("refinement on another task carries one teacher's student: name one --teacher")
        from ..losses import reads_teacher

        if self.refine_losses and reads_teacher(self.refine_losses):
            raise ValueError(
                f"refinement on {self.refine_dataset} learns from its labels: the teacher was distilled for "
                f"{self.task}, so --refine_losses may hold only terms that read no teacher (hard_label)"
            )

    def image_copies(self) -> tuple[int, ImageAugmentation]:
        """`--image_augmentation_copies` read: the copies per image and the augmentation that draws them."""
        return read_image_copies(self.image_augmentation_copies)

    def word_replacement(self, seed: int) -> WordReplacement:
        """The word-replacement settings of the `--word_replacement_*` flags, drawing with `seed`."""
        return self.data_settings.word_replacement(seed)

    @property
    def data_settings(self) -> DataSettings:
        """What the data stage reads (`prepare_data`)."""
        return DataSettings.from_arguments(self)

    @property
    def teacher_settings(self) -> TeacherSettings:
        """What the teacher stage reads (`prepare_teachers`, `load_initial_teacher`)."""
        return TeacherSettings.from_arguments(self)

    @property
    def student_settings(self) -> StudentSettings:
        """What the student stage reads (`make_student`)."""
        return StudentSettings.from_arguments(self)

    @property
    def distillation_settings(self) -> DistillationSettings:
        """What the distillation stage reads besides `DistillationConfig`."""
        return DistillationSettings.from_arguments(self)

    @property
    def refinement_settings(self) -> RefinementSettings:
        """What refinement reads (`refinement.refine`, `refinement.refine_on_task`)."""
        return RefinementSettings.from_arguments(self)

    @property
    def measurement_settings(self) -> MeasurementSettings:
        """What evaluation and the report read."""
        return MeasurementSettings.from_arguments(self)

    def _read_teachers(self, value: Any) -> str | None:
        """`teacher` as given (a string, a list of one, name=path pairs, or a mapping): the first teacher's path,
        with `teachers` set when there are several."""
        if isinstance(value, (list, tuple)) and len(value) == 1 and not _PAIR.match(str(value[0])):
            value = value[0]
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)):
            pairs = [_PAIR.match(str(item)) for item in value]
            if not all(pairs):
                raise ValueError(
                    f"--teacher {' '.join(map(str, value))}: several teachers are given as name=path pairs, e.g. "
                    "--teacher bert=path/to/bert mini=path/to/minilm"
                )
            value = {pair["name"]: pair["path"] for pair in pairs}
            if len(value) < len(pairs):
                raise ValueError(f"--teacher names a teacher twice: {[pair['name'] for pair in pairs]}")
        if not isinstance(value, dict) or not value or not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"teacher must be a Hub id or folder, or a mapping of name to one, got {value!r}")
        if len(value) == 1:
            return next(iter(value.values()))
        if self.teacher_config is not None:
            raise ValueError("teacher_config builds one teacher: give several teachers as name=path pairs without it")
        self.teachers = dict(value)
        return next(iter(value.values()))


#: One of several teachers on the command line: `name=path`.
_PAIR = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_-]*)=(?P<path>.+)$")

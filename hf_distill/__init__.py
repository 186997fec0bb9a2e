"""hf_distill: knowledge distillation for Hugging Face Transformers.

from hf_distill import DistillationConfig, DistillationTrainer
args = DistillationConfig(output_dir="out", losses={"hard_label": {"weight": 0.5},
                                                    "soft_target": {"weight": 0.5, "temperature": 5.0}})
DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train).train()
"""

# First: drops import-time lines of dependencies that no user can act on (see _console).
from . import _console  # noqa: F401
from ._version import __version__
from .config import DistillationConfig
from .generation import DistillationSeq2SeqConfig, DistillationSeq2SeqTrainer
from .losses import DistillationLoss, available_losses, register_loss
from .pruning import prune_width, width_importance
from .quantization import prepare_int8_training, to_int8
from .teacher import load_teacher
from .text_augmentation import WordReplacement, build_word_replacement
from .trainer import DistillationTrainer
from .transfer import with_transfer_set

__all__ = [
    "DistillationConfig",
    "DistillationLoss",
    "DistillationSeq2SeqConfig",
    "DistillationSeq2SeqTrainer",
    "DistillationTrainer",
    "WordReplacement",
    "available_losses",
    "build_word_replacement",
    "load_teacher",
    "prepare_int8_training",
    "prune_width",
    "register_loss",
    "to_int8",
    "width_importance",
    "with_transfer_set",
    "__version__",
]

"""Teacher-output caches: run the teacher over the training data once, then distil at the student's cost.

    args = DistillationConfig(..., teacher_cache="teacher-cache")   # built on first use, reused after
    DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train).train()
    # later runs, other students: no teacher in memory at all
    DistillationTrainer(model=student, args=args, train_dataset=train).train()

What is stored follows the losses: the full logits of classifiers; for token-level tasks (masked and causal
LM, token classification) the rows of the positions the soft-target loss counts, with every logit
(`teacher_cache_top_k=0`, the exact loss) or the top k and the mass of the rest (an approximation, see
`losses.functional.topk_soft_target_loss`); for question answering the start and end logits of the real
tokens; for encoder-decoder models the same rows at the labeled decoder positions, and the labels' checksum;
the hidden-state layers the losses read (per stack for encoder-decoders). A record of the
teacher's weights (sha256), the data (size and `datasets` fingerprint), the collator and the contents sits
beside the shards, and a cache that does not match the run is refused. Each example also keeps a checksum of
its inputs, checked before training (first batch) and at every step, so random masking or augmentation,
which would show the student inputs the teacher never saw, is refused rather than silently trained on.
"""

from .building import ProcessGroup, build_teacher_cache
from .contents import CachedTeacherOutputs, OutputExtractor, cache_contents, input_checksums
from .teacher_cache import INDEX_KEY, IndexedDataset, TeacherCache, weights_sha256

__all__ = [
    "INDEX_KEY",
    "CachedTeacherOutputs",
    "IndexedDataset",
    "OutputExtractor",
    "ProcessGroup",
    "TeacherCache",
    "build_teacher_cache",
    "cache_contents",
    "input_checksums",
    "weights_sha256",
]

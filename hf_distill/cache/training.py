"""The trainer's side of a teacher-output cache: open or build it, check it serves the run, feed it the indices.

`TeacherCacheMixin` is mixed into [`~hf_distill.DistillationTrainer`]; it reads the trainer's losses, datasets and
collator, and builds a missing cache with the trainer's own `_teacher_outputs`, so a subclass that overrides
`teacher_forward` builds its cache the way it distils online.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling

from ..losses import SoftTargetLoss
from ..losses.base import batch_size
from ..model_kind import describe
from ..seq2seq import with_decoder_inputs
from ..teacher import zero_stage
from .contents import OutputExtractor, cache_contents
from .teacher_cache import INDEX_KEY, TeacherCache, build_teacher_cache, cache_record


class ConfigOnly:
    """A teacher known by its config and class name alone (from a cache): what the losses' `setup` reads of it."""

    def __init__(self, config: Any, class_name: str | None = None):
        self.config, self.class_name = config, class_name


def check_cache_use(args: Any, teacher_terms: list[str], collator: Any) -> TeacherCache | None:
    """Refuse a teacher cache that cannot serve this run, before anything is built; open a finished one."""
    if args.teacher_cache is None:
        return None
    if not teacher_terms:
        raise ValueError(
            f"teacher_cache is set ({args.teacher_cache}) but no configured loss reads the teacher; unset teacher_cache"
        )
    if isinstance(collator, DataCollatorForLanguageModeling) and collator.mlm:
        raise ValueError(
            "a teacher cache cannot serve DataCollatorForLanguageModeling(mlm=True): it masks each batch at random, "
            "so the student would see masks the teacher never saw. Mask the training set once with a fixed seed "
            "(hf_distill.pipeline.mask_once) and pad with DataCollatorForTokenClassification, or distil online"
        )
    return TeacherCache(args.teacher_cache) if TeacherCache.is_finished(args.teacher_cache) else None


class TeacherCacheMixin:
    """Opens `args.teacher_cache` for a `DistillationTrainer`, building (or finishing) it first when needed."""

    #: The teacher cache in use (None when distilling online).
    teacher_cache: TeacherCache | None = None
    #: Examples per shard of a cache built here: at most this much teacher work is lost to an interruption.
    teacher_cache_shard_size: int = 1024

    def _use_teacher_cache(self, cache: TeacherCache | None, teacher: Any) -> TeacherCache:
        """Open `args.teacher_cache`, building (or finishing) it first if needed, and check it serves this run."""
        directory = self.args.teacher_cache
        # ZeRO-3 leaves each process a shard of the teacher's weights: nothing to hash, or to build a cache from.
        split_teacher = zero_stage(self.accelerator) == 3
        if split_teacher and cache is None and not TeacherCache.is_finished(directory):
            raise ValueError(
                f"the teacher cache {directory} cannot be built under DeepSpeed ZeRO-3, which splits the teacher's "
                "weights across processes (so they cannot be hashed for the cache's record): build it once without "
                "ZeRO-3 (one process, DDP or ZeRO-2), then train from it under ZeRO-3 with no teacher at all"
            )
        losses = list(self.distillation_losses.values())
        contents = cache_contents(losses, teacher, self.args.teacher_cache_top_k)
        in_memory = None if isinstance(teacher, ConfigOnly) or split_teacher else teacher
        # The teacher's size as given (a GPU run may have cast it to half precision since).
        facts = getattr(self, "_teacher_facts", None)
        record = cache_record(in_memory, self.train_dataset, self.data_collator, contents, facts)
        with self.args.main_process_first(local=False, desc="teacher cache"):
            if cache is None and not TeacherCache.is_finished(directory):
                soft_target = next((loss for loss in losses if isinstance(loss, SoftTargetLoss)), None)
                cache = build_teacher_cache(
                    directory,
                    record,
                    self._cache_batches,
                    self._teacher_outputs,
                    OutputExtractor(contents, soft_target),
                    shard_size=self.teacher_cache_shard_size,
                )
            elif cache is None:
                cache = TeacherCache(directory)
        cache.check(record)
        # Before any step: the first examples, prepared again, must be the inputs the teacher saw.
        first = next(iter(self._cache_batches(0, batch_size=min(8, len(self.train_dataset)))))
        cache.outputs_for(list(range(batch_size(first))), first, self.args.device)
        return cache

    def _cache_batches(self, start: int, batch_size: int | None = None):
        """The training set from example `start` on, in order, prepared as for training and on the device."""
        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, Dataset):
            dataset = self._remove_unused_columns(dataset, description="teacher cache")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="teacher cache")
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(start, len(dataset))),
            batch_size=batch_size or self.args.per_device_eval_batch_size,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
        )
        student = self.accelerator.unwrap_model(self.model)
        # An encoder-decoder teacher reads the decoder inputs the student builds from the labels, as in training.
        seq2seq = describe(student).seq2seq
        for batch in loader:
            batch = self._prepare_inputs(batch)
            yield with_decoder_inputs(student, batch) if seq2seq else batch

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.args.teacher_cache is not None and INDEX_KEY not in self._signature_columns:
            self._signature_columns.append(INDEX_KEY)  # the example index travels to compute_loss

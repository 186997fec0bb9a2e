"""The trainer's side of a teacher-output cache: open or build it, check it serves the run, feed it the indices.

`TeacherCacheMixin` is mixed into [`~hf_distill.DistillationTrainer`]; it reads the trainer's losses, datasets and
collator, and builds a missing cache with the teacher's own source (`FrozenTeacher.outputs`, which runs the
trainer's `teacher_forward`), so a subclass that overrides `teacher_forward` builds its cache the way it distils
online. With several teachers each has its own cache (record and fingerprint) in a subfolder named after it, and
`teachers.json` lists them, so a later run needs none of the teachers.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling

from ..losses.base import batch_size
from ..model_kind import describe
from ..seq2seq import with_decoder_inputs
from ..teacher import sharding_engine, zero_stage
from ..teacher_sources import DEFAULT_TEACHER
from .building import ProcessGroup, build_teacher_cache
from .contents import OutputExtractor, cache_contents
from .store import BUILDING_NAME, read_json, write_json_atomically
from .teacher_cache import INDEX_KEY, WEIGHTS_HASH, TeacherCache, cache_record, recorded_weights_hash

#: In a cache folder of several teachers: their names, one subfolder (a whole cache) each.
TEACHERS_INDEX = "teachers.json"


class ConfigOnly:
    """A teacher known by its config and class name alone (from a cache): what the losses' `setup` reads of it."""

    def __init__(self, config: Any, class_name: str | None = None):
        self.config, self.class_name = config, class_name


def check_cache_use(
    args: Any, teacher_terms: list[str], collator: Any, names: list[str] | None
) -> dict[str, TeacherCache | None] | None:
    """Refuse a teacher cache that cannot serve this run, before anything is built; open the finished ones.

    Returns `{teacher name: its finished cache, or None when it is still to be built}` (None without a cache).
    `names` are the teachers given; None when none is, and then the cache must say which it holds, all finished.
    """
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
    stored = cached_teacher_names(args.teacher_cache)
    if names is not None and stored is not None and len(names) > 1 and stored != names:
        raise ValueError(
            f"the teacher cache {args.teacher_cache} holds the teachers {stored}, this run has {names}: give the "
            "same teachers, or choose another teacher_cache"
        )
    given = names is not None
    names = names or stored or []
    directories = cache_directories(args.teacher_cache, names)
    caches = {
        name: TeacherCache(path) if TeacherCache.is_finished(path) else None for name, path in directories.items()
    }
    unfinished = [name for name, cache in caches.items() if cache is None]
    if not given and unfinished:
        raise ValueError(
            f"the teacher cache {args.teacher_cache} is not finished for the teachers {unfinished}: pass them in "
            "teacher_model to build (or finish) it"
        )
    return caches


def cached_teacher_names(directory: str) -> list[str] | None:
    """The teachers a cache folder holds: one (its own `cache.json`), the names in its `teachers.json`, or None."""
    if TeacherCache.is_finished(directory) or os.path.isfile(os.path.join(directory, BUILDING_NAME)):
        return [DEFAULT_TEACHER]
    index = read_json(os.path.join(directory, TEACHERS_INDEX))
    return None if index is None else list(index["teachers"])


def cache_directories(directory: str, names: list[str]) -> dict[str, str]:
    """Where each teacher's cache lives: the folder itself for one teacher, a subfolder per teacher for several."""
    if len(names) == 1:
        return {names[0]: directory}
    return {name: os.path.join(directory, name) for name in names}


def cached_reference(cache: TeacherCache | None) -> ConfigOnly | None:
    """A teacher known only from its finished cache, as the losses' `setup` reads it (None: not built yet)."""
    return None if cache is None else ConfigOnly(cache.teacher_config(), cache.record["teacher"]["class"])


def every_object(processes: int, value: Any) -> list[Any]:
    """`value` of every process, in rank order, on every process (a collective)."""
    gathered = [None] * processes
    torch.distributed.all_gather_object(gathered, value)
    return gathered


class TeacherCacheMixin:
    """Opens `args.teacher_cache` for a `DistillationTrainer`, building (or finishing) it first when needed.

    It reads the trainer's `terms` (which losses read which teacher) and `roster` (the teachers, run to build a
    cache, and their facts), and the Trainer's own datasets, collator and accelerator; the trainer hands the opened
    caches to its roster, which reads the teachers from them from then on.
    """

    #: The teacher cache in use (None when distilling online); with several teachers, `teacher_caches` holds each.
    teacher_cache: TeacherCache | None = None
    #: Examples per shard of a cache built here: at most this much teacher work is lost to an interruption.
    teacher_cache_shard_size: int = 1024

    def _use_teacher_caches(
        self, caches: dict[str, TeacherCache | None], references: dict[str, Any]
    ) -> dict[str, TeacherCache]:
        """Open every teacher's cache, building (or finishing) it first if needed; returns them by teacher."""
        names = list(caches)
        directories = cache_directories(self.args.teacher_cache, names)
        if len(names) > 1 and self.args.should_save:
            os.makedirs(self.args.teacher_cache, exist_ok=True)
            write_json_atomically(os.path.join(self.args.teacher_cache, TEACHERS_INDEX), {"teachers": names})
        opened = {}
        for name in names:
            losses = self.terms.reading(name)
            if len(names) > 1:
                requests = {loss.term: loss.cached_logits() for loss in losses}
                top_k_mix = [
                    term for term, request in requests.items()
                    if request is not None and request.level == "token" and request.mixes_teachers
                ]  # fmt: skip
                if top_k_mix and self.args.teacher_cache_top_k > 0:
                    raise ValueError(
                        f"the losses {top_k_mix} mix the teachers' token distributions, which top-k caches cannot "
                        f"give (teacher_cache_top_k={self.args.teacher_cache_top_k}): set teacher_cache_top_k=0 (every "
                        "logit, exact), or give each teacher its own soft_target term ('teacher': name)"
                    )
            source = self.roster.sources.get(name)
            if caches[name] is None and source is None:
                raise ValueError(
                    f"the teacher cache {directories[name]} of teacher {name!r} is not finished, and that teacher was "
                    "not given: pass it in teacher_model to build (or finish) its cache"
                )
            opened[name] = self._use_teacher_cache(
                directories[name],
                caches[name],
                source,
                references[name],
                losses,
                self.roster.columns.get(name),
                self.roster.retokenizers.get(name),
            )
        return opened

    def _use_teacher_cache(
        self,
        directory: str,
        cache: TeacherCache | None,
        source: Any,
        reference: Any,
        losses: list[Any],
        columns: int | None = None,
        retokenizer: Any = None,
    ) -> TeacherCache:
        """Open one teacher's cache in `directory`, building (or finishing) it first with `source` (a
        `FrozenTeacher`) if needed, and check it serves this run (`columns`: the student's vocabulary, when the
        teacher's logits are cut to it; `retokenizer`: how its batches are aligned, for a teacher with another
        tokenizer)."""
        # ZeRO-3 and FSDP leave each process a shard of the teacher's weights: nothing to hash, or to build from.
        split_by = "DeepSpeed ZeRO-3" if zero_stage(self.accelerator) == 3 else None
        split_by = "FSDP" if sharding_engine(self.accelerator) == "FSDP" else split_by
        split_teacher = split_by is not None
        if split_teacher and cache is None and not TeacherCache.is_finished(directory):
            raise ValueError(
                f"the teacher cache {directory} cannot be built under {split_by}, which splits the teacher's weights "
                "across processes (so they cannot be hashed for the cache's record): build it once without "
                f"{split_by} (one process, DDP or ZeRO-2), then train from it under {split_by} with no teacher at all"
            )
        contents = cache_contents(losses, reference, self.args.teacher_cache_top_k, retokenizer)
        if columns is not None and contents["logits"] is not None:
            contents["teacher_columns"] = columns
        in_memory = None if source is None or split_teacher else source.reference
        # The teacher's size as given (a GPU run may have cast it to half precision since).
        facts = None if source is None else source.facts
        # Hashed as the cache already there was (an older cache's way), or the newest way for a new one.
        hashing = recorded_weights_hash(directory) if os.path.isdir(directory) else WEIGHTS_HASH
        record = cache_record(in_memory, self.train_dataset, self.data_collator, contents, facts, hashing)
        if cache is None and not TeacherCache.is_finished(directory):
            # Every process builds its share of the examples (the directory must be on a file system they share).
            cache = build_teacher_cache(
                directory,
                record,
                self._cache_batches,
                lambda inputs: source.outputs(inputs, None, training=True),
                OutputExtractor(contents, losses),
                batch_size=self.args.per_device_eval_batch_size,
                shard_size=self.teacher_cache_shard_size,
                group=self._cache_group(),
            )
        elif cache is None:
            cache = TeacherCache(directory)
        cache.check(record)
        if self.args.teacher_cache_verify:
            cache.verify()
        # Before any step: the first examples, prepared again, must be the inputs the teacher saw.
        first = next(iter(self._cache_batches([list(range(min(8, len(self.train_dataset))))])))
        cache.outputs_for(list(range(batch_size(first))), first, self.args.device)
        return cache

    def _cache_group(self) -> ProcessGroup:
        """The run's processes, which build a teacher cache together."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return ProcessGroup()
        return ProcessGroup(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
                            partial(every_object, accelerator.num_processes))  # fmt: skip

    def _cache_batches(self, batches: list[list[int]]):
        """The training set's examples in `batches` (lists of indices), in order, prepared as for training and on the
        device."""
        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, Dataset):
            dataset = self._remove_unused_columns(dataset, description="teacher cache")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="teacher cache")
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, collate_fn=collator, num_workers=self.args.dataloader_num_workers
        )
        student = self.accelerator.unwrap_model(self.model)
        # An encoder-decoder teacher reads the decoder inputs the student builds from the labels, as in training.
        seq2seq = describe(student).seq2seq
        for batch in loader:
            batch = self._prepare_inputs(batch)
            yield with_decoder_inputs(student, batch) if seq2seq else batch

    def _check_example_index(self) -> None:
        """Before any step: the data collator must pass on each example's index (`INDEX_KEY`), by which the cache's
        outputs are read; a collator that builds its batches from named keys only would drop it."""
        if self.data_collator is None or len(self.train_dataset) == 0:
            return
        dataset = self.train_dataset
        collator = self._get_collator_with_removed_columns(self.data_collator, description="teacher cache")
        try:
            batch = collator([dataset[0]])
        except Exception:  # noqa: BLE001 - a collator that fails here fails in training too, with its own error
            return
        if INDEX_KEY not in batch:
            raise ValueError(
                f"the data collator ({type(self.data_collator).__name__}) drops the '{INDEX_KEY}' key that a teacher "
                f"cache reads each example's outputs by (it returned only {sorted(batch)}): pass on every key of the "
                f"examples it is given, or at least {INDEX_KEY!r} (hf_distill.cache.INDEX_KEY) as a tensor of the "
                "examples' indices, or train without teacher_cache"
            )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.args.teacher_cache is not None and INDEX_KEY not in self._signature_columns:
            self._signature_columns.append(INDEX_KEY)  # the example index travels to compute_loss

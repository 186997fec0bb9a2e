"""Building a teacher-output cache, by one process or by every process of a run.

The examples are built in blocks of `shard_size` (one shard each). A build that was interrupted resumes at the blocks
that no shard on disk holds as it was recorded; several processes share those blocks in turn (block i to process
i mod N), each writing its own shards and noting their checksums in its own build record
(`building.<rank>.json`). Once every process has finished, the first merges those records into `building.json` and
writes `cache.json`. A build's processes read the same directory, so it must be on a file system they share.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .._version import __version__
from .contents import OutputExtractor, nonfinite_examples
from .store import (
    BUILDING_NAME,
    RECORD_NAME,
    ShardWriter,
    file_sha256,
    finished_shards,
    held_shards,
    read_json,
    shard_name,
    write_json_atomically,
)
from .teacher_cache import TeacherCache, record_mismatches

logger = logging.getLogger(__name__)

#: The parts of a record that must agree for a cache to be used or resumed.
FINGERPRINT_PARTS = ("format", "teacher", "dataset", "preprocessing", "contents")


@dataclass(frozen=True)
class ProcessGroup:
    """The processes that build a cache together: this one's `rank` of `size`, `wait` (a barrier) and `gather`
    (every process's Python object, in rank order, on every process). One process by default."""

    rank: int = 0
    size: int = 1
    wait: Callable[[], None] = lambda: None
    gather: Callable[[Any], list[Any]] = lambda value: [value]


def rank_record_name(rank: int) -> str:
    return f"building.{rank}.json"


def _recorded_checksums(directory: str, fingerprint: dict[str, Any]) -> dict[str, str] | None:
    """The shard checksums recorded by earlier attempts (`building.json` and any process's own record), None when
    only an earlier version's record without checksums is there; an attempt for other settings is an error."""
    paths = [os.path.join(directory, BUILDING_NAME), *sorted(glob.glob(os.path.join(directory, "building.*.json")))]
    records = [(path, record) for path in paths if (record := read_json(path)) is not None]
    if not records and any(name.startswith("shard-") for name in os.listdir(directory)):
        raise ValueError(f"{directory} holds shards but no build record: not a cache this version wrote; empty it")
    checksums: dict[str, str] | None = {}
    for path, record in records:
        problems = record_mismatches(record, fingerprint)
        if problems:
            raise ValueError(
                f"{directory} holds an interrupted teacher cache build for other settings ({'; '.join(problems)}, "
                f"in {os.path.basename(path)}); delete it or choose another directory"
            )
        if record.get("shard_sha256") is None:
            checksums = None
        elif checksums is not None:
            checksums.update(record["shard_sha256"])
    return checksums


def _keep_whole_shards(directory: str, fingerprint: dict[str, Any]) -> dict[str, str]:
    """Check the shards an earlier attempt left against their recorded checksums, delete the rest (half-written
    `.tmp` files, damaged or unrecorded shards), and record what stays in `building.json`; their checksums."""
    recorded = _recorded_checksums(directory, fingerprint)
    if recorded is None:  # an earlier version's record, without checksums: its shards from 0 on are trusted
        kept = {shard_name(*shard): file_sha256(os.path.join(directory, shard_name(*shard)))
                for shard in finished_shards(directory)}  # fmt: skip
    else:
        kept = {}
        for name in sorted(os.listdir(directory)):
            if name in recorded and file_sha256(os.path.join(directory, name)) == recorded[name]:
                kept[name] = recorded[name]
    for name in os.listdir(directory):
        if name.startswith("shard-") and name not in kept:
            os.remove(os.path.join(directory, name))
    _record_build(directory, fingerprint, kept)
    return kept


def _record_build(directory: str, fingerprint: dict[str, Any], checksums: dict[str, str]) -> None:
    """Write `building.json` with these shard checksums, then remove the processes' own records it replaces."""
    write_json_atomically(os.path.join(directory, BUILDING_NAME), {**fingerprint, "shard_sha256": checksums})
    for path in glob.glob(os.path.join(directory, "building.*.json")):
        os.remove(path)


def missing_blocks(held: list[tuple[int, int]], total: int, shard_size: int) -> list[tuple[int, int]]:
    """The example ranges no shard in `held` covers, cut into blocks of at most `shard_size` examples."""
    blocks, position = [], 0
    for start, end in [*sorted(held), (total, total)]:
        for block_start in range(position, start, shard_size):
            blocks.append((block_start, min(block_start + shard_size, start)))
        position = max(position, end)
    return blocks


def build_teacher_cache(
    directory: str,
    record: dict[str, Any],
    batches_of: Callable[[list[list[int]]], Iterable[dict[str, Any]]],
    forward: Callable[[dict[str, Any]], Any],
    extractor: OutputExtractor,
    batch_size: int,
    shard_size: int = 1024,
    group: ProcessGroup | None = None,
):
    """Run the teacher over a dataset once and store what the losses need, streaming shards to `directory`.

    Args:
        record (`dict`): the fingerprint (teacher, dataset, preprocessing, contents) stored with the cache.
        batches_of (`Callable`): the batches of the given example indices, prepared as for training and on the
            teacher's device, in order.
        forward (`Callable`): runs the teacher on a batch.
        extractor ([`OutputExtractor`]): turns outputs into stored tensors.
        batch_size (`int`): examples per teacher forward.
        shard_size (`int`): examples per shard: what an interruption can lose.
        group ([`ProcessGroup`]): the processes that build it together (each its share of the blocks); every one
            of them calls this function.

    Interrupted builds resume when called again with the same record, with any number of processes; a cache is
    readable only once `cache.json` is written, after every shard.
    """
    group = group or ProcessGroup()
    fingerprint = {key: record[key] for key in FINGERPRINT_PARTS}
    total = record["dataset"]["num_examples"]
    problem, kept = None, {}
    if group.rank == 0:
        os.makedirs(directory, exist_ok=True)
        try:
            kept = _keep_whole_shards(directory, fingerprint)
        except ValueError as error:
            problem = error
    problems = group.gather(None if problem is None else str(problem))
    if problem is not None:
        raise problem
    if problems[0] is not None:
        raise ValueError(problems[0])
    held = held_shards(directory)
    blocks = missing_blocks(held, total, shard_size)
    mine = blocks[group.rank :: group.size]
    if held and blocks and group.rank == 0:
        logger.info("Resuming the teacher cache in %s at example %d of %d (%d examples to build)", directory,
                    blocks[0][0], total, sum(end - start for start, end in blocks))  # fmt: skip
    own_path = os.path.join(directory, BUILDING_NAME if group.size == 1 else rank_record_name(group.rank))
    checksums = dict(kept) if group.size == 1 else {}  # one process extends building.json itself

    def written(name: str, digest: str) -> None:
        checksums[name] = digest
        write_json_atomically(own_path, {**fingerprint, "shard_sha256": checksums})

    failure = None
    try:
        _build_blocks(directory, mine, batches_of, forward, extractor, batch_size, written, group)
    except Exception as error:  # noqa: BLE001 - told to the other processes, then raised here as it is
        failure = error
    failures = group.gather(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    elsewhere = [message for message in failures if message is not None]
    if elsewhere:
        raise RuntimeError(f"the teacher cache build in {directory} failed in another process: {elsewhere[0]}")
    if group.rank == 0:
        _finish(directory, fingerprint, total)
    group.wait()
    return TeacherCache(directory)


def _build_blocks(directory, blocks, batches_of, forward, extractor, batch_size, written, group) -> None:
    """Run the teacher over `blocks` (example ranges) in batches that stay inside a block; one shard per block."""
    batches = [list(range(start, min(start + batch_size, end))) for block_start, end in blocks
               for start in range(block_start, end, batch_size)]  # fmt: skip
    sizes = {start: end - start for start, end in blocks}
    description = "Building the teacher cache" + (f" (process {group.rank} of {group.size})" if group.size > 1 else "")
    writer = None
    with tqdm(total=sum(sizes.values()), desc=description, unit="example", disable=group.rank != 0) as progress:
        with torch.inference_mode():
            for indices, inputs in zip(batches, batches_of(batches), strict=True):
                if indices[0] in sizes:  # a block begins: its shard is written once it is whole
                    writer = ShardWriter(directory, indices[0], sizes[indices[0]], written)
                stored = extractor(inputs, forward(inputs))
                broken = nonfinite_examples(stored)
                if broken:
                    writer.flush()  # what was built before stays, in a shard of its own: a fixed teacher resumes
                    raise FloatingPointError(
                        f"the teacher's outputs for training examples {[indices[i] for i in broken][:10]} hold NaN or "
                        f"infinite values, so the teacher cache {directory} stops before them (what was built so far "
                        "is kept). A teacher run in float16 overflows past 65,504: load it in float32 or bfloat16; "
                        "otherwise check the teacher on those examples"
                    )
                writer.add(stored)
                progress.update(len(indices))


def _finish(directory: str, fingerprint: dict[str, Any], total: int) -> None:
    """Merge the processes' records into `building.json` and, when the shards cover every example, write
    `cache.json` (the mark of a whole cache)."""
    checksums = _recorded_checksums(directory, fingerprint)
    # The build record stays: after damage, deleting cache.json and building again resumes from it.
    _record_build(directory, fingerprint, checksums)
    shards = finished_shards(directory)
    if not shards or shards[-1][1] != total:
        raise RuntimeError(
            f"the teacher cache build in {directory} covered {shards[-1][1] if shards else 0} of {total} examples"
        )
    finished = {**fingerprint, "hf_distill_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "shards": [{"file": shard_name(s, e), "start": s, "end": e, "sha256": checksums[shard_name(s, e)]}
                           for s, e in shards]}  # fmt: skip
    write_json_atomically(os.path.join(directory, RECORD_NAME), finished)

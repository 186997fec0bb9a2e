"""Building, checking and reading a teacher-output cache (see `hf_distill.cache`)."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn
from transformers import CONFIG_MAPPING, PretrainedConfig

from ..card import model_facts
from .contents import (
    assemble,
    contents_mismatch,
    input_checksums,
    label_checksums,
    same_inputs,
)
from .store import (
    BUILDING_NAME,
    FORMAT_VERSION,
    RECORD_NAME,
    CacheReader,
    read_json,
)

logger = logging.getLogger(__name__)

#: The batch key that carries each example's index into the cache while training from one.
INDEX_KEY = "hf_distill_example_index"
#: How a new cache's record hashes the teacher's weights (its `teacher.weights_hash`): 2, `weights_fingerprint`.
#: Records without the key (caches written before it) were hashed by `weights_sha256` and are checked that way.
WEIGHTS_HASH = 2
#: `weights_fingerprint` hashes the weights' bytes in pieces of this size, on threads, this many bytes at a time.
HASH_PIECE_BYTES, HASH_BATCH_BYTES = 1 << 22, 1 << 26


def _in_memory(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "meta":
        raise ValueError(
            f"the teacher's weight {name} is not in memory (a device map offloaded it to disk), and a teacher "
            "cache records a hash of every weight: build the cache with the teacher's weights on devices (a "
            "device_map without 'disk'), then train from it"
        )
    return tensor.detach()


def weights_sha256(model: nn.Module) -> str:
    """A hash of a model's weights: every tensor of its state dict, with its name, dtype and shape."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = _in_memory(name, tensor).contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module, threads: int | None = None) -> str:
    """A sha256 hash of a model's weights, as a teacher cache records them (`WEIGHTS_HASH` 2): for every tensor of
    its state dict, in name order, its name, dtype and shape, then the sha256 of each `HASH_PIECE_BYTES` piece of
    its bytes, each piece hashed on one of `threads` threads (hashlib works without the GIL); a tensor that is
    another one's view of the same memory (tied embeddings) by that name instead, its bytes hashed once. The value
    depends on neither the number of threads nor how many bytes are hashed at a time."""
    threads = threads or min(8, os.cpu_count() or 1)
    digest = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for batch in _weight_batches(model):
            pieces = [piece for _, tensor_pieces in batch for piece in tensor_pieces]
            digests = iter(pool.map(lambda piece: hashlib.sha256(piece).digest(), pieces))
            for header, tensor_pieces in batch:
                digest.update(header)
                for _ in tensor_pieces:
                    digest.update(next(digests))
    return digest.hexdigest()


def _weight_batches(model: nn.Module) -> Iterator[list[tuple[bytes, list[Any]]]]:
    """The state dict's tensors in name order as (header, pieces of their bytes), in batches of at least
    `HASH_BATCH_BYTES` (a GPU model is copied to the host about that much at a time)."""
    seen: dict[tuple, str] = {}
    batch, pending = [], 0
    for name, tensor in sorted(model.state_dict().items()):
        tensor = _in_memory(name, tensor)
        header = f"{name}:{tensor.dtype}:{tuple(tensor.shape)};"
        where = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tuple(tensor.stride()), tensor.dtype)  # fmt: skip
        if tensor.numel() and where in seen:
            batch.append((f"{header}={seen[where]};".encode(), []))
            continue
        seen[where] = name
        data = tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        batch.append((header.encode(), [data[start : start + HASH_PIECE_BYTES]
                                        for start in range(0, len(data), HASH_PIECE_BYTES)]))  # fmt: skip
        pending += len(data)
        if pending >= HASH_BATCH_BYTES:
            yield batch
            batch, pending = [], 0
    yield batch


def recorded_weights_hash(directory: str) -> int:
    """How the cache (or the interrupted build) in `directory` hashed its teacher's weights: its record's
    `teacher.weights_hash`, 1 for a record without it, `WEIGHTS_HASH` when nothing is recorded."""
    paths = [os.path.join(directory, name) for name in (RECORD_NAME, BUILDING_NAME)]
    for path in [*paths, *sorted(glob.glob(os.path.join(directory, "building.*.json")))]:
        record = read_json(path)
        if record is not None and record.get("teacher"):
            return int(record["teacher"].get("weights_hash", 1))
    return WEIGHTS_HASH


def cache_record(
    teacher: nn.Module | None,
    dataset: Any,
    collator: Any,
    contents: dict[str, Any],
    teacher_facts: dict[str, Any] | None = None,
    weights_hash: int = WEIGHTS_HASH,
) -> dict[str, Any]:
    """The fingerprint of a run's cache: teacher weights (None: not in memory, so not checked), the data (size
    and, for a `datasets.Dataset`, its content fingerprint), the collator, and the contents the losses need.

    `teacher_facts` (`card.model_facts` of the teacher as given, before any half-precision cast) supply the
    parameter count and weight bytes kept for model cards; by default they are measured on `teacher`.
    `weights_hash`: how the weights are hashed (`WEIGHTS_HASH`; 1, `weights_sha256`, to check an older cache)."""
    teacher_part = None
    if teacher is not None:
        config = getattr(teacher, "config", None)
        hashed = weights_fingerprint(teacher) if weights_hash == WEIGHTS_HASH else weights_sha256(teacher)
        teacher_part = {
            "class": type(teacher).__name__,
            "weights_sha256": hashed,
            "config": config.to_dict() if isinstance(config, PretrainedConfig) else None,
        }
        if weights_hash != 1:
            teacher_part["weights_hash"] = weights_hash
        # For the student's model card, when a later run has only the cache.
        facts = teacher_facts or model_facts(teacher)
        teacher_part.update(parameters=facts["parameters"], weight_bytes=facts["weight_bytes"])
    return {
        "format": FORMAT_VERSION,
        "teacher": teacher_part,
        "dataset": {"num_examples": len(dataset), "fingerprint": getattr(dataset, "_fingerprint", None)},
        "preprocessing": {"collator": type(collator).__name__},
        "contents": contents,
    }


def record_mismatches(cached: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Differences between a cache's record and the current run's, in words (empty when it may be used)."""
    problems = []
    if cached["format"] != current["format"]:
        problems.append(f"it was written in cache format {cached['format']}, this version reads {current['format']}")
    for key in ("num_examples", "fingerprint"):
        old, new = cached["dataset"][key], current["dataset"][key]
        if old is not None and new is not None and old != new:
            problems.append(f"the training data differ (dataset {key} {old} then, {new} now)")
    if cached["preprocessing"] != current["preprocessing"]:
        problems.append(f"the preprocessing differs ({cached['preprocessing']} then, {current['preprocessing']} now)")
    new_hash = (current.get("teacher") or {}).get("weights_sha256")
    if new_hash is not None and cached["teacher"]["weights_sha256"] != new_hash:
        problems.append(
            f"the teacher's weights differ (sha256 {cached['teacher']['weights_sha256'][:12]}... then, "
            f"{new_hash[:12]}... now)"
        )
    problems += contents_mismatch(cached["contents"], current["contents"])
    return problems


class TeacherCache:
    """A finished teacher-output cache, opened for reading.

    Args:
        directory (`str`): a folder written by [`build_teacher_cache`]; refused unless its `cache.json`, written
            last, is there.
    """

    def __init__(self, directory: str):
        record = read_json(os.path.join(directory, RECORD_NAME))
        if record is None:
            partial = os.path.isfile(os.path.join(directory, BUILDING_NAME))
            raise FileNotFoundError(
                f"{directory} holds no finished teacher cache"
                + (" (a build was interrupted; building again with the same teacher resumes it)" if partial else "")
            )
        self.directory, self.record, self.contents = directory, record, record["contents"]
        self.reader = CacheReader(directory, record)

    @staticmethod
    def is_finished(directory: str | None) -> bool:
        return directory is not None and os.path.isfile(os.path.join(directory, RECORD_NAME))

    def teacher_config(self) -> PretrainedConfig:
        """The teacher's config as recorded, so losses can be set up without the teacher in memory."""
        config = self.record["teacher"]["config"]
        if not config or config.get("model_type") not in CONFIG_MAPPING:
            raise ValueError(f"the teacher cache {self.directory} records no usable teacher config; pass the teacher")
        return CONFIG_MAPPING[config["model_type"]].from_dict(config)

    def verify(self) -> None:
        """Check every shard against the sha256 recorded when the cache was built, in one pass; a damaged or changed
        shard is an error that names it (reads check each shard before its first use anyway)."""
        self.reader.verify()

    def check(self, current: dict[str, Any]) -> None:
        """Refuse this cache for a run whose record (teacher, data, preprocessing, contents) does not match."""
        problems = record_mismatches(self.record, current)
        if problems:
            raise ValueError(
                f"the teacher cache in {self.directory} does not match this run: " + "; ".join(problems) + ". Build a "
                "new cache in another directory (or delete this one), or restore the settings it was built with."
            )

    def outputs_for(self, examples: list[int], inputs: Mapping[str, Any], device: torch.device):
        """The stored teacher outputs of `examples`, after checking that `inputs` are the ones the teacher saw."""
        gathered = self.reader.gather(examples)
        key, seen = input_checksums(inputs)
        agree = same_inputs(gathered["checksum"], seen, exact=not inputs[key].is_floating_point())
        if "label_checksum" in gathered:  # an encoder-decoder's outputs also follow its labels
            agree &= same_inputs(gathered["label_checksum"], label_checksums(inputs), exact=True)
        if not bool(agree.all()):
            changed = [examples[i] for i in (~agree).nonzero().flatten().tolist()]
            raise ValueError(
                f"the inputs (or labels) of examples {changed[:8]} differ from those the teacher saw when the cache "
                f"in {self.directory} was built: random masking or augmentation, or other data. Make the inputs "
                "deterministic (mask once with a fixed seed, augment nothing) or distil online without the cache."
            )
        return assemble(gathered, inputs, self.contents, device)


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose examples carry their index under `INDEX_KEY`, to find their cached outputs."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], INDEX_KEY: index}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        fetch = getattr(self.dataset, "__getitems__", None)
        rows = fetch(indices) if fetch is not None else [self.dataset[i] for i in indices]
        return [{**row, INDEX_KEY: index} for row, index in zip(rows, indices, strict=True)]

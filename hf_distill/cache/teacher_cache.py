"""Building, checking and reading a teacher-output cache (see `hf_distill.cache`)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import CONFIG_MAPPING, PretrainedConfig

from .._version import __version__
from ..card import model_facts
from .contents import (
    OutputExtractor,
    assemble,
    contents_mismatch,
    input_checksums,
    label_checksums,
    nonfinite_examples,
    same_inputs,
)
from .store import (
    BUILDING_NAME,
    FORMAT_VERSION,
    RECORD_NAME,
    CacheReader,
    ShardWriter,
    file_sha256,
    finished_shards,
    read_json,
    shard_name,
    write_json_atomically,
)

logger = logging.getLogger(__name__)

#: The batch key that carries each example's index into the cache while training from one.
INDEX_KEY = "hf_distill_example_index"
#: The parts of a record that must agree for a cache to be used or resumed.
_FINGERPRINT_PARTS = ("format", "teacher", "dataset", "preprocessing", "contents")


def weights_sha256(model: nn.Module) -> str:
    """A hash of a model's weights: every tensor of its state dict, with its name, dtype and shape."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def cache_record(
    teacher: nn.Module | None,
    dataset: Any,
    collator: Any,
    contents: dict[str, Any],
    teacher_facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The fingerprint of a run's cache: teacher weights (None: not in memory, so not checked), the data (size
    and, for a `datasets.Dataset`, its content fingerprint), the collator, and the contents the losses need.

    `teacher_facts` (`card.model_facts` of the teacher as given, before any half-precision cast) supply the
    parameter count and weight bytes kept for model cards; by default they are measured on `teacher`."""
    teacher_part = None
    if teacher is not None:
        config = getattr(teacher, "config", None)
        teacher_part = {
            "class": type(teacher).__name__,
            "weights_sha256": weights_sha256(teacher),
            "config": config.to_dict() if isinstance(config, PretrainedConfig) else None,
        }
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


def _mismatches(cached: dict[str, Any], current: dict[str, Any]) -> list[str]:
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
        problems = _mismatches(self.record, current)
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


def build_teacher_cache(
    directory: str,
    record: dict[str, Any],
    batches_from: Callable[[int], Iterable[dict[str, Any]]],
    forward: Callable[[dict[str, Any]], Any],
    extractor: OutputExtractor,
    shard_size: int = 1024,
) -> TeacherCache:
    """Run the teacher over a dataset once and store what the losses need, streaming shards to `directory`.

    Args:
        record (`dict`): the fingerprint (teacher, dataset, preprocessing, contents) stored with the cache.
        batches_from (`Callable[[int], Iterable]`): batches of the dataset in order, starting at an example index.
        forward (`Callable`): runs the teacher on a batch (already on its device).
        extractor ([`OutputExtractor`]): turns outputs into stored tensors.
        shard_size (`int`): examples per shard: what an interruption can lose.

    Interrupted builds resume from the last whole shard when called again with the same record; a cache is
    readable only once `cache.json` is written, after every shard.
    """
    os.makedirs(directory, exist_ok=True)
    fingerprint = {key: record[key] for key in _FINGERPRINT_PARTS}
    building_path = os.path.join(directory, BUILDING_NAME)
    building = read_json(building_path)
    if building is None and any(name.startswith("shard-") for name in os.listdir(directory)):
        raise ValueError(f"{directory} holds shards but no build record: not a cache this version wrote; empty it")
    if building is not None:
        problems = _mismatches(building, fingerprint)
        if problems:
            raise ValueError(
                f"{directory} holds an interrupted teacher cache build for other settings ({'; '.join(problems)}); "
                "delete it or choose another directory"
            )
    else:
        building = {**fingerprint, "shard_sha256": {}}  # written below, with the shards kept
    total = record["dataset"]["num_examples"]
    # A build resumes after the shards that still hold what was written (a build record of an earlier version has
    # no checksums: its shards are trusted as they are, and hashed now).
    recorded = building.get("shard_sha256")
    shards, hashes = [], {}
    for shard in finished_shards(directory):
        name = shard_name(*shard)
        digest = file_sha256(os.path.join(directory, name))
        if recorded is not None and recorded.get(name) != digest:
            break  # damaged, or written but not recorded: rebuilt from here
        shards.append(shard)
        hashes[name] = digest
    start = shards[-1][1] if shards else 0
    kept = {shard_name(*shard) for shard in shards}
    for name in os.listdir(directory):  # half-written .tmp files and shards past a gap are not trusted
        if name.startswith("shard-") and name not in kept:
            os.remove(os.path.join(directory, name))
    if start:
        logger.info("Resuming the teacher cache in %s at example %d of %d", directory, start, total)

    def written(name: str, digest: str) -> None:
        hashes[name] = digest
        write_json_atomically(building_path, {**fingerprint, "shard_sha256": hashes})

    write_json_atomically(building_path, {**fingerprint, "shard_sha256": hashes})
    writer = ShardWriter(directory, start, shard_size, written)
    with tqdm(total=total, initial=start, desc="Building the teacher cache", unit="example") as progress:
        with torch.inference_mode():
            seen = start
            for inputs in batches_from(start):
                stored = extractor(inputs, forward(inputs))
                broken = nonfinite_examples(stored)
                if broken:
                    writer.flush()  # the whole shards before stay: a fixed teacher resumes after them
                    raise FloatingPointError(
                        f"the teacher's outputs for training examples {[seen + i for i in broken][:10]} hold NaN or "
                        f"infinite values, so the teacher cache {directory} stops before them (what was built so far "
                        "is kept). A teacher run in float16 overflows past 65,504: load it in float32 or bfloat16; "
                        "otherwise check the teacher on those examples"
                    )
                writer.add(stored)
                seen += len(stored["checksum"])
                progress.update(len(stored["checksum"]))
        writer.flush()
    shards = finished_shards(directory)
    if not shards or shards[-1][1] != total:
        raise RuntimeError(
            f"the teacher cache build in {directory} covered {shards[-1][1] if shards else 0} of {total} examples"
        )
    finished = {**fingerprint, "hf_distill_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "shards": [{"file": shard_name(s, e), "start": s, "end": e, "sha256": hashes[shard_name(s, e)]}
                           for s, e in shards]}  # fmt: skip
    # The build record stays: after damage, deleting cache.json and building again resumes from it.
    write_json_atomically(os.path.join(directory, RECORD_NAME), finished)
    return TeacherCache(directory)


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

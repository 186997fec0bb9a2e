"""The on-disk form of a teacher-output cache: safetensors shards of whole examples and a JSON record.

    <directory>/
        building.json                       the record, while the cache is being built (not readable as a cache)
        shard-000000000-000000512.safetensors  outputs of examples [0, 512), written to a .tmp file then renamed
        ...
        cache.json                          the record plus the shard list: written last, the mark of a whole cache

Each shard holds, for its examples in order: `checksum` (one number per example's inputs), and the teacher
outputs the losses need: `logits` `[examples, classes]`; or, token-level, `rows` (counted positions per
example) with `token.logits` `[rows, vocab]` or `token.values` / `token.indices` `[rows, k]` and
`token.log_normalizer` / `token.tail` `[rows, temperatures]`; or, for question answering, `span.start_logits` and
`span.end_logits` by real token with `span_rows` (real tokens per example); and `hidden.<layer>`, by example, or
for text by real token with `hidden_rows` (real tokens per example); an encoder-decoder's by stack, as
`encoder_hidden.<layer>` (with `encoder_hidden_rows`) and `decoder_hidden.<layer>` by labeled position (with
`decoder_hidden_rows`), next to `label_checksum` (its labels set the decoder's inputs).
Reading slices the memory-mapped shards, so no whole-cache tensor is ever loaded.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..saving import is_disk_full

FORMAT_VERSION = 1
RECORD_NAME = "cache.json"
BUILDING_NAME = "building.json"
_SHARD_PATTERN = re.compile(r"^shard-(\d{9})-(\d{9})\.safetensors$")
#: Tensors stored by rows (several per example) rather than by example: name prefix -> tensor of row counts.
ROW_COUNTS = {
    "token.": "rows",
    "hidden.": "hidden_rows",
    "encoder_hidden.": "encoder_hidden_rows",
    "decoder_hidden.": "decoder_hidden_rows",
    "span.": "span_rows",
}


def shard_name(start: int, end: int) -> str:
    return f"shard-{start:09d}-{end:09d}.safetensors"


def write_json_atomically(path: str, content: dict[str, Any]) -> None:
    """Write to a temporary file and rename, so a reader sees the old file or the whole new one."""
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def finished_shards(directory: str) -> list[tuple[int, int]]:
    """The shards on disk that continue each other from example 0, as `(start, end)`; stray files are ignored."""
    found = {}
    for name in os.listdir(directory):
        match = _SHARD_PATTERN.match(name)
        if match:
            found[int(match.group(1))] = int(match.group(2))
    shards, position = [], 0
    while position in found:
        shards.append((position, found[position]))
        position = found[position]
    return shards


class ShardWriter:
    """Collects per-batch outputs and writes them as shards of at least `shard_size` whole examples."""

    def __init__(self, directory: str, start: int, shard_size: int):
        self.directory, self.start, self.shard_size = directory, start, shard_size
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.pending_examples = 0

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        for name, tensor in batch.items():
            self.pending.setdefault(name, []).append(tensor.detach().cpu())
        self.pending_examples += len(batch["checksum"])
        if self.pending_examples >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending_examples:
            return
        end = self.start + self.pending_examples
        path = os.path.join(self.directory, shard_name(self.start, end))
        tensors = {name: torch.cat(parts).contiguous() for name, parts in self.pending.items()}
        try:
            save_file(tensors, path + ".tmp")
        except OSError as error:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + ".tmp")
            if not is_disk_full(error):
                raise
            raise OSError(
                error.errno,
                f"no space left on the device while writing the teacher cache in {self.directory} ({error}); the "
                "shards written before are kept: free space (or choose another teacher_cache) and build again, "
                "which resumes after them",
            ) from error
        os.replace(path + ".tmp", path)  # a shard is either absent or whole
        self.start, self.pending, self.pending_examples = end, {}, 0


class _Shard:
    def __init__(self, path: str, start: int, end: int):
        self.start, self.end = start, end
        self.file = safe_open(path, framework="pt")
        self.names = set(self.file.keys())
        # Offsets of each example's rows, for the tensors stored by rows rather than by example.
        self.offsets = {}
        for counts in ROW_COUNTS.values():
            if counts in self.names:
                rows = self.file.get_tensor(counts).long()
                self.offsets[counts] = torch.cat([torch.zeros(1, dtype=torch.long), rows.cumsum(0)]).tolist()

    def read(self, name: str, example: int) -> torch.Tensor:
        """The part of tensor `name` that belongs to `example` (an index into the whole cache)."""
        local = example - self.start
        counts = next((c for prefix, c in ROW_COUNTS.items() if name.startswith(prefix) and c in self.offsets), None)
        if counts is None:
            return self.file.get_slice(name)[local : local + 1]
        offsets = self.offsets[counts]
        return self.file.get_slice(name)[offsets[local] : offsets[local + 1]]


class CacheReader:
    """Random access to a finished cache's examples through memory-mapped shards."""

    def __init__(self, directory: str, record: dict[str, Any]):
        self.shards = [
            _Shard(os.path.join(directory, shard["file"]), shard["start"], shard["end"]) for shard in record["shards"]
        ]
        self.starts = [shard.start for shard in self.shards]
        self.names = sorted(self.shards[0].names) if self.shards else []
        self.num_examples = self.shards[-1].end if self.shards else 0

    def gather(self, examples: list[int]) -> dict[str, torch.Tensor]:
        """Every stored tensor for `examples`, concatenated in their order (rows of an example stay together)."""
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        for example in examples:
            if not 0 <= example < self.num_examples:
                raise IndexError(f"example {example} is outside the teacher cache's {self.num_examples} examples")
            shard = self.shards[bisect.bisect_right(self.starts, example) - 1]
            for name in self.names:
                parts[name].append(shard.read(name, example))
        return {name: torch.cat(values) for name, values in parts.items()}

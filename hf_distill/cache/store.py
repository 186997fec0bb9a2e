"""The on-disk form of a teacher-output cache: safetensors shards of whole examples and a JSON record.

    <directory>/
        building.json                       the build's record, with each shard's sha256 as it is written: a build
                                            (and a rebuild after damage) resumes from the shards that still match
        shard-000000000-000000512.safetensors  outputs of examples [0, 512), written to a .tmp file then renamed
        ...
        cache.json                          the record plus the shard list (each shard's sha256): written last, the
                                            mark of a whole cache

Each shard holds, for its examples in order: `checksum` (one number per example's inputs), and the teacher
outputs the losses need: `logits` `[examples, classes]`; or, token-level, `rows` (counted positions per
example) with `token.logits` `[rows, vocab]` or `token.values` / `token.indices` `[rows, k]` and
`token.log_normalizer` / `token.tail` `[rows, temperatures]`; or, for question answering, `span.start_logits` and
`span.end_logits` by real token with `span_rows` (real tokens per example); and `hidden.<layer>`, by example, or
for text by real token with `hidden_rows` (real tokens per example); an encoder-decoder's by stack, as
`encoder_hidden.<layer>` (with `encoder_hidden_rows`) and `decoder_hidden.<layer>` by labeled position (with
`decoder_hidden_rows`), next to `label_checksum` (its labels set the decoder's inputs). A teacher with another
tokenizer adds its aligned groups by group, with `group_rows` (groups per example): `group.start` / `group.stop`,
the teacher's distribution of each (`group.<i>.log_probs`, or `group.<i>.values` / `group.<i>.indices`) and, for
hidden states, `group.hidden.<layer>` ([`hf_distill.cache.groups`]).
Reading slices the memory-mapped shards, so no whole-cache tensor is ever loaded.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable
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
    "group.": "group_rows",
}


def row_counts_key(name: str) -> str | None:
    """The key of the per-example row counts of stored tensor `name`, None for a tensor stored by example."""
    return next((counts for prefix, counts in ROW_COUNTS.items() if name.startswith(prefix)), None)


def shard_name(start: int, end: int) -> str:
    return f"shard-{start:09d}-{end:09d}.safetensors"


def write_json_atomically(path: str, content: dict[str, Any]) -> None:
    """Write to a temporary file and rename, so a reader sees the old file or the whole new one."""
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON file at `path`, None when there is none; a damaged one is an error that names it."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise damaged(path, f"is not valid JSON ({error})", os.path.dirname(path) or ".") from None


def finished_shards(directory: str) -> list[tuple[int, int]]:
    """The shards on disk that continue each other from example 0, as `(start, end)`; stray files are ignored."""
    found = dict(held_shards(directory))
    shards, position = [], 0
    while position in found:
        shards.append((position, found[position]))
        position = found[position]
    return shards


def held_shards(directory: str) -> list[tuple[int, int]]:
    """Every shard on disk as `(start, end)`, in order of `start`, wherever it starts; stray files are ignored."""
    matches = [_SHARD_PATTERN.match(name) for name in os.listdir(directory)]
    return sorted((int(match.group(1)), int(match.group(2))) for match in matches if match)


class ShardWriter:
    """Collects per-batch outputs and writes them as shards of at least `shard_size` whole examples; `written(name,
    sha256)` is told of each shard once it is in place."""

    def __init__(self, directory: str, start: int, shard_size: int, written: Callable[[str, str], None]):
        self.directory, self.start, self.shard_size, self.written = directory, start, shard_size, written
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
        digest = file_sha256(path + ".tmp")
        os.replace(path + ".tmp", path)  # a shard is either absent or whole
        self.written(os.path.basename(path), digest)
        self.start, self.pending, self.pending_examples = end, {}, 0


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def damaged(path: str, problem: str, directory: str) -> ValueError:
    """The error for a damaged or missing file of the cache in `directory`: it names the file and the fix."""
    if os.path.basename(path) != BUILDING_NAME and os.path.isfile(os.path.join(directory, BUILDING_NAME)):
        fix = (
            f"Delete {os.path.join(directory, RECORD_NAME)} and build again (pass the teacher with the same "
            "teacher_cache): the build resumes, keeping the shards that still match their checksums and rebuilding "
            "the rest"
        )
    else:  # written before builds kept their record
        fix = f"Delete {directory} and build it again (pass the teacher with the same teacher_cache)"
    return ValueError(f"the teacher cache file {path} {problem}: the cache cannot be trusted. {fix}")


class _Shard:
    """One shard, memory-mapped; its bytes are checked against the record's sha256 before its first read."""

    def __init__(self, path: str, start: int, end: int, sha256: str | None, directory: str):
        self.path, self.start, self.end, self.sha256, self.directory = path, start, end, sha256, directory
        self.verified = sha256 is None  # a cache written before shards carried checksums is read as it is
        if not os.path.isfile(path):
            raise damaged(path, "is missing", directory)
        try:
            self.file = safe_open(path, framework="pt")
        except Exception as error:  # safetensors' own error type: a truncated or overwritten header
            raise damaged(path, f"is not a whole safetensors file ({error})", directory) from None
        self.names = set(self.file.keys())
        # Offsets of each example's rows, for the tensors stored by rows rather than by example.
        self.offsets = {}
        for counts in ROW_COUNTS.values():
            if counts in self.names:
                rows = self.file.get_tensor(counts).long()
                self.offsets[counts] = torch.cat([torch.zeros(1, dtype=torch.long), rows.cumsum(0)]).tolist()

    def verify(self) -> None:
        """Compare the shard's bytes with the sha256 recorded when it was written (once per run)."""
        if not self.verified:
            if file_sha256(self.path) != self.sha256:
                raise damaged(
                    self.path, "does not hold the bytes it was written with (its sha256 differs)", self.directory
                )
            self.verified = True

    def read(self, name: str, example: int) -> torch.Tensor:
        """The part of tensor `name` that belongs to `example` (an index into the whole cache)."""
        self.verify()
        local = example - self.start
        counts = row_counts_key(name)
        if counts not in self.offsets:
            return self.file.get_slice(name)[local : local + 1]
        offsets = self.offsets[counts]
        return self.file.get_slice(name)[offsets[local] : offsets[local + 1]]


class CacheReader:
    """Random access to a finished cache's examples through memory-mapped shards."""

    def __init__(self, directory: str, record: dict[str, Any]):
        self.shards = [
            _Shard(
                os.path.join(directory, shard["file"]), shard["start"], shard["end"], shard.get("sha256"), directory
            )
            for shard in record["shards"]
        ]
        self.starts = [shard.start for shard in self.shards]
        self.names = sorted(self.shards[0].names) if self.shards else []
        self.num_examples = self.shards[-1].end if self.shards else 0

    def verify(self) -> None:
        """Check every shard's bytes against its recorded sha256 now, in one pass (reads check each shard anyway,
        before their first use)."""
        for shard in self.shards:
            shard.verify()

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

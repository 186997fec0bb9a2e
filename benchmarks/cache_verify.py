"""What checking a teacher cache's shards costs, against a cached training step, on the benchmark pairs.

    python benchmarks/cache_verify.py           # the pairs of benchmarks/run.py at its full shapes
    python benchmarks/cache_verify.py --quick   # small shapes, a spot check

For each pair: the cache `benchmarks/run.py` builds (its losses, top-64 logits for token-level tasks), the seconds
of one SHA-256 pass over all its shards (`TeacherCache.verify`, the median of 5), and the median cached KD step.
A run reads every shard once per epoch and checks each before its first read, so the check adds, per step, the
hash of one step's worth of examples: `verify seconds x batch / examples`. Prints one JSON line; the worst pair's
ratio to the cached step is `verify_over_cached_step` (target < 0.02).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (benchmarks/run.py: the pairs, their shapes and the timed training runs)

from hf_distill import DistillationTrainer  # noqa: E402
from hf_distill.cache import TeacherCache  # noqa: E402


def measure(name: str, quick: bool) -> dict[str, float]:
    shape = run.pair_shape(name, run.SHAPES["quick" if quick else "full"], quick)
    teacher, student, data, losses = run.PAIRS[name](shape, quick)
    with tempfile.TemporaryDirectory() as scratch:
        folder = os.path.join(scratch, "cache")
        DistillationTrainer(
            model=student, teacher_model=teacher, train_dataset=data,
            args=run.benchmark_config(scratch, losses, shape, teacher_cache=folder),
        )  # fmt: skip
        cache = TeacherCache(folder)
        size = sum(os.path.getsize(os.path.join(folder, shard["file"])) for shard in cache.record["shards"])
        seconds = []
        for _ in range(5):
            cache = TeacherCache(folder)  # a fresh reader: nothing checked yet
            start = time.perf_counter()
            cache.verify()
            seconds.append(time.perf_counter() - start)
        steps = run.train_steps(student, None, data, losses, shape, scratch, teacher_cache=folder)
    verify = statistics.median(seconds)
    per_step = verify * shape["batch"] / len(data)
    step = statistics.median(steps)
    return {"cache_bytes": size, "examples": len(data), "verify_s": verify, "verify_per_step_s": per_step,
            "cached_step_s": step, "ratio": per_step / step, "hash_mb_per_s": size / verify / 1e6}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    pairs = {name: measure(name, options.quick) for name in run.PAIRS}
    print(json.dumps({"pairs": pairs, "verify_over_cached_step": max(p["ratio"] for p in pairs.values())}))


if __name__ == "__main__":
    main()

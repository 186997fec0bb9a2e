"""The random streams training draws from, kept as the Trainer seeded them while a trainer is put together.

`transformers.Trainer` seeds Python's, NumPy's and torch's generators when it is built. Everything the distillation
trainer does after that and before training (probing the models, building a teacher cache) runs inside
`preserved_random_state()`, so none of it shifts the draws of dropout or shuffling: online distillation, a run that
builds a cache and one that reads it draw the same numbers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def preserved_random_state() -> Iterator[None]:
    """Run the block, then put Python's, NumPy's and torch's random generators (CUDA's too) back as they were."""
    python, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)

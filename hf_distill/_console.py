"""Lines that dependencies print while `hf_distill` is imported and that a user cannot act on, dropped at the
loggers that print them (imported first by the package, before transformers imports torchao):

- torchao, when installed, tries to load its CUDA kernels (`_C_mxfp8`, `_C_cutlass_90a`) and logs each failure:
  on a machine without CUDA they could never run, so the lines are dropped there (kept where CUDA is present);
- torch logs that torchao registers two Enum classes in a way it will stop accepting: a note for torchao's
  developers.

Everything else those loggers say still reaches the console.
"""

from __future__ import annotations

import logging

import torch


class DropLines(logging.Filter):
    """Drops the log records whose message contains one of `parts`."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


if not torch.cuda.is_available():
    logging.getLogger("torchao").addFilter(DropLines("Failed to load"))
logging.getLogger("torch.utils._pytree").addFilter(DropLines("is an Enum subclass and is now natively supported"))

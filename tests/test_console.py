"""A fresh `hf-distill` process prints nothing a user cannot act on before its own output."""

from __future__ import annotations

import logging
import subprocess
import sys

from hf_distill._console import DropLines
from hf_distill.pipeline import available_recipes

# Lines dependencies print at import that tell the user nothing to do (torchao's CUDA kernels on a CPU machine,
# torch's note to torchao's developers, DeepSpeed choosing the CPU).
KNOWN_NOISE = ["Failed to load", "is an Enum subclass", "Setting accelerator to CPU"]


def test_hf_distill_help_in_a_fresh_process_prints_only_the_usage():
    code = "import sys; from hf_distill.cli import main; sys.exit(main(['--help']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = result.stdout + result.stderr
    assert printed.startswith("usage: ") and "--recipe" in printed, printed[:2000]
    assert all(f"  {name} " in printed for name in available_recipes())  # the recipes are listed after the flags
    assert [line for line in printed.splitlines() if any(noise in line for noise in KNOWN_NOISE)] == []


def test_the_filter_drops_only_the_lines_it_names():
    dropped = DropLines("Failed to load")
    make = lambda message: logging.LogRecord("torchao", logging.WARNING, __file__, 1, message, None, None)  # noqa: E731
    assert not dropped.filter(make("Failed to load /x/_C_mxfp8.so: no CUDA"))
    assert dropped.filter(make("Quantization of this layer skipped"))

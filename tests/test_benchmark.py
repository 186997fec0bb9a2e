"""The benchmark script runs and prints its ratios (slow: run with `make test-slow`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCHMARK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "run.py")


@pytest.mark.slow
def test_quick_benchmark_prints_every_ratio():
    result = subprocess.run([sys.executable, BENCHMARK, "--quick"], capture_output=True, text=True, check=True)
    ratios = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(ratios) == {
        "online_over_parts",
        "cached_over_plain",
        "cache_build_over_inference",
        "token_kl_peak_saving",
        "kd_peak_over_plain",
        "online_over_hard_label_parts",
        "cached_over_hard_label",
        "kd_peak_over_hard_label",
    }
    assert ratios["online_over_parts"] > 0 and ratios["kd_peak_over_plain"] > 0
    assert 0 < ratios["token_kl_peak_saving"] < 1

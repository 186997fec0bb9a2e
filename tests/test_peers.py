"""benchmarks/peers.py runs its contenders on tiny shapes and shows they did the same work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl", reason="the peers benchmark needs the [bench] extra (TRL)")

PEERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "peers.py")


def test_quick_peers_prints_every_ratio_and_the_contenders_agree():
    result = subprocess.run([sys.executable, PEERS, "--quick"], capture_output=True, text=True, check=True)
    lines = result.stdout.strip().splitlines()
    ratios = json.loads(lines[-1])
    assert {
        "causal_lm_step_vs_trl",
        "causal_lm_peak_vs_trl",
        "vision_online_vs_guide",
        "vision_cached_3_epochs_vs_guide",
    } <= set(ratios)
    assert all(value > 0 for value in ratios.values())
    # The report's tables: three causal-LM contenders and three vision ones, each with a step time and a loss.
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| contender")]
    assert len(rows) == 6
    # hf_distill and TRL trained the causal LM to the same loss; the vision losses agree at the common start.
    assert "warning: the causal" not in result.stdout
    assert "warning: the vision start" not in result.stdout

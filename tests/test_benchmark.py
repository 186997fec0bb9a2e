"""The benchmark script runs and prints its ratios (slow: run with `make test-slow`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

KINDS = ("plain", "hard_label", "online", "cached")
BENCHMARK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "run.py")


@pytest.mark.slow
def test_quick_benchmark_prints_every_ratio():
    command = [sys.executable, BENCHMARK, "--quick", "--peak_tflops", "0.5"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    lines = result.stdout.strip().splitlines()
    ratios = json.loads(lines[-1])
    assert set(ratios) == {
        "online_over_parts",
        "cached_over_plain",
        "cache_build_over_inference",
        "token_kl_peak_saving",
        "kd_peak_over_plain",
        "online_over_hard_label_parts",
        "cached_over_hard_label",
        "kd_peak_over_hard_label",
        "finite_check_overhead",
        "hard_label_over_plain",
    }
    # Each ratio's spread over the rounds, per pair.
    assert sum(line.startswith("| ") and "(" in line and "–" in line for line in lines) == 3
    assert ratios["online_over_parts"] > 0 and ratios["kd_peak_over_plain"] > 0
    assert 0 < ratios["token_kl_peak_saving"] < 1
    # Steps/s, FLOPs and, given a peak (a GPU's is looked up by name), the fraction of it reached, per step kind.
    rows = [line.split("|")[1:-1] for line in lines if line.count("|") == 7 and line.split("|")[2].strip() in KINDS]
    assert len(rows) == 3 * len(KINDS)  # BERT, ViT and GPT-2 pairs
    for _, _, steps_per_s, tflop, tflops, fraction in rows:
        assert float(steps_per_s) > 0 and float(tflop) > 0
        assert float(fraction.strip().rstrip("%")) == pytest.approx(100 * float(tflops) / 0.5, abs=0.1)


@pytest.mark.slow
def test_quick_on_policy_benchmark_runs_every_arm_and_prints_the_table():
    script = os.path.join(os.path.dirname(BENCHMARK), "on_policy.py")
    result = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, check=True)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    arms = ["sft", "supervised_kd", "seq_kd", "on_policy_beta_0", "on_policy_beta_0.5", "on_policy_beta_1",
            "mixed_beta_0.5", "on_policy_skew_kl"]  # fmt: skip
    assert [row.split(" | ")[0][2:] for row in rows] == ["teacher", "warmed-up student (start of every arm)", *arms]
    # Every arm trained and was scored: a reverse KL on its own samples, and a time.
    for row in rows[2:]:
        cells = row.strip("| ").split(" | ")
        assert float(cells[3].split(" ± ")[0]) > 0 and float(cells[5].split(" ± ")[0]) > 0
    # The verdict: the best on-policy arm against supervised KD, beyond or within twice the seeds' spread.
    verdict = [line for line in result.stdout.splitlines() if line.startswith("- at learning rate")]
    assert len(verdict) == 1 and "the best on-policy arm" in verdict[0] and "twice" in verdict[0]

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
    assert len(verdict) == 2 and all("the best on-policy arm" in line and "twice" in line for line in verdict)
    assert "valid greedily" in verdict[0] and "valid when sampled" in verdict[1]


def test_on_policy_report_from_records_joins_the_arms_of_one_seed_run_apart(tmp_path):
    """Records of one seed's arms from two runs (the same sizes) make one row per arm; the verdicts read greedy and
    sampled validity, paired by seed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "on_policy", os.path.join(os.path.dirname(BENCHMARK), "on_policy.py")
    )
    on_policy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(on_policy)
    scores = {"valid_greedy": 1.0, "reverse_kl_on_samples": 0.1, "forward_kl_teacher_forced": 0.1, "time_s": 1.0}
    sizes = {"arm_learning_rates": [0.0005], "warmup_steps": 450}

    def record(arms: dict[str, float]) -> dict:
        return {"teacher": scores, "warmed_up_student": scores, "seed_time_s": 1.0,
                "arms": {"0.0005": {arm: {**scores, "valid_sampled": value} for arm, value in arms.items()}}}  # fmt: skip

    first = {
        "sizes": sizes,
        "records": {str(seed): record({"supervised_kd": 0.70 + seed / 100}) for seed in (1, 2, 3)},
    }
    second = {
        "sizes": sizes,
        "records": {str(seed): record({"on_policy_beta_1": 0.80 + seed / 50}) for seed in (1, 2, 3)},
    }
    for name, content in (("first", first), ("second", second)):
        on_policy.write_json(str(tmp_path / f"{name}.json"), content)
    on_policy.write_from_records([str(tmp_path / "first.json"), str(tmp_path / "second.json")], str(tmp_path / "out"))
    text = (tmp_path / "out.md").read_text(encoding="utf-8")
    assert "| supervised_kd |" in text and "| on_policy_beta_1 |" in text
    (sampled,) = [line for line in text.splitlines() if "valid when sampled" in line]
    assert (
        "+12.0 points, beyond" in sampled
        and "seed by seed +11.0, +12.0, +13.0 (+12.0 ± 1.0, beyond twice its spread)" in sampled
    )
    with pytest.raises(ValueError, match="was run with other sizes before"):
        on_policy.write_json(str(tmp_path / "third.json"), {**second, "sizes": {**sizes, "warmup_steps": 150}})
        on_policy.write_from_records([str(tmp_path / "first.json"), str(tmp_path / "third.json")], str(tmp_path / "x"))


@pytest.mark.slow
def test_quick_cross_tokenizer_benchmark_runs_every_arm_and_compares_each_with_the_labels_alone():
    script = os.path.join(os.path.dirname(BENCHMARK), "cross_tokenizer.py")
    result = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, check=True)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    names = [row.split(" | ")[0][2:] for row in rows]
    assert names == ["teacher (characters tokens)", "teacher (student tokens)", "sft", "uld", "gold_last",
                     "gold_first", "same_tokenizer_kd"]  # fmt: skip
    verdicts = [line for line in result.stdout.splitlines() if line.startswith("- ") and "twice" in line]
    assert len(verdicts) == 3 * 4  # bits per character, greedy and sampled validity, each arm but sft

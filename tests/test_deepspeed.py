"""DeepSpeed ZeRO-2 and ZeRO-3 with a teacher in the loop: the same update as one plain process (CPU, gloo)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed_run import trainer
from helpers import free_port
from safetensors.torch import load_file

TESTS = Path(__file__).parent
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def launch(output_dir: Path, stage: int, *mode: str, processes: int = 1) -> subprocess.CompletedProcess:
    port = str(free_port())
    environment = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   "MASTER_PORT": port}  # fmt: skip
    command = [sys.executable, str(TESTS / "deepspeed_run.py"), str(output_dir), str(stage), *mode]
    if processes > 1:
        command = ["torchrun", "--nproc_per_node", str(processes), "--master_port", port, *command[1:]]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# Launches of DeepSpeed processes: slow (`make test-slow`, and CI); ZeRO-3 over two processes is the main check.
@pytest.mark.parametrize(
    "stage, processes",
    [pytest.param(stage, processes, marks=pytest.mark.slow) for stage, processes in ((2, 2), (3, 1), (3, 2))],
)
def test_zero_trains_like_one_plain_process_with_the_combined_batch(tmp_path, stage, processes):
    # Under ZeRO-3 the teacher's weights are partitioned too, by an inference engine that gathers them per layer;
    # with two processes each holds half of every micro-batch, and the terms are normalised over both halves.
    if processes > 1 and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    output = launch(tmp_path / "deepspeed", stage, processes=processes).stdout
    assert ("TEACHER DeepSpeedEngine True" if stage == 3 else "TEACHER BertForMaskedLM False") in output
    with_deepspeed = load_file(tmp_path / "deepspeed" / "final.safetensors")
    reference = trainer(tmp_path / "plain", per_device_train_batch_size=8)
    reference.train()
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(with_deepspeed[key], value, atol=1e-5, rtol=1e-4, msg=key)
    assert f"CARD {sum(p.numel() for p in reference.model.parameters())}" in output


@pytest.mark.slow  # DeepSpeed launches
def test_what_deepspeed_cannot_do_yet_is_refused_before_training(tmp_path):
    projectors = launch(tmp_path / "projectors", 2, "refuse_projectors").stdout
    assert "REFUSED" in projectors and "learn projectors" in projectors
    cache = launch(tmp_path / "cache", 3, "refuse_cache").stdout
    assert "REFUSED" in cache and "cannot be built under DeepSpeed ZeRO-3" in cache
    assert not (tmp_path / "cache" / "cache").exists()


@pytest.mark.slow  # DeepSpeed launches
def test_zero3_trains_from_a_cache_built_without_it(tmp_path):
    # The cache's record is checked against the run, but a ZeRO-3 teacher's weights (a shard per process) are not
    # hashed: passing the teacher again must not read as "the teacher's weights differ".
    cache = str(tmp_path / "cache")
    reference = trainer(tmp_path / "build", per_device_train_batch_size=8, teacher_cache=cache, teacher_cache_top_k=0)
    reference.train()
    launch(tmp_path / "deepspeed", 3, "from_cache", cache)
    with_deepspeed = load_file(tmp_path / "deepspeed" / "final.safetensors")
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(with_deepspeed[key], value, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow  # one launch of two processes
def test_on_policy_generation_under_zero3_does_not_stall_when_processes_end_at_other_lengths(tmp_path):
    """lmbda 1, the first process's completions end after 1 token and the second's after 4: generation is synced,
    so the first keeps running the sharded student's forward passes (which gather weights the second needs) until
    the second is done, and training goes on; unsynced, the second would wait on it forever."""
    output = launch(tmp_path, 3, "on_policy", processes=2).stdout
    generated = re.findall(r"GENERATED rank (\d) new (\d+) forwards (\d+) synced (True|False)", output)
    assert sorted(set(generated)) == [("0", "1", "4", "True"), ("1", "4", "4", "True")], output
    assert len(generated) == 4  # one generation per step, 2 steps, on each process

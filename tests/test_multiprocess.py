"""Two CPU processes (torchrun, gloo) train exactly like one process with the combined batch."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from ddp_run import run, run_on_policy
from helpers import free_port
from safetensors.torch import load_file

TESTS = Path(__file__).parent


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
# One pair of launches in the default suite; the other teacher kinds are the same check, each a minute of launches
# (`make test-slow`, and CI).
@pytest.mark.parametrize(
    "teacher",
    ["online", *(pytest.param(kind, marks=pytest.mark.slow) for kind in ("cache", "several", "mutual", "on_policy"))],
)
def test_two_processes_match_one_process_with_the_combined_batch(tmp_path, teacher):
    environment = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(TESTS / "ddp_run.py"),
        str(tmp_path / "ddp"),
        # With a cache: process 0 builds it while process 1 waits, then each reads its share of every batch.
        # "several": two teachers, mixed in soft_target, each followed by its own hidden-state term; "mutual": the
        # teacher learns too.
        *([teacher] if teacher != "online" else []),
    ]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two_processes = load_file(tmp_path / "ddp" / "final.safetensors")

    # One process, batch 8 = two processes of 4 (the distributed sampler interleaves, the update is the same
    # only when every term is normalised by the global item count and projector gradients are averaged).
    # On-policy, each process generates for its own prompts: the same completions as the one process (PromptEcho).
    if teacher == "on_policy":
        single = run_on_policy(tmp_path / "single", batch_size=8)
    else:
        single = run(tmp_path / "single", batch_size=8, several=teacher == "several", mutual=teacher == "mutual")
    assert any(key.startswith("losses.") for key in two_processes)
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(two_processes[f"student.{key}"], value, atol=1e-5, rtol=1e-4, msg=key)
    for key, value in single.distillation_losses.state_dict().items():
        torch.testing.assert_close(two_processes[f"losses.{key}"], value, atol=1e-5, rtol=1e-4, msg=key)
    for name, model in single.roster.with_state().items():
        for key, value in model.state_dict().items():
            torch.testing.assert_close(two_processes[f"teacher.{name}.{key}"], value, atol=1e-5, rtol=1e-4, msg=key)
    assert (teacher == "mutual") == any(key.startswith("teacher.") for key in two_processes)


@pytest.mark.slow  # two launches of two nodes, and the one-process run: about a minute
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_nodes_on_one_host_match_one_process_with_the_combined_batch(tmp_path):
    """`torchrun --nnodes 2 --node_rank 0|1`, one process each, meeting at 127.0.0.1 as two machines would at their
    master's address: the same weights as one process with the combined batch."""
    environment = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                "torchrun",
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                str(TESTS / "ddp_run.py"),
                str(tmp_path / "nodes"),
            ],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    two_nodes = load_file(tmp_path / "nodes" / "final.safetensors")
    single = run(tmp_path / "single", batch_size=8)
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(two_nodes[f"student.{key}"], value, atol=1e-5, rtol=1e-4, msg=key)

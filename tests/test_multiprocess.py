"""Two CPU processes (torchrun, gloo) train exactly like one process with the combined batch."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from ddp_run import run, run_on_policy
from helpers import free_port, launch_two_nodes
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
        # With a cache: each process builds every other shard of it, then each reads its share of every batch.
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
    launch_two_nodes("ddp_run.py", str(tmp_path / "nodes"))
    two_nodes = load_file(tmp_path / "nodes" / "final.safetensors")
    single = run(tmp_path / "single", batch_size=8)
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(two_nodes[f"student.{key}"], value, atol=1e-5, rtol=1e-4, msg=key)


def _launch(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), str(TESTS / "ddp_run.py"),
               str(tmp_path), *arguments]  # fmt: skip
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # three launches of two processes: about a minute
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_every_process_builds_its_share_of_the_cache_and_a_killed_build_resumes(tmp_path):
    """Two processes build a cache of 4 shards, every other shard each; process 1 dies after its first shard. The
    build launched again runs only the shards that are missing, and the cache equals one process's build, tensor
    for tensor (the same batches of 2 examples, so the same arithmetic)."""
    from hf_distill.cache import TeacherCache

    cache = tmp_path / "ddp" / "cache"
    stopped = _launch(tmp_path / "ddp", "build_cache_stopped")
    assert stopped.returncode != 0
    assert not TeacherCache.is_finished(str(cache))
    left = sorted(name for name in os.listdir(cache) if name.startswith("shard-"))
    assert "shard-000000004-000000008.safetensors" in left  # process 1's first shard (examples 4..7)
    assert (cache / "building.1.json").exists()  # with its checksum in process 1's own record

    resumed = _launch(tmp_path / "ddp", "build_cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    forwards = [int(line.rsplit(":", 1)[1]) for line in resumed.stdout.splitlines() if line.startswith("FORWARDS")]
    missing = 16 - 4 * len(left)
    assert len(forwards) == 2 and sum(forwards) == missing // 2, resumed.stdout  # batches of 2, only what was lost
    assert sorted(os.listdir(cache)) == ["building.json", "cache.json", *(
        f"shard-{start:09d}-{start + 4:09d}.safetensors" for start in range(0, 16, 4))]  # fmt: skip

    single = build_cache_in_one_process(tmp_path / "single")
    two = TeacherCache(str(cache))
    assert [shard["end"] for shard in two.record["shards"]] == [shard["end"] for shard in single.record["shards"]]
    examples = list(range(16))
    mine, theirs = two.reader.gather(examples), single.reader.gather(examples)
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(mine[name], tensor, rtol=0, atol=0, msg=name)


def build_cache_in_one_process(output_dir: Path):
    from ddp_run import build_cache

    from hf_distill import DistillationTrainer

    size, forward = DistillationTrainer.teacher_cache_shard_size, DistillationTrainer.teacher_forward
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets each of its processes (OMP_NUM_THREADS=1): the same arithmetic
    try:
        return build_cache(output_dir).teacher_cache
    finally:
        DistillationTrainer.teacher_cache_shard_size, DistillationTrainer.teacher_forward = size, forward
        torch.set_num_threads(threads)

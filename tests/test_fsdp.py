"""FSDP2 with a teacher in the loop, the teacher sharded too: the same update as one plain process (CPU, gloo)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fsdp_run import trainer
from helpers import causal_lm, free_port, launch_two_nodes
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_distill.teacher import fsdp_teacher

TESTS = Path(__file__).parent
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")


def launch(output_dir: Path, *mode: str, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    port = str(free_port())
    environment = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   "MASTER_PORT": port}  # fmt: skip
    command = [sys.executable, str(TESTS / "fsdp_run.py"), str(output_dir), *mode]
    if processes > 1:
        command = ["torchrun", "--nproc_per_node", str(processes), "--master_port", port, *command[1:]]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def one_plain_process(output_dir: Path) -> dict[str, torch.Tensor]:
    """The reference: one process, no FSDP, the combined batch of 4 per micro-batch (torchrun's one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = trainer(output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2)
        reference.train()
    finally:
        torch.set_num_threads(threads)
    return reference.model.state_dict()


@pytest.mark.slow  # an FSDP launch of two processes and a plain run: under a minute
def test_fsdp_with_the_teacher_sharded_trains_like_one_plain_process_with_the_combined_batch(tmp_path):
    """Student and teacher both sharded by `fully_shard` over 2 processes, 2 steps of 2 accumulated micro-batches
    of 2 examples each: the weights of one process with micro-batches of 4, to 1e-5. Each process holds half of the
    teacher's weights."""
    output = launch(tmp_path / "fsdp", "train").stdout
    held = [line.split() for line in output.splitlines() if line.startswith("TEACHER")]
    assert len(held) == 2, output
    whole = int(held[0][-1])
    assert all(int(line[4]) <= whole * 0.55 for line in held)  # about half each (a dimension that does not split
    assert sum(int(line[4]) for line in held) >= whole  # 2 ways is padded)
    with_fsdp = load_file(tmp_path / "fsdp" / "final.safetensors")
    reference = one_plain_process(tmp_path / "plain")
    for key, value in reference.items():
        torch.testing.assert_close(with_fsdp[key], value, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow  # FSDP launches
def test_what_fsdp_cannot_do_yet_is_refused_before_training(tmp_path):
    projectors = launch(tmp_path / "projectors", "refuse_projectors").stdout
    assert "REFUSED" in projectors and "learn projectors" in projectors and "FSDP" in projectors
    cache = launch(tmp_path / "cache", "refuse_cache").stdout
    assert "REFUSED" in cache and "cannot be built under FSDP" in cache
    assert not (tmp_path / "cache" / "cache").exists()


def test_a_teacher_under_fsdp1_is_refused_with_the_fix():
    """accelerate builds no FSDP1 plugin without a GPU, so the refusal is checked on the accelerator it reads."""
    plugin = SimpleNamespace(fsdp_version=1)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    with pytest.raises(ValueError, match=r"FSDP2 only: set fsdp_config=\{'version': 2\}"):
        fsdp_teacher(causal_lm(seed=1), accelerator, None)


@pytest.mark.slow  # four FSDP launches: about a minute
@pytest.mark.parametrize("state_dicts", ["full", "sharded"])
def test_a_run_under_fsdp_resumes_exactly_from_its_checkpoint_and_saves_a_plain_student(tmp_path, state_dicts):
    """AdamW over 2 steps, a checkpoint after each, as the Trainer writes them under FSDP (a full state dict, or a
    sharded one through torch.distributed.checkpoint): resuming at step 1 ends on the weights of the run that was not
    interrupted, bit for bit, and the student `save_model` wrote loads with `from_pretrained` as those weights."""
    suffix = "" if state_dicts == "full" else "_sharded"
    launch(tmp_path, f"save{suffix}")
    if state_dicts == "sharded":
        assert (tmp_path / "checkpoint-1" / "pytorch_model_fsdp_0").is_dir()
    launch(tmp_path, f"resume{suffix}")
    uninterrupted, resumed = load_file(tmp_path / "final.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "student").state_dict()
    for key, value in uninterrupted.items():
        assert torch.equal(saved[key], value), key


@pytest.mark.slow  # two FSDP "nodes" and a plain run: under a minute
def test_fsdp_across_two_nodes_trains_like_one_plain_process(tmp_path):
    """Two machines' launches on one host (one process per node), student and teacher sharded across them: the
    weights of one plain process with the combined batch, to 1e-5, each node holding half of the teacher."""
    printed = launch_two_nodes("fsdp_run.py", str(tmp_path / "nodes"), "train")
    held = [line.split() for output in printed for line in output.splitlines() if line.startswith("TEACHER")]
    assert sorted(line[2] for line in held) == ["0", "1"], printed
    assert all(int(line[4]) <= int(line[-1]) * 0.55 for line in held)
    two_nodes = load_file(tmp_path / "nodes" / "final.safetensors")
    reference = one_plain_process(tmp_path / "plain")
    for key, value in reference.items():
        torch.testing.assert_close(two_nodes[key], value, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow  # one launch of two processes
def test_on_policy_generation_under_fsdp_does_not_stall_when_processes_end_at_other_lengths(tmp_path):
    """lmbda 1, the first process's completions end after 1 token and the second's after 4: generation is synced,
    so the first keeps running the sharded student's forward passes (which gather weights the second needs) until
    the second is done, and training goes on; unsynced, the second would wait on it forever."""
    output = launch(tmp_path, "on_policy").stdout
    generated = re.findall(r"GENERATED rank (\d) new (\d+) forwards (\d+) synced (True|False)", output)
    assert sorted(set(generated)) == [("0", "1", "4", "True"), ("1", "4", "4", "True")], output
    assert len(generated) == 4  # one generation per step, 2 steps, on each process

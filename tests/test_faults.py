"""Faults injected on purpose lose nothing: a real SIGKILL in training, in a checkpoint, in a cache build and in a
save, and a full disk. Each run is a subprocess (tests/fault_run.py) that kills itself at a chosen moment.

The kills are end-to-end runs of a minute and more: they are `slow` (`make test-slow`, and CI runs them). In the
default suite the same properties are held in one process: resuming reproduces the uninterrupted run
(tests/test_trainer.py, tests/test_online.py, tests/test_checkpoint_format.py), an interrupted cache build resumes
to the same cache (tests/test_cache.py), saves are staged and a full disk changes nothing (below)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_run import final_state, trainer
from helpers import bert_masked_lm, config, masked_lm_dataset
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from hf_distill import DistillationTrainer
from hf_distill.cache.store import BUILDING_NAME
from hf_distill.cache.teacher_cache import TeacherCache

TESTS = Path(__file__).parent


def launch(output: Path, mode: str, kill_at: int = 0, killed: bool = False) -> None:
    environment = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, str(TESTS / "fault_run.py"), str(output), mode, str(kill_at)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    expected = -signal.SIGKILL if killed else 0
    assert result.returncode == expected, result.stderr[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    launch(output, "train")
    return load_file(output / "final.safetensors")


def assert_same(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert state.keys() == reference.keys() and any(key.startswith("losses.") for key in state)
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_killed_in_training_then_resumed_gives_the_uninterrupted_student_and_projectors(tmp_path, uninterrupted):
    launch(tmp_path, "train", kill_at=5, killed=True)  # after step 5: the last checkpoint is step 4
    assert (tmp_path / "run" / "checkpoint-4").is_dir() and not (tmp_path / "final.safetensors").exists()
    launch(tmp_path, "resume")
    assert_same(load_file(tmp_path / "final.safetensors"), uninterrupted)


@pytest.mark.slow
def test_teachers_that_learn_resume_after_a_kill_to_the_uninterrupted_run(tmp_path):
    """A trainable teacher (its weights and its optimizer groups) and a moving-average teacher come back exactly."""
    uninterrupted = trainer(tmp_path / "whole", teacher="learning")
    uninterrupted.train()
    whole = final_state(uninterrupted)
    launch(tmp_path / "killed", "train-learning", kill_at=3, killed=True)  # the last checkpoint is step 2
    assert {"teacher-peer.safetensors", "teacher-ema.safetensors"} <= set(
        os.listdir(tmp_path / "killed/run/checkpoint-2")
    )
    launch(tmp_path / "killed", "resume-learning")
    resumed = load_file(tmp_path / "killed" / "final.safetensors")
    assert {"teacher.peer", "teacher.ema"} <= {".".join(key.split(".")[:2]) for key in whole}
    assert resumed.keys() == whole.keys()
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path, uninterrupted):
    launch(tmp_path, "ckpt", kill_at=4, killed=True)
    half_written = tmp_path / "run" / "checkpoint-4"
    assert (half_written / "model.safetensors").is_file() and not (half_written / "trainer_state.json").exists()
    with pytest.raises(ValueError, match="checkpoint-4 has no trainer_state.json: its save was interrupted"):
        trainer(tmp_path).train(resume_from_checkpoint=str(half_written))
    launch(tmp_path, "resume")  # skips checkpoint-4, resumes from checkpoint-2
    assert_same(load_file(tmp_path / "final.safetensors"), uninterrupted)


def cache_tensors(directory: Path) -> dict[str, torch.Tensor]:
    shards = sorted(name for name in os.listdir(directory) if name.startswith("shard-"))
    parts = [load_file(directory / name) for name in shards]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


@pytest.mark.slow
def test_killed_while_building_the_teacher_cache_resumes_to_the_same_cache(tmp_path):
    launch(tmp_path / "whole", "cache")
    launch(tmp_path / "killed", "cache", kill_at=4, killed=True)  # batches of 4, shards of 8: dies in shard 2
    cache = tmp_path / "killed" / "cache"
    assert not TeacherCache.is_finished(str(cache))
    assert "shard-000000000-000000008.safetensors" in os.listdir(cache)
    launch(tmp_path / "killed", "cache")
    assert TeacherCache.is_finished(str(cache))
    whole, resumed = cache_tensors(tmp_path / "whole" / "cache"), cache_tensors(cache)
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["save", "pipeline"])
def test_killed_while_saving_leaves_the_previous_student_loadable(tmp_path, mode):
    launch(tmp_path, mode, killed=True)
    folder = tmp_path / "student"
    first = load_file(tmp_path / "first.safetensors")
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder)  # the first save, whole
    for key, value in reloaded.state_dict().items():
        if key in first:
            torch.testing.assert_close(value, first[key], rtol=0, atol=0, msg=key)
    leftovers = [path for path in tmp_path.iterdir() if path.name.startswith("student.")]
    assert all(".saving-" in path.name for path in leftovers)  # only a staging folder, named as such


def test_a_full_disk_is_a_clear_error_and_changes_nothing(tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    run = trainer(tmp_path)
    folder = tmp_path / "student"
    run.save_model(str(folder))
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    with torch.no_grad():
        next(run.model.parameters()).add_(1.0)
    with pytest.raises(
        OSError, match=r"no space left on the device while saving to .*student.*nothing there was changed"
    ):
        run.save_model(str(folder))
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert [path.name for path in tmp_path.iterdir() if ".saving-" in path.name] == []


def test_a_full_disk_while_building_the_cache_keeps_what_was_built(tmp_path, monkeypatch):
    import hf_distill.cache.store as store

    writes = {"count": 0}
    original = store.save_file

    def full_after_one(tensors, path, *args, **kwargs):
        writes["count"] += 1
        if writes["count"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, path, *args, **kwargs)

    monkeypatch.setattr(store, "save_file", full_after_one)
    monkeypatch.setattr(DistillationTrainer, "teacher_cache_shard_size", 8)
    cache = tmp_path / "cache"
    args = config(tmp_path, {"soft_target": {"weight": 1.0}}, teacher_cache=str(cache), teacher_cache_top_k=0,
                  per_device_eval_batch_size=4)  # fmt: skip
    with pytest.raises(OSError, match=r"no space left on the device while writing the teacher cache .*resumes"):
        DistillationTrainer(model=bert_masked_lm(1, layers=2), teacher_model=bert_masked_lm(0), args=args,
                            train_dataset=masked_lm_dataset(24))  # fmt: skip
    # The whole shard before stays, and nothing half-written: a later build resumes after that shard.
    assert sorted(os.listdir(cache)) == sorted([BUILDING_NAME, "shard-000000000-000000008.safetensors"])

"""A checkpoint written by an earlier version of the trainer resumes now, and the run ends where that version's did.

`tests/data/checkpoint-format` was written by the trainer as it stood before its parts moved into objects of their
own (a 4-step run of a student with a projector and a teacher that learns, checkpointed at step 2): `checkpoint-2`,
and `final.safetensors` with the student's, the projector's and the teacher's weights after step 4. The file
names and formats of a checkpoint are public: this test holds them still.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from helpers import bert_classifier, config, text_dataset
from safetensors.torch import load_file

from hf_distill import DistillationTrainer

DATA = Path(__file__).parent / "data" / "checkpoint-format"
LOSSES = {"hard_label": {"weight": 1.0}, "soft_target": {"weight": 1.0, "temperature": 2.0},
          "hidden_state": {"weight": 1.0, "layer_map": [[-1, -1]]}}  # fmt: skip


def trainer(output_dir) -> DistillationTrainer:
    return DistillationTrainer(
        model=bert_classifier(seed=2, layers=2, width=8, heads=2),
        teacher_model=bert_classifier(seed=1),
        args=config(
            output_dir,
            LOSSES,
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            weight_decay=0.01,
            trainable_teachers=["teacher"],
            trainable_teacher_learning_rate=5e-4,
        ),
        train_dataset=text_dataset(16),
    )


def weights(run: DistillationTrainer) -> dict[str, torch.Tensor]:
    parts = {"student": run.model, "losses": run.distillation_losses, "teacher": run.teachers["teacher"].reference}
    return {f"{part}.{key}": value for part, module in parts.items() for key, value in module.state_dict().items()}


def test_a_checkpoint_of_the_earlier_trainer_resumes_to_the_same_weights(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(DATA / "checkpoint-2", checkpoint)
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    expected = load_file(DATA / "final.safetensors")
    actual = weights(resumed)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_an_uninterrupted_run_ends_where_the_earlier_trainers_did(tmp_path):
    run = trainer(tmp_path)
    run.train()
    expected = load_file(DATA / "final.safetensors")
    for key, value in weights(run).items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=1e-5, msg=key)

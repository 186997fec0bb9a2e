"""benchmarks/peers.py runs its contenders on tiny shapes and shows they did the same work."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl", reason="the peers benchmark needs the [bench] extra (TRL)")

PEERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "peers.py")


@pytest.mark.slow  # the whole benchmark at small shapes; TRL's divergence is checked against ours below
def test_quick_peers_prints_every_ratio_and_the_contenders_agree():
    result = subprocess.run([sys.executable, PEERS, "--quick"], capture_output=True, text=True, check=True)
    lines = result.stdout.strip().splitlines()
    ratios = json.loads(lines[-1])
    assert {
        "causal_lm_step_vs_trl",
        "causal_lm_peak_vs_trl",
        "vision_online_vs_guide",
        "vision_cached_3_epochs_vs_guide",
        "on_policy_step_vs_trl",
        "on_policy_peak_vs_trl",
    } <= set(ratios)
    assert all(value > 0 for value in ratios.values())
    # The report's tables: three contenders off-policy, three on-policy and three vision ones (and three against
    # Liger Kernel where it is installed).
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| contender")]
    liger = importlib.util.find_spec("liger_kernel") is not None
    assert len(rows) == 9 + 3 * liger
    if liger:
        assert {"causal_lm_step_vs_liger", "causal_lm_peak_vs_liger"} <= set(ratios)
        assert "warning: the liger" not in result.stdout
    # On-policy, every contender generated once per timed step and the time in generate is part of the step's.
    section = result.stdout.split("## Causal LM on-policy")[1].split("## ")[0]
    on_policy = [line.split(" | ") for line in section.splitlines() if line in rows]
    assert len(on_policy) == 3
    assert all(0 < float(row[2]) < float(row[1]) for row in on_policy)
    # hf_distill and TRL trained the causal LM to the same loss; the vision losses agree at the common start.
    assert "warning: the causal" not in result.stdout
    assert "warning: the vision start" not in result.stdout


@pytest.mark.parametrize(
    ("beta", "divergence"),
    [
        (0.5, "jsd"),
        (0.0, "forward_kl"),
        (1.0, "reverse_kl"),
        *[(beta, ("generalized_jsd", beta)) for beta in (0.0, 0.1, 0.5, 0.9, 1.0)],
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_trl_generalized_jsd_is_hf_distill_divergence(beta, divergence, temperature):
    """TRL's GKD loss at beta 0.5 / 0 / 1 and hf_distill's jsd / forward_kl / reverse_kl, and at any beta hf_distill's
    generalized_jsd with that beta: the same per-token divergence. TRL sums over the labeled shifted positions and
    divides by `num_items_in_batch`; given the same count the two agree. TRL has no T² factor: at T = 2 hf_distill's
    loss is 4 times TRL's."""
    import torch

    from hf_distill.losses.functional import Divergence, soft_target_loss

    if isinstance(divergence, tuple):
        divergence = Divergence(divergence[0], beta=divergence[1])

    gkd = pytest.importorskip("trl.experimental.gkd")
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 40, generator=generator), torch.randn(2, 6, 40, generator=generator)
    labels = torch.randint(0, 40, (2, 6), generator=generator)
    labels[0, :2] = -100
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    ours = soft_target_loss(student, teacher, temperature, divergence, mask=labels != -100, reduction="mean")
    torch.testing.assert_close(temperature**2 * trl_loss, ours, rtol=1e-5, atol=1e-7)


def test_one_on_policy_batch_loss_equals_trl_gkd_trainer_on_the_same_student_samples(tmp_path):
    """lmbda 1, beta 0.5, T 1: hf_distill's trainer generates the student's samples for its step; TRL's
    `GKDTrainer.compute_loss` (TRL's own method, bound to a stand-in holding its teacher and beta) is fed that same
    micro-batch. Both losses are the generalized JSD summed over completion tokens over their count, to 1e-5."""
    import torch
    from helpers import causal_lm, config, pad_right, prompt_completion_dataset

    from hf_distill import DistillationTrainer

    gkd = pytest.importorskip("trl.experimental.gkd")
    seen = []

    class Recording(DistillationTrainer):
        def compute_distillation_loss(self, student_outputs, teacher_outputs, inputs):
            loss, terms = super().compute_distillation_loss(student_outputs, teacher_outputs, inputs)
            if self.model.training:
                seen.append(({key: inputs[key].clone() for key in ("input_ids", "attention_mask", "labels")}, loss))
            return loss, terms

    student, teacher = causal_lm(2), causal_lm(1, layers=3)
    losses = {"soft_target": {"weight": 1.0, "divergence": "generalized_jsd", "beta": 0.5, "temperature": 1.0}}
    trainer = Recording(
        model=student,
        teacher_model=teacher,
        args=config(
            tmp_path,
            losses,
            max_steps=1,
            per_device_train_batch_size=4,
            learning_rate=0.0,
            lmbda=1.0,
            rollout_generation={"max_new_tokens": 6},
        ),  # fmt: skip
        train_dataset=prompt_completion_dataset(8),
        data_collator=pad_right,
    )
    trainer.train()
    ((batch, ours),) = seen
    assert trainer.completion_source == "student" and int((batch["labels"] != -100).sum()) > 4

    stand_in = type("GKD", (), {"teacher_model": teacher, "beta": 0.5, "temperature": 1.0})()
    stand_in.generalized_jsd_loss = gkd.GKDTrainer.generalized_jsd_loss
    student.eval()  # no dropout either way; TRL runs the teacher in eval mode itself
    with torch.no_grad():
        theirs = gkd.GKDTrainer.compute_loss(stand_in, student, batch)
    torch.testing.assert_close(ours.detach(), theirs, rtol=1e-5, atol=1e-7)

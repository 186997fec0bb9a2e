"""The shared row loop (`hf_distill.losses.row_terms`) and the closed-form gradients it uses
(`hf_distill.losses.gradients`), each against autograd through the functions of `hf_distill.losses.functional`."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.nn import functional as F

from hf_distill.cache import contents as cache_contents
from hf_distill.logit_rows import ProjectedRows
from hf_distill.losses import row_terms
from hf_distill.losses.functional import Divergence, soft_target_loss, teacher_top_k, topk_soft_target_loss
from hf_distill.losses.gradients import (
    cross_entropy_value_and_grad,
    divergence_value_and_grad,
    sampled_token_value_and_grad,
    topk_value_and_grad,
)
from hf_distill.losses.row_terms import RowTerm, shared_rows_loss, teacher_log_probs
from hf_distill.losses.sampled import sampled_token_loss

ROWS, VOCAB, WIDTH = 13, 37, 8
DIVERGENCES = [
    Divergence("forward_kl"),
    Divergence("reverse_kl"),
    Divergence("jsd"),
    Divergence("generalized_jsd", beta=0.3),
    Divergence("generalized_jsd", beta=0.0),
    Divergence("generalized_jsd", beta=1.0),
    Divergence("skew_kl", alpha=0.1),
    Divergence("skew_kl", alpha=0.0),
    Divergence("skew_reverse_kl", alpha=0.1),
    Divergence("skew_reverse_kl", alpha=0.0),
]


def logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def autograd(function, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    student = student.clone().requires_grad_(True)
    value = function(student)
    (grad,) = torch.autograd.grad(value, student)
    return value.detach(), grad


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=lambda d: f"{d.name}-{d.beta}-{d.alpha}")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_divergence_has_its_autograd_value_and_gradient_in_closed_form(divergence, temperature):
    student, teacher = logits(0), logits(1)
    expected, expected_grad = autograd(
        lambda z: soft_target_loss(z, teacher, temperature, divergence, reduction="sum"), student
    )
    value, grad = divergence_value_and_grad(
        F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1), temperature, divergence
    )
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_the_closed_forms_hold_where_the_two_distributions_barely_overlap():
    # Peaked and far apart: probabilities down to e^-60, where a mixture computed from probabilities would underflow.
    student, teacher = logits(2, scale=20.0), logits(3, scale=20.0)
    for divergence in DIVERGENCES:
        expected, expected_grad = autograd(
            partial(soft_target_loss, teacher_logits=teacher, temperature=1.0, divergence=divergence, reduction="sum"),
            student,
        )
        value, grad = divergence_value_and_grad(
            F.log_softmax(student, -1), F.log_softmax(teacher, -1), 1.0, divergence
        )
        assert torch.isfinite(grad).all(), divergence
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=lambda d: f"{d.name}-{d.beta}-{d.alpha}")
def test_near_identical_distributions_the_closed_forms_stay_within_1_percent_of_float64(divergence):
    # A student a hair from its teacher: the divergence is ~1e-3, where float32 cancellation shows. The autograd path
    # is off by up to 5% here (skew KL at alpha 0.1, generalized JSD at beta 0.3: its mixture is shifted in log space).
    generator = torch.Generator().manual_seed(9)
    student = torch.randn(50, 4096, generator=generator) * 0.05
    teacher = student + torch.randn(50, 4096, generator=generator) * 0.01
    exact = (divergence(F.log_softmax(student.double() / 2, -1), F.log_softmax(teacher.double() / 2, -1)) * 4).sum()
    closed, _ = divergence_value_and_grad(
        F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1), 2.0, divergence
    )
    assert abs(closed.double() - exact) <= 1e-2 * exact


def test_cross_entropy_and_the_sampled_token_loss_in_closed_form():
    student, teacher = logits(4), logits(5)
    tokens = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(6))
    expected, expected_grad = autograd(lambda z: F.cross_entropy(z, tokens, reduction="sum"), student)
    value, grad = cross_entropy_value_and_grad(F.log_softmax(student, -1), tokens)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)
    expected, expected_grad = autograd(lambda z: sampled_token_loss(z, teacher, tokens), student)
    teacher_chosen = F.log_softmax(teacher, -1).gather(-1, tokens[:, None]).squeeze(-1)
    value, grad = sampled_token_value_and_grad(F.log_softmax(student, -1), teacher_chosen, tokens)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("k", [5, VOCAB])
@pytest.mark.parametrize("divergence", [Divergence("forward_kl"), Divergence("jsd"), Divergence("skew_reverse_kl")],
                         ids=lambda d: d.name)  # fmt: skip
def test_the_top_k_loss_of_a_teacher_cache_in_closed_form(k, divergence):
    student, teacher, temperature = logits(7), logits(8), 2.0
    values, indices, normalizers, tails = teacher_top_k(teacher, k, [temperature])
    tail = None if tails is None else tails[:, 0]
    expected, expected_grad = autograd(
        lambda z: topk_soft_target_loss(
            z, values, indices, normalizers[:, 0], tail, temperature, divergence, reduction="sum"
        ),
        student,
    )
    value, grad = topk_value_and_grad(
        F.log_softmax(student / temperature, -1), values, indices, normalizers[:, 0], tail, temperature, divergence
    )
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def projected(seed: int, bias: bool = True) -> ProjectedRows:
    generator = torch.Generator().manual_seed(seed)
    return ProjectedRows(
        torch.randn(ROWS, WIDTH, generator=generator).requires_grad_(True),
        torch.randn(VOCAB, WIDTH, generator=generator).requires_grad_(True),
        torch.randn(VOCAB, generator=generator).requires_grad_(True) if bias else None,
    )


def three_terms(teacher: ProjectedRows, tokens: torch.Tensor) -> tuple[list[RowTerm], list]:
    """A JSD at T = 2 against a teacher projected chunk by chunk, cross-entropy, and a user's term through autograd;
    and the same three on full logits."""

    def jsd(chunk):
        return divergence_value_and_grad(
            chunk.log_probs(2.0), teacher_log_probs(chunk, teacher, 2.0), 2.0, Divergence("jsd")
        )

    def cross_entropy(chunk):
        return cross_entropy_value_and_grad(chunk.log_probs(), tokens[chunk.start : chunk.end])

    def squares(rows, start, end):
        return (rows.float().softmax(-1) ** 2).sum()

    terms = [RowTerm(jsd), RowTerm(cross_entropy), RowTerm.from_row_loss(squares)]
    full = [
        lambda z: soft_target_loss(z, teacher.logits().detach(), 2.0, "jsd", reduction="sum"),
        lambda z: F.cross_entropy(z, tokens, reduction="sum"),
        lambda z: squares(z, 0, ROWS),
    ]
    return terms, full


@pytest.mark.parametrize("grouped", [False, True], ids=["one-group", "groups-of-5"])
@pytest.mark.parametrize("combine", ["planned", "other"])
def test_the_shared_loop_gives_each_term_and_every_gradient_of_the_projected_logits(combine, grouped, monkeypatch):
    if grouped:  # groups of 5 rows projected at once (5, 5, 3), chunks of 4 inside them: (0-4, 4-5), (5-9, 9-10)...
        monkeypatch.setattr(row_terms, "GROUP_ELEMENTS", 5 * VOCAB)
        assert row_terms.group_rows(ROWS, 4, VOCAB) == 5
    student, teacher = projected(0), projected(1, bias=False)
    tokens = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(2))
    terms, full = three_terms(teacher, tokens)
    coefficients = [0.5, 2.0, 0.25]
    # "other": the caller combines the totals otherwise than it said (an override reweighting the terms).
    used = coefficients if combine == "planned" else [1.5, 0.0, 4.0]
    totals = shared_rows_loss(student, terms, coefficients, chunk_size=4)  # 13 rows: 4 chunks, the last of 1
    (7.0 * sum(c * total for c, total in zip(used, totals, strict=True))).backward()
    grads = [tensor.grad.clone() for tensor in (student.hidden, student.weight, student.bias)]
    for tensor in (student.hidden, student.weight, student.bias):
        tensor.grad = None
    logits = student.logits()
    expected = [function(logits) for function in full]
    torch.testing.assert_close(totals.detach(), torch.stack(expected).detach(), rtol=1e-5, atol=1e-6)
    (7.0 * sum(c * total for c, total in zip(used, expected, strict=True))).backward()
    for grad, tensor in zip(grads, (student.hidden, student.weight, student.bias), strict=True):
        torch.testing.assert_close(grad, tensor.grad, rtol=1e-5, atol=1e-5)
    assert teacher.weight.grad is None  # the teacher's rows are targets


def test_without_gradients_the_loop_only_sums():
    student, teacher = projected(0), projected(1)
    tokens = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(2))
    terms, full = three_terms(teacher, tokens)
    with torch.no_grad():
        totals = shared_rows_loss(student, terms, chunk_size=5)
        expected = torch.stack([function(student.logits()) for function in full])
    assert not totals.requires_grad
    torch.testing.assert_close(totals, expected, rtol=1e-5, atol=1e-6)


def test_rows_are_projected_a_group_at_a_time_in_groups_of_even_size():
    assert row_terms.group_rows(1016, 83, 50257) == 508  # 2**25 elements hold 667 rows: two groups of 508
    assert row_terms.group_rows(1016, 83, 30522) == 1016  # BERT's vocabulary: one group
    assert row_terms.group_rows(5000, 83, 50257) == 625  # 8 groups
    assert row_terms.group_rows(10, 64, 10**9) == 10  # never fewer rows than a chunk's


def test_each_chunk_is_projected_once_for_all_terms():
    student = projected(0)
    calls = []
    tokens = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(2))

    def counted(chunk):
        calls.append((chunk.start, chunk.end, chunk.logits.data_ptr()))
        return cross_entropy_value_and_grad(chunk.log_probs(), tokens[chunk.start : chunk.end])

    shared_rows_loss(student, [RowTerm(counted), RowTerm(counted)], chunk_size=6)
    # Two terms, three chunks: each chunk's logits are one tensor both terms read.
    assert [(start, end) for start, end, _ in calls] == [(0, 6), (0, 6), (6, 12), (6, 12), (12, 13), (12, 13)]
    assert calls[0][2] == calls[1][2] and calls[2][2] == calls[3][2]


# ---- through the trainer: the shared loop against each term's own path on materialized logits ----------------------

TRAINER_CASES = {
    **{
        f"soft_target-{name}": {
            "soft_target": {"weight": 1.0, "temperature": 2.0, "divergence": name, **option, "chunk_size": 7},
            "hard_label": {"weight": 0.5},
        }
        for name, option in (
            ("forward_kl", {}),
            ("reverse_kl", {}),
            ("generalized_jsd", {"beta": 0.3}),
            ("skew_kl", {"alpha": 0.1}),
            ("skew_reverse_kl", {"alpha": 0.1}),
        )
    },
    "sampled_token": {"sampled_token": {"weight": 1.0, "chunk_size": 5}, "hard_label": {"weight": 0.5}},
    "top_k_cache": {
        "soft_target": {"weight": 1.0, "temperature": 2.0, "chunk_size": 7},
        "hard_label": {"weight": 0.5},
    },
}


def recording(function, calls: list):
    """`function`, appending what it returns to `calls`."""

    def recorded(*args, **kwargs):
        calls.append(function(*args, **kwargs))
        return calls[-1]

    return recorded


def spread(model):
    """`model` with logits of a few units, not hundredths: the divergences between two such models are well above float32
    rounding, which the autograd path of a divergence near zero is not (the closed forms are the more accurate there)."""
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30.0)  # GPT-2 ties its output projection to it
    return model


@pytest.mark.parametrize("case", sorted(TRAINER_CASES))
def test_the_trainer_shares_one_loop_and_trains_exactly_like_materialized_logits(tmp_path, case):
    from helpers import config
    from test_logit_rows import causal_lm_dataset, gpt2

    from hf_distill import DistillationTrainer

    losses = TRAINER_CASES[case]
    cache = {"teacher_cache_top_k": 8} if case == "top_k_cache" else {}
    runs = {}
    for fused in (True, False):
        extra = {**cache, "teacher_cache": str(tmp_path / f"cache-{fused}")} if cache else {}
        trainer = DistillationTrainer(
            model=spread(gpt2(seed=2)),
            teacher_model=spread(gpt2(seed=1, layers=3)),
            args=config(
                tmp_path / str(fused),
                losses,
                max_steps=3,
                fused_token_logits=fused,
                gradient_accumulation_steps=2,
                **extra,
            ),  # fmt: skip
            train_dataset=causal_lm_dataset(24),
        )
        assert trainer.logit_rows.defers("student") is fused
        calls = []
        if fused:
            trainer.terms.shared_row_totals = recording(trainer.terms.shared_row_totals, calls)
        trainer.train()
        if fused:  # every training batch went through the shared loop, with both terms
            assert calls and all(set(totals) == set(losses) for totals in calls)
        runs[fused] = trainer
    for a, b in zip(runs[True].state.log_history, runs[False].state.log_history, strict=True):
        for key in (*losses, "loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for key, value in runs[False].model.state_dict().items():
        torch.testing.assert_close(runs[True].model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_the_loss_of_writing_a_loss_md_takes_part_in_the_shared_loop(tmp_path):
    import pathlib
    import re

    from helpers import config
    from test_logit_rows import causal_lm_dataset, gpt2

    from hf_distill import DistillationTrainer

    text = (pathlib.Path(__file__).parent.parent / "docs" / "writing-a-loss.md").read_text()
    example = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "row_term" in block)
    exec(compile(example, "writing-a-loss.md", "exec"), {})
    losses = {"hard_label": {"weight": 1.0}, "label_entropy": {"weight": 0.1}}
    runs = {}
    for fused in (True, False):
        trainer = DistillationTrainer(
            model=spread(gpt2(seed=2)),
            args=config(tmp_path / str(fused), losses, max_steps=2, fused_token_logits=fused),
            train_dataset=causal_lm_dataset(16),
        )
        assert trainer.logit_rows.defers("student") is fused
        trainer.train()
        runs[fused] = trainer
    assert "label_entropy" in runs[True].state.log_history[0]
    for a, b in zip(runs[True].state.log_history, runs[False].state.log_history, strict=True):
        for key in (*losses, "loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.mark.parametrize("bias", [False, True])
def test_a_cache_build_from_unprojected_rows_stores_what_the_whole_logits_give(bias, monkeypatch):
    """`token_rows` projects groups of rows into one buffer and reduces them to the top k in it: the stored values,
    indices, normalisers and tails are those of the logits projected whole, peaked rows (tails past float32's
    exponentials) included."""
    monkeypatch.setattr(row_terms, "GROUP_ELEMENTS", 5 * VOCAB)  # groups of 5 rows: 5, 5, 3
    teacher = projected(1, bias=bias)
    with torch.no_grad():
        teacher.hidden[0] *= 400  # a row whose tail outside the top 4 underflows float32
    stored_contents = {"logits": "top_k", "top_k": 4, "temperatures": [1.0, 2.0]}
    from_rows = cache_contents.token_rows(teacher, stored_contents)
    whole = cache_contents.token_rows(teacher.logits().detach(), stored_contents)
    assert set(from_rows) == {"token.values", "token.indices", "token.log_normalizer", "token.tail"}
    assert torch.isfinite(from_rows["token.tail"]).all() and from_rows["token.tail"][0, 0] < -80
    for key, tensor in whole.items():
        torch.testing.assert_close(from_rows[key], tensor, rtol=1e-5, atol=1e-5)

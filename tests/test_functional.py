"""Loss math on plain tensors: published formulas, masking, invariances."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_distill.losses import chunked_soft_target_loss
from hf_distill.losses import functional as L
from hf_distill.losses.functional import soft_target_loss


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(6, 10, generator=generator) * 3, torch.randn(6, 10, generator=generator) * 3


@pytest.mark.parametrize("divergence", L.DIVERGENCES)
def test_soft_target_is_zero_for_identical_logits(logits, divergence):
    student, _ = logits
    assert L.soft_target_loss(student, student.clone(), 4.0, divergence).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_soft_target_matches_the_vision_guide_formula(logits, temperature):
    student, teacher = logits
    # KLDiv(batchmean)(log_softmax(s/T), softmax(t/T)) * T^2, as in the HF computer-vision distillation guide.
    reference = (
        F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1), reduction="batchmean")
        * temperature**2
    )
    ours = L.soft_target_loss(student, teacher, temperature)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    # The T^2 factor: the same divergence without it is T^2 times smaller.
    unscaled = L.soft_target_loss(student, teacher, temperature) / temperature**2
    direct = (
        (
            F.softmax(teacher / temperature, -1)
            * (F.log_softmax(teacher / temperature, -1) - F.log_softmax(student / temperature, -1))
        )
        .sum(-1)
        .mean()
    )
    assert unscaled.item() == pytest.approx(direct.item(), rel=1e-5)


def test_t_squared_keeps_gradient_scale_at_high_temperature(logits):
    # Hinton et al.: at high T the gradient of KL*T^2 w.r.t. the student logits tends to (s - t) / (N * T)
    # times T^2 / T = (s - t)/N for zero-mean logits, i.e. it does not vanish as T grows.
    student, teacher = logits
    student = (student - student.mean(-1, keepdim=True)).requires_grad_(True)
    teacher = teacher - teacher.mean(-1, keepdim=True)
    grads = []
    for temperature in (20.0, 40.0):
        (grad,) = torch.autograd.grad(L.soft_target_loss(student, teacher, temperature, reduction="sum"), student)
        grads.append(grad.norm().item())
    assert grads[0] == pytest.approx(grads[1], rel=0.05)
    assert grads[0] > 0.01


def test_token_level_soft_target_matches_distilbert_ce(logits):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, 30, generator=generator)
    teacher = torch.randn(2, 5, 30, generator=generator)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    temperature = 2.0
    # DistilBERT: select the masked positions, KLDivLoss(batchmean) over them, times T^2.
    reference = (
        F.kl_div(
            F.log_softmax(student[mask] / temperature, -1),
            F.softmax(teacher[mask] / temperature, -1),
            reduction="batchmean",
        )
        * temperature**2
    )
    assert L.soft_target_loss(student, teacher, temperature, mask=mask).item() == pytest.approx(
        reference.item(), rel=1e-5
    )
    assert L.soft_target_loss(student, teacher, temperature, mask=mask, reduction="sum").item() == pytest.approx(
        reference.item() * 5, rel=1e-5
    )


def test_masked_positions_do_not_count():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(2, 4, 8, generator=generator)
    teacher = torch.randn(2, 4, 8, generator=generator)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    before = L.soft_target_loss(student, teacher, 2.0, mask=mask)
    student[~mask] = torch.randn_like(student[~mask]) * 100
    teacher[~mask] = 0.0
    assert L.soft_target_loss(student, teacher, 2.0, mask=mask).item() == pytest.approx(before.item(), rel=1e-6)


def test_jsd_is_symmetric_and_bounded(logits):
    student, teacher = logits
    forward = L.soft_target_loss(student, teacher, 1.0, "jsd", reduction="none")
    backward = L.soft_target_loss(teacher, student, 1.0, "jsd", reduction="none")
    torch.testing.assert_close(forward, backward)
    assert forward.max().item() <= math.log(2) + 1e-6
    assert forward.min().item() > 0


def test_reverse_kl_swaps_the_arguments(logits):
    student, teacher = logits
    torch.testing.assert_close(
        L.soft_target_loss(student, teacher, 3.0, "reverse_kl"),
        L.soft_target_loss(teacher, student, 3.0, "forward_kl"),
    )
    assert not torch.allclose(
        L.soft_target_loss(student, teacher, 3.0, "reverse_kl"), L.soft_target_loss(student, teacher, 3.0)
    )


def test_soft_target_rejects_other_shapes():
    with pytest.raises(ValueError, match="same classes"):
        L.soft_target_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_hidden_state_distances():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 8, generator=generator)
    teacher = torch.randn(2, 5, 8, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert L.hidden_state_loss(student, student, "mse").item() == 0.0
    assert L.hidden_state_loss(student, student * 3.0, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    expected_mse = (student - teacher).pow(2).mean(-1)[mask].mean()
    assert L.hidden_state_loss(student, teacher, "mse", mask).item() == pytest.approx(expected_mse.item(), rel=1e-6)
    # DistilBERT's cosine embedding loss (target 1) on the real positions.
    expected_cos = F.cosine_embedding_loss(student[mask], teacher[mask], torch.ones(int(mask.sum())))
    assert L.hidden_state_loss(student, teacher, "cosine", mask).item() == pytest.approx(expected_cos.item(), rel=1e-6)
    padded = teacher.clone()
    padded[~mask] = 1e3
    assert L.hidden_state_loss(student, padded, "mse", mask).item() == pytest.approx(expected_mse.item(), rel=1e-6)


@pytest.mark.parametrize("distance", L.ATTENTION_DISTANCES)
def test_attention_loss_zero_and_masking(distance):
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(2, 3, 4, 4, generator=generator).softmax(-1)
    teacher = torch.randn(2, 3, 4, 4, generator=generator).softmax(-1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert L.attention_loss(student, student.clone(), distance, mask).item() == pytest.approx(0.0, abs=1e-6)
    before = L.attention_loss(student, teacher, distance, mask)
    assert before.item() > 0
    teacher[:, :, 3] = torch.full((4,), 0.25)  # a padding query row
    assert L.attention_loss(student, teacher, distance, mask).item() == pytest.approx(before.item(), rel=1e-6)


def test_attention_relations_are_distributions_that_ignore_padding_keys():
    generator = torch.Generator().manual_seed(5)
    vectors = torch.randn(2, 5, 12, generator=generator)
    key_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    relations = L.self_attention_relations(vectors, 3, key_mask).exp()
    assert relations.shape == (2, 3, 5, 5)
    torch.testing.assert_close(relations.sum(-1), torch.ones(2, 3, 5))
    assert relations[0, :, :, 4].max().item() < 1e-6
    assert relations[1, :, :, 2:].max().item() < 1e-6
    # Widths may differ between models once split into the same number of relation heads.
    wider = L.self_attention_relations(torch.randn(2, 5, 24, generator=generator), 3, key_mask)
    assert L.relation_kl_loss(L.self_attention_relations(vectors, 3, key_mask), wider).item() > 0
    with pytest.raises(ValueError, match="divisible"):
        L.self_attention_relations(vectors, 5)


def test_relation_losses_are_scale_invariant_and_width_free():
    generator = torch.Generator().manual_seed(6)
    student = torch.randn(8, 6, generator=generator)
    teacher = torch.randn(8, 20, generator=generator)
    for loss in (L.similarity_preserving_loss, L.distance_relation_loss):
        assert loss(student, student * 5.0).item() == pytest.approx(0.0, abs=1e-6)
        assert loss(student, teacher).item() > 0
        assert loss(student * 7.0, teacher).item() == pytest.approx(loss(student, teacher).item(), rel=1e-4)


def test_similarity_preserving_matches_its_definition():
    generator = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(4, 3, generator=generator), torch.randn(4, 5, generator=generator)
    gs = F.normalize(student @ student.T, dim=1)
    gt = F.normalize(teacher @ teacher.T, dim=1)
    expected = ((gs - gt) ** 2).sum() / 16
    assert L.similarity_preserving_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)


def test_feature_map_loss_pools_to_the_smaller_grid():
    generator = torch.Generator().manual_seed(8)
    teacher = torch.randn(2, 4, 2, 2, generator=generator)
    # A student map that is the teacher upsampled 2x pools back to it exactly.
    student = teacher.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert L.feature_map_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert L.feature_map_loss(student + 1.0, teacher).item() == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="channels"):
        L.feature_map_loss(torch.zeros(2, 3, 2, 2), teacher)


@pytest.mark.parametrize(
    "divergence",
    [
        "forward_kl",
        "reverse_kl",
        "jsd",
        L.Divergence("generalized_jsd", beta=0.2),
        L.Divergence("skew_kl", alpha=0.1),
        L.Divergence("skew_reverse_kl", alpha=0.3),
    ],
)
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_chunked_soft_target_matches_the_plain_loss_in_value_and_gradient(divergence, chunk_size):
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(3, 11, 97, generator=generator)).requires_grad_(True)
    teacher = 3 * torch.randn(3, 11, 97, generator=generator)
    mask = torch.rand(3, 11, generator=generator) < 0.6
    plain = soft_target_loss(student, teacher, 2.0, divergence, mask=mask, reduction="sum")
    (plain_grad,) = torch.autograd.grad(plain, student)
    chunked = chunked_soft_target_loss(student, teacher, 2.0, divergence, mask=mask, chunk_size=chunk_size)
    (chunked_grad,) = torch.autograd.grad(2.5 * chunked, student)  # an outer factor reaches the gradient
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(chunked_grad, 2.5 * plain_grad, rtol=1e-5, atol=1e-6)
    assert chunked_grad[~mask].abs().max() == 0  # positions outside the mask get no gradient


def test_chunked_soft_target_without_mask_counts_every_position_and_keeps_the_dtype():
    student = torch.randn(2, 5, 13, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(2, 5, 13, dtype=torch.bfloat16)
    loss = chunked_soft_target_loss(student, teacher, 1.0, chunk_size=3)
    expected = soft_target_loss(student, teacher, 1.0, reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert student.grad.dtype == torch.bfloat16 and student.grad.shape == student.shape


def _top_k_loss(student, teacher, k, temperature, divergence="forward_kl"):
    values, indices, normalizer, tail = L.teacher_top_k(teacher, k, [temperature])
    return L.topk_soft_target_loss(
        student, values, indices, normalizer[:, 0], None if tail is None else tail[:, 0], temperature, divergence,
        reduction="sum",
    )  # fmt: skip


@pytest.mark.parametrize("temperatures", [[1.0], [0.5, 2.0]])
def test_teacher_top_k_normaliser_and_tail_match_their_definitions_in_float64(temperatures):
    """log Z_T = logsumexp(z / T) and tail = logsumexp of the rows outside the top k at T, minus log Z_T; also on
    peaked rows, whose tails lie beyond float32's exponentials, and rows with masked (-inf) words."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 3000, generator=generator) * 3
    logits[0] *= 40  # a tail near e^-216
    logits[1] *= 12
    logits[2, 100:] = float("-inf")  # a finite tail over a masked vocabulary
    logits[3, 10:] = float("-inf")  # nothing outside the top k
    values, indices, normalizers, tails = L.teacher_top_k(logits, 64, temperatures)
    exact = logits.double()
    expected_values, expected_indices = exact.topk(64, dim=-1)
    torch.testing.assert_close(values.double(), expected_values)
    finite_values = torch.isfinite(expected_values)  # which of the tied -inf words are in the top k is arbitrary
    assert torch.equal(indices[finite_values], expected_indices[finite_values])
    assert torch.equal(logits.gather(-1, indices), values)
    for column, temperature in enumerate(temperatures):
        normalizer = torch.logsumexp(exact / temperature, dim=-1)
        rest = (exact / temperature).scatter(-1, expected_indices, float("-inf"))
        tail = torch.logsumexp(rest, dim=-1) - normalizer
        torch.testing.assert_close(normalizers[:, column].double(), normalizer, rtol=1e-6, atol=1e-5)
        assert torch.isneginf(tails[3, column]) and torch.isfinite(tails[:3, column]).all()
        finite = torch.isfinite(tail)
        torch.testing.assert_close(tails[finite, column].double(), tail[finite], rtol=1e-5, atol=1e-5)
    # Written into the caller's logits instead of new tensors: the same results, peaked rows included.
    overwritten = L.teacher_top_k(logits.clone(), 64, temperatures, overwrite=True)
    for mine, given in zip(overwritten, (values, indices, normalizers, tails), strict=True):
        assert torch.equal(mine, given)


@pytest.mark.parametrize("divergence", L.DIVERGENCES)
def test_top_k_over_the_whole_vocabulary_is_the_exact_loss(divergence):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(20, 50, generator=generator) * 3).requires_grad_(True)
    teacher = torch.randn(20, 50, generator=generator) * 3
    exact = soft_target_loss(student, teacher, 2.0, divergence, reduction="sum")
    (exact_grad,) = torch.autograd.grad(exact, student)
    top = _top_k_loss(student, teacher, 50, 2.0, divergence)
    (top_grad,) = torch.autograd.grad(top, student)
    torch.testing.assert_close(top, exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(top_grad, exact_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", L.DIVERGENCES)
def test_top_k_with_a_merged_tail_bounds_the_exact_loss_from_below_and_tightens_with_k(divergence):
    generator = torch.Generator().manual_seed(1)
    vocab = 1000
    # Peaked, language-model-like teacher rows; a student that disagrees in the head and in the tail.
    teacher = torch.randn(64, vocab, generator=generator) * 2 + torch.linspace(8, 0, vocab)
    student = teacher + torch.randn(64, vocab, generator=generator)
    exact = soft_target_loss(student, teacher, 2.0, divergence, reduction="sum").item()
    approximations = [_top_k_loss(student, teacher, k, 2.0, divergence).item() for k in (8, 64, 256, 999)]
    assert all(value <= exact * (1 + 1e-5) for value in approximations)
    assert approximations == sorted(approximations)  # more of the vocabulary kept, closer to the exact loss
    assert approximations[-1] == pytest.approx(exact, rel=1e-3)


def test_top_k_tail_equals_the_exact_loss_when_the_tails_are_proportional():
    generator = torch.Generator().manual_seed(2)
    teacher = torch.randn(8, 100, generator=generator) * 3
    student = teacher.clone()
    _, indices = teacher.topk(10, dim=-1)
    # Move the student's head only: inside the tail both distributions keep the same shape.
    student.scatter_(-1, indices, torch.randn(8, 10, generator=generator) * 3)
    exact = soft_target_loss(student, teacher, 1.0, reduction="sum")
    torch.testing.assert_close(_top_k_loss(student, teacher, 10, 1.0), exact, rtol=1e-5, atol=1e-6)


def kl_of_probabilities(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ prediction) of probability rows, written from its definition."""
    return (target * (target / prediction).log()).sum(-1)


GKD_AND_DISTILLM = [
    # (divergence, its formula by hand from p = teacher, q = student)
    (L.Divergence("generalized_jsd", beta=0.0), lambda p, q: kl_of_probabilities(p, q)),
    (L.Divergence("generalized_jsd", beta=1.0), lambda p, q: kl_of_probabilities(q, p)),
    *[
        (
            L.Divergence("generalized_jsd", beta=beta),
            lambda p, q, b=beta: (
                b * kl_of_probabilities(p, b * p + (1 - b) * q) + (1 - b) * kl_of_probabilities(q, b * p + (1 - b) * q)
            ),
        )
        for beta in (0.1, 0.5, 0.9)
    ],
    *[
        (L.Divergence("skew_kl", alpha=alpha), lambda p, q, a=alpha: kl_of_probabilities(p, a * p + (1 - a) * q))
        for alpha in (0.0, 0.1, 0.6)
    ],
    *[
        (
            L.Divergence("skew_reverse_kl", alpha=alpha),
            lambda p, q, a=alpha: kl_of_probabilities(q, (1 - a) * p + a * q),
        )
        for alpha in (0.0, 0.1, 0.6)
    ],
]


@pytest.mark.parametrize(
    ("divergence", "by_hand"), GKD_AND_DISTILLM, ids=lambda d: repr(d) if isinstance(d, L.Divergence) else ""
)
def test_generalized_and_skewed_divergences_equal_their_published_formulas(divergence, by_hand):
    generator = torch.Generator().manual_seed(3)
    student = 2 * torch.randn(5, 9, 30, generator=generator, dtype=torch.float64)
    teacher = 2 * torch.randn(5, 9, 30, generator=generator, dtype=torch.float64)
    mask = torch.rand(5, 9, generator=generator) < 0.7
    temperature = 1.5
    p, q = F.softmax(teacher / temperature, -1), F.softmax(student / temperature, -1)
    expected = (temperature**2 * by_hand(p, q))[mask].sum() / mask.sum()
    ours = soft_target_loss(student, teacher, temperature, divergence, mask=mask, reduction="mean")
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)  # the loss computes in float32


def test_divergence_names_and_parameters():
    student, teacher = torch.randn(4, 12), torch.randn(4, 12)
    same = [
        (L.Divergence("jsd"), L.Divergence("generalized_jsd")),  # beta 0.5 by default
        (L.Divergence("forward_kl"), L.Divergence("skew_kl", alpha=0.0)),
        (L.Divergence("reverse_kl"), L.Divergence("skew_reverse_kl", alpha=0.0)),
    ]
    for one, other in same:
        torch.testing.assert_close(
            soft_target_loss(student, teacher, 1.0, one), soft_target_loss(student, teacher, 1.0, other)
        )
    # DistiLLM's default skew is 0.1: the name alone means alpha 0.1.
    torch.testing.assert_close(
        soft_target_loss(student, teacher, 1.0, "skew_kl"),
        soft_target_loss(student, teacher, 1.0, L.Divergence("skew_kl", alpha=0.1)),
    )
    # The skew bounds the divergence (by log 1/alpha) where the student puts almost no mass on the teacher's choice,
    # which forward KL does not.
    teacher_sure, student_elsewhere = torch.tensor([[60.0, 0.0, 0.0]]), torch.tensor([[0.0, 90.0, 90.0]])
    assert soft_target_loss(student_elsewhere, teacher_sure, 1.0, "forward_kl").item() > 80
    assert soft_target_loss(student_elsewhere, teacher_sure, 1.0, "skew_kl").item() <= math.log(1 / 0.1) + 1e-5
    for bad, message in [
        (dict(name="jsd", beta=0.3), "beta is an option of the generalized_jsd"),
        (dict(name="forward_kl", alpha=0.3), "alpha is an option of the skew_kl and skew_reverse_kl"),
        (dict(name="generalized_jsd", beta=1.2), r"beta must be a number in \[0, 1\]"),
        (dict(name="skew_reverse_kl", alpha=1.0), r"alpha must be a number in \[0, 1\)"),
        (dict(name="skew", alpha=0.1), "divergence must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            L.Divergence(**bad)

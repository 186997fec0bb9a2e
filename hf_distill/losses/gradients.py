"""Token-level losses with their gradients with respect to the student's logits in closed form.

Each function takes one chunk of rows and returns `(value, gradient)`: the loss summed over the rows (float32) and
its gradient with respect to the student's logits (`[rows, vocab]`, float32), without autograd. The shared row loop
([`hf_distill.losses.row_terms`]) calls them once per chunk, adds the terms' gradients, and multiplies the sum by the
vocabulary projection once. The formulas (docs/losses.md, "Gradients in closed form") are:

With u = z / T the student's scaled logits, ℓq = log_softmax(u), q = exp(ℓq), and the teacher's ℓp, p likewise, write
h = ∂D/∂ℓq for the divergence D of a row. Since ℓq = u − logsumexp(u), ∂D/∂u = h − q · Σ h, and the loss T² · D has
the gradient T · (h − q · Σ h) with respect to z. Per divergence (m the mixture, ℓm = log m):

- forward KL, D = Σ p (ℓp − ℓq): h = −p.
- reverse KL, D = Σ q (ℓq − ℓp): h = q (ℓq − ℓp + 1).
- generalized JSD, m = β p + (1 − β) q, D = β KL(p ‖ m) + (1 − β) KL(q ‖ m): h = (1 − β) q (ℓq − ℓm) (the terms
  through m cancel, since β p / m + (1 − β) q / m = 1).
- skew KL, m = α p + (1 − α) q, D = KL(p ‖ m): h = −(1 − α) p q / m.
- skew reverse KL, m = (1 − α) p + α q, D = KL(q ‖ m): h = q (ℓq − ℓm + 1 − α q / m).
- cross-entropy on label y (T = 1): h = −onehot(y), so the gradient is q − onehot(y).
- sampled-token surrogate, a = ℓp(y) − ℓq(y) held constant, loss −a ℓq(y): h = −a onehot(y); its value is
  Σ (ℓq(y) − ℓp(y)), as `sampled_token_loss` reports.
- top-k coarsened (a teacher cache): the divergence is taken over k + 1 outcomes (the teacher's top k and one bucket
  for the rest). With h̃ = ∂D/∂ℓq̃ over those outcomes (autograd on `[rows, k + 1]`, small), and ℓq̃ of a bucket the
  log of its students' mass, ∂D/∂u_i = h̃_j · q_i / q̃_j − q_i · Σ h̃ for the token i in bucket j: at a top-k token
  (a bucket of one) h̃_j − q_i Σ h̃, in the tail q_i (h̃_tail / q̃_tail − Σ h̃).

Every value here equals its autograd counterpart in `functional` (tests/test_row_terms.py holds them to 1e-5).
"""

from __future__ import annotations

import torch

from .functional import Divergence, as_divergence, divergence_from_log_probs

#: Where a mixture of probabilities is taken to the log, the smallest it may be (float32's smallest normal): a mixture
#: that underflows there holds tokens whose probabilities are 0 on both sides, which count for nothing.
_TINY = torch.finfo(torch.float32).tiny


def _parameters(divergence: Divergence) -> tuple[str, float, float]:
    """The divergence as one of forward_kl / reverse_kl / generalized_jsd / skew_kl / skew_reverse_kl with its
    parameters, the limits β ∈ {0, 1} and α = 0 taken as `Divergence` takes them."""
    name = divergence.name
    beta = 0.5 if name == "jsd" or divergence.beta is None else float(divergence.beta)
    alpha = 0.1 if divergence.alpha is None else float(divergence.alpha)
    if name == "jsd":
        name = "generalized_jsd"
    if name == "forward_kl" or (name == "generalized_jsd" and beta == 0) or (name == "skew_kl" and alpha == 0):
        return "forward_kl", beta, alpha
    if name == "reverse_kl" or (name == "generalized_jsd" and beta == 1) or (name == "skew_reverse_kl" and alpha == 0):
        return "reverse_kl", beta, alpha
    return name, beta, alpha


def reads_teacher_probs(divergence: str | Divergence) -> bool:
    """Whether `divergence_value_and_grad` reads the teacher's probabilities, not only their logs (all but reverse KL),
    so that a caller sharing them knows to pass them."""
    return _parameters(as_divergence(divergence))[0] != "reverse_kl"


def _log_mixture(q: torch.Tensor, p: torch.Tensor, share: float) -> torch.Tensor:
    """log(share · p + (1 − share) · q), a new tensor."""
    return torch.lerp(q, p, share).clamp_min_(_TINY).log_()


def divergence_value_and_grad(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    temperature: float,
    divergence: str | Divergence,
    student_probs: torch.Tensor | None = None,
    teacher_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Σ_rows T² · D, ∂/∂z)` for rows of student and teacher log-probabilities at temperature T (float32).

    `student_probs` / `teacher_probs` are their exponentials when already at hand (several terms share them); they
    are read, never written. Each divergence takes one transcendental pass at most beyond them (the log of a
    mixture), the other passes being products and sums.
    """
    name, beta, alpha = _parameters(as_divergence(divergence))
    lq, lp = student_log_probs, teacher_log_probs
    q = lq.exp() if student_probs is None else student_probs
    p = lp.exp() if teacher_probs is None and reads_teacher_probs(divergence) else teacher_probs
    if name == "forward_kl":  # h = −p: the gradient is q Σp − p
        work = torch.sub(lp, lq).mul_(p)
        value = work.sum()
        grad = torch.mul(q, p.sum(-1, keepdim=True), out=work).sub_(p)
        scale = 1.0
    elif name == "reverse_kl":  # h = q (ℓq − ℓp) + q: the gradient is q (ℓq − ℓp) + q (1 − KL − Σq)
        grad = torch.sub(lq, lp).mul_(q)
        rows = grad.sum(-1, keepdim=True)
        value = rows.sum()
        grad.addcmul_(q, 1.0 - rows - q.sum(-1, keepdim=True))
        scale = 1.0
    elif name == "generalized_jsd":  # h = (1 − β) q (ℓq − ℓm): the gradient is (1 − β)(h' − q Σh'), h' = q (ℓq − ℓm)
        log_mixture = _log_mixture(q, p, beta)
        teacher_part = torch.sub(lp, log_mixture).mul_(p).sum()
        grad = torch.sub(lq, log_mixture, out=log_mixture).mul_(q)
        rows = grad.sum(-1, keepdim=True)
        value = beta * teacher_part + (1 - beta) * rows.sum()
        grad.addcmul_(q, rows, value=-1.0)
        scale = 1 - beta
    elif name == "skew_kl":  # h = −(1 − α) r, r = p q / m: the gradient is (1 − α)(q Σr − r)
        log_mixture = _log_mixture(q, p, alpha)
        value = torch.sub(lp, log_mixture).mul_(p).sum()
        ratio = torch.sub(lq, log_mixture, out=log_mixture).exp_().mul_(p)  # q / m, then p q / m
        grad = torch.mul(q, ratio.sum(-1, keepdim=True)).sub_(ratio)
        scale = 1 - alpha
    else:  # skew_reverse_kl, h = q (ℓq − ℓm) + q − α q² / m
        log_mixture = _log_mixture(q, p, 1 - alpha)
        ratio = torch.sub(lq, log_mixture, out=log_mixture)  # ℓq − ℓm
        grad = torch.mul(ratio, q)
        value = grad.sum()
        ratio.exp_().mul_(q)  # q² / m
        grad.add_(q).sub_(ratio, alpha=alpha)
        grad.addcmul_(q, grad.sum(-1, keepdim=True), value=-1.0)
        scale = 1.0
    scale *= temperature
    if scale != 1.0:
        grad.mul_(scale)
    return value * temperature**2, grad


def cross_entropy_value_and_grad(
    log_probs: torch.Tensor, targets: torch.Tensor, probs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Σ_rows −ℓq(y), ∂/∂z)` for rows of the student's log-probabilities at T = 1 and their labels y (`probs`, their
    exponentials, read and not written)."""
    index = targets.unsqueeze(-1)
    value = -log_probs.gather(-1, index).sum()
    grad = log_probs.exp() if probs is None else probs.clone()
    grad.scatter_add_(-1, index, torch.full_like(index, -1.0, dtype=grad.dtype))
    return value, grad


def sampled_token_value_and_grad(
    log_probs: torch.Tensor,
    teacher_log_probs_of_tokens: torch.Tensor,
    tokens: torch.Tensor,
    probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampled_token_loss`'s value Σ (ℓq(y) − ℓp(y)) and the gradient of −Σ a · ℓq(y), a = ℓp(y) − ℓq(y) constant."""
    index = tokens.unsqueeze(-1)
    student = log_probs.gather(-1, index).squeeze(-1)
    advantage = teacher_log_probs_of_tokens - student
    grad = (log_probs.exp() if probs is None else probs).mul(advantage.unsqueeze(-1))
    grad.scatter_add_(-1, index, -advantage.unsqueeze(-1))
    return (-advantage).sum(), grad


def topk_value_and_grad(
    student_log_probs: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_log_normalizer: torch.Tensor,
    teacher_tail: torch.Tensor | None,
    temperature: float,
    divergence: str | Divergence,
    student_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Σ_rows T² · D̃, ∂/∂z)` for `topk_soft_target_loss`'s coarsened divergence, from the student's log-probabilities
    at temperature T over the whole vocabulary (and their exponentials, `student_probs`, when at hand)."""
    indices = teacher_indices.long()
    lq = student_log_probs
    with torch.enable_grad():
        top = lq.gather(-1, indices)
        teacher = teacher_values.float() / temperature - teacher_log_normalizer.float().unsqueeze(-1)
        if teacher_tail is not None:
            tail = torch.logsumexp(lq.scatter(-1, indices, float("-inf")), dim=-1)
            coarse = torch.cat([top, tail.unsqueeze(-1)], dim=-1).requires_grad_(True)
            teacher = torch.cat([teacher, teacher_tail.float().clamp_min(-1e4).unsqueeze(-1)], dim=-1)
        else:
            tail = None
            coarse = top.requires_grad_(True)
        per_row = divergence_from_log_probs(coarse, teacher, divergence)
        value = per_row.sum()
        (h_coarse,) = torch.autograd.grad(value, coarse)
    total = h_coarse.sum(-1, keepdim=True)
    q = lq.exp() if student_probs is None else student_probs
    if tail is not None:
        # Every token as a tail token first: q_i (h̃_tail / q̃_tail − Σ h̃), with q_i / q̃_tail as exp(ℓq_i − ℓq̃_tail).
        grad = (lq - tail.unsqueeze(-1)).exp_().mul_(h_coarse[:, -1:]).sub_(q * total)
        head = h_coarse[:, :-1]
    else:
        grad = q.mul(total).neg_()
        head = h_coarse
    # Then the top-k tokens, each a bucket of its own: h̃_j − q_i Σ h̃.
    grad.scatter_(-1, indices, head - q.gather(-1, indices) * total)
    if temperature != 1.0:
        grad.mul_(temperature)
    return value.detach() * temperature**2, grad

"""Distillation losses as pure tensor functions.

Every function here works on plain tensors, holds no state and knows nothing of models, so each can be
tested (and reused) alone. The modules in `hf_distill.losses` wrap them, pick the tensors out of model
outputs and own the learnable parts (projectors).

Reductions: `"sum"` adds the loss of every selected item (a sequence, a token, a query row...), `"mean"`
divides that sum by the number of selected items, `"none"` returns one value per item with the
unselected ones set to zero. The trainer uses `"sum"` and divides by the item count of the whole
accumulated batch, which keeps gradient accumulation exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "generalized_jsd", "skew_kl", "skew_reverse_kl")
TEACHER_MIXTURES = ("probabilities", "logits")
HIDDEN_DISTANCES = ("mse", "cosine")
ATTENTION_DISTANCES = ("kl", "mse")
REDUCTIONS = ("sum", "mean", "none")


def reduce_items(per_item: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Reduce a tensor of per-item losses over the items that `mask` selects (all items when None)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if mask is not None:
        per_item = per_item * mask.to(per_item.dtype)
    if reduction == "none":
        return per_item
    total = per_item.sum()
    if reduction == "sum":
        return total
    count = per_item.numel() if mask is None else mask.sum()
    return total / torch.as_tensor(count, dtype=total.dtype, device=total.device).clamp_min(1)


def _row_kl(target_log_probs: torch.Tensor, input_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || input) over the last dimension, from log-probabilities."""
    return F.kl_div(input_log_probs, target_log_probs, log_target=True, reduction="none").sum(-1)


def check_same_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Refuse soft targets between logits of different shapes (other classes, other vocabulary)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape: soft targets need the same classes (or vocabulary) in the same order on both models"
        )


@dataclass(frozen=True)
class Divergence:
    """A divergence between the teacher's distribution p and the student's q, with its parameter.

    - `forward_kl`: KL(p || q), the published soft-target loss (mode covering).
    - `reverse_kl`: KL(q || p) (mode seeking; MiniLLM's objective).
    - `jsd`: the Jensen-Shannon divergence, ½ KL(p || m) + ½ KL(q || m) with m = ½ (p + q).
    - `generalized_jsd` (GKD, Agarwal et al., 2024, with TRL's convention): with m = β p + (1 - β) q,
      β KL(p || m) + (1 - β) KL(q || m); `beta` 0.5 is `jsd`. At the ends, where that expression vanishes, it is
      taken as its limit divided by β (resp. 1 - β): β = 0 is `forward_kl` and β = 1 is `reverse_kl`.
    - `skew_kl` (DistiLLM, Ko et al., 2024): KL(p || α p + (1 - α) q); α = 0 is `forward_kl`.
    - `skew_reverse_kl` (DistiLLM): KL(q || (1 - α) p + α q); α = 0 is `reverse_kl`.

    `beta` (in [0, 1], default 0.5) belongs to `generalized_jsd` alone and `alpha` (in [0, 1), default 0.1, DistiLLM's)
    to the skewed ones; giving either to another divergence is refused.
    """

    name: str = "forward_kl"
    beta: float | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.name not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.name!r}")
        for option, owners, low, high, closed in (
            ("beta", ("generalized_jsd",), 0.0, 1.0, True),
            ("alpha", ("skew_kl", "skew_reverse_kl"), 0.0, 1.0, False),
        ):
            value = getattr(self, option)
            if value is None:
                continue
            if self.name not in owners:
                raise ValueError(f"{option} is an option of the {' and '.join(owners)} divergence, not {self.name}")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not (low <= value <= high if closed else low <= value < high):
                interval = f"[{low:g}, {high:g}{']' if closed else ')'}"
                raise ValueError(f"{self.name} {option} must be a number in {interval}, got {value!r}")

    def __call__(self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
        """The divergence of every item, from log-probabilities over the last dimension."""
        student, teacher = student_log_probs, teacher_log_probs
        name = self.name
        if name == "jsd":
            name, beta = "generalized_jsd", 0.5
        else:
            beta = 0.5 if self.beta is None else float(self.beta)
        alpha = 0.1 if self.alpha is None else float(self.alpha)
        forward = {"forward_kl": True, "generalized_jsd": beta == 0, "skew_kl": alpha == 0}
        reverse = {"reverse_kl": True, "generalized_jsd": beta == 1, "skew_reverse_kl": alpha == 0}
        if forward.get(name):
            return _row_kl(teacher, student)
        if reverse.get(name):
            return _row_kl(student, teacher)
        if name == "generalized_jsd":
            mixture = _log_mixture(teacher, student, beta)
            return beta * _row_kl(teacher, mixture) + (1 - beta) * _row_kl(student, mixture)
        if name == "skew_kl":
            return _row_kl(teacher, _log_mixture(teacher, student, alpha))
        return _row_kl(student, _log_mixture(teacher, student, 1 - alpha))  # skew_reverse_kl


def _log_mixture(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, share: float) -> torch.Tensor:
    """log(share · p + (1 - share) · q) from log p and log q, for 0 < share < 1: log(1 - share) taken out of the
    logsumexp, so that only the teacher's side is shifted (and at share ½, as for `jsd`, neither is)."""
    shift = math.log(share) - math.log1p(-share)
    teacher = teacher_log_probs if shift == 0 else teacher_log_probs + shift
    return torch.logsumexp(torch.stack([teacher, student_log_probs]), dim=0) + math.log1p(-share)


def as_divergence(divergence: str | Divergence) -> Divergence:
    """A `Divergence` from its name (with its default parameter) or as it is."""
    return divergence if isinstance(divergence, Divergence) else Divergence(divergence)


def soft_target_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    divergence: str | Divergence = "forward_kl",
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Temperature-scaled divergence between teacher and student class distributions, times T² (Hinton et al., 2015).

    `forward_kl` is KL(teacher || student), the published soft-target loss; `reverse_kl` is KL(student ||
    teacher) (mode seeking); `jsd` is the Jensen-Shannon divergence, symmetric in its two arguments; the
    generalized and skewed ones take a parameter ([`Divergence`], which `divergence` may also be). Logits
    have the classes (or vocabulary) last; every other position is an item: a sequence for `[batch,
    classes]`, a token for `[batch, length, vocab]`. The T² factor keeps gradient magnitudes independent of
    the temperature, so the weight of the term need not be retuned when T changes.
    """
    divergence = as_divergence(divergence)  # refuses an unknown name
    check_same_logits(student_logits, teacher_logits)
    # Softmax in float32: half-precision log-probabilities of a 30k vocabulary lose the tail.
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_item = divergence_from_log_probs(student_log_probs, teacher_log_probs, divergence)
    return reduce_items(per_item * temperature**2, mask, reduction)


def mix_teacher_logits(
    logits: list[torch.Tensor], weights: list[float], temperature: float, mixture: str = "probabilities"
) -> torch.Tensor:
    """One teacher's worth of logits standing for several: their weighted mixture.

    `"probabilities"` (the default) returns `T · log Σ_k w_k softmax(z_k / T)`, whose softmax at temperature `T`
    is exactly the mixture of the teachers' distributions at `T` (Hinton et al.'s ensemble: the arithmetic mean
    of the members' predictions). `"logits"` returns `Σ_k w_k z_k`, whose softmax is the normalised geometric
    mixture of the distributions: sharper where the teachers agree, and a class one teacher rules out keeps little
    mass. Weights must sum to 1; a teacher of weight 0 is left out. Computed in float32.
    """
    if mixture not in TEACHER_MIXTURES:
        raise ValueError(f"teacher_mixture must be one of {TEACHER_MIXTURES}, got {mixture!r}")
    kept = [(weight, member) for weight, member in zip(weights, logits, strict=True) if weight > 0]
    shape = kept[0][1].shape
    for _, member in kept:
        if member.shape != shape:
            raise ValueError(
                f"the teachers' logits have shapes {[tuple(m.shape) for _, m in kept]}: mixing needs one shape (the "
                "same classes, or the same vocabulary at the same positions)"
            )
    if mixture == "logits":
        return sum(weight * member.float() for weight, member in kept)
    log_probs = torch.stack(
        [math.log(weight) + F.log_softmax(member.float() / temperature, dim=-1) for weight, member in kept]
    )
    return temperature * torch.logsumexp(log_probs, dim=0)


def divergence_from_log_probs(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, divergence: str | Divergence
) -> torch.Tensor:
    """One of `DIVERGENCES` (a name, or a [`Divergence`] with its parameter) between two distributions given as
    log-probabilities over the last dimension."""
    return as_divergence(divergence)(student_log_probs, teacher_log_probs)


def topk_soft_target_loss(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_log_normalizer: torch.Tensor,
    teacher_tail: torch.Tensor | None,
    temperature: float = 1.0,
    divergence: str | Divergence = "forward_kl",
    reduction: str = "mean",
) -> torch.Tensor:
    """`soft_target_loss` from the teacher's k largest logits per item instead of all of them.

    Args:
        student_logits (`torch.Tensor`): `[items, vocab]`, every logit of the student.
        teacher_values / teacher_indices (`torch.Tensor`): `[items, k]`, the teacher's top-k logits and their
            vocabulary indices.
        teacher_log_normalizer (`torch.Tensor`): `[items]`, logsumexp of the teacher's logits / T over the whole
            vocabulary, so that the k kept tokens get their exact probabilities.
        teacher_tail (`torch.Tensor`, *optional*): `[items]`, the log of the teacher's probability (at T) of every
            token outside its top k; None when k is the whole vocabulary.

    The approximation: both distributions are coarsened to k + 1 outcomes, the k teacher tokens and one bucket
    holding all the rest, and the divergence is taken between the coarsened distributions (the student's
    bucket mass is computed exactly from its full logits). With k equal to the vocabulary this is the exact
    loss. Otherwise it is never larger than the exact loss (merging outcomes cannot increase any of these
    divergences: each is jointly convex in the two distributions) and equals it when, outside the top k, the student's probabilities are proportional to the
    teacher's; the difference is what is left of the divergence inside the teacher's tail.
    """
    divergence = as_divergence(divergence)  # refuses an unknown name
    if teacher_values.shape != teacher_indices.shape or teacher_values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"top-k teacher values {tuple(teacher_values.shape)} and indices {tuple(teacher_indices.shape)} do not "
            f"match the student's logits {tuple(student_logits.shape)}: one row of k per student row"
        )
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    indices = teacher_indices.long()
    student_top = student_log_probs.gather(-1, indices)
    teacher_top = teacher_values.float() / temperature - teacher_log_normalizer.float().unsqueeze(-1)
    if teacher_tail is not None:
        # The student's mass outside the teacher's top k, exactly: logsumexp over the other tokens.
        student_tail = torch.logsumexp(student_log_probs.scatter(-1, indices, float("-inf")), dim=-1)
        student_top = torch.cat([student_top, student_tail.unsqueeze(-1)], dim=-1)
        # A tail that underflowed to -inf would make KL's 0 * log 0 a NaN; exp(-1e4) is 0 all the same.
        teacher_top = torch.cat([teacher_top, teacher_tail.float().clamp_min(-1e4).unsqueeze(-1)], dim=-1)
    per_item = divergence_from_log_probs(student_top, teacher_top, divergence)
    return reduce_items(per_item * temperature**2, None, reduction)


def teacher_top_k(
    teacher_logits: torch.Tensor, k: int, temperatures: list[float], overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What `topk_soft_target_loss` needs from `[items, vocab]` teacher logits: values `[items, k]`, indices
    `[items, k]`, and per temperature the log normaliser and the tail log-probability (`[items, temperatures]`;
    the tail is None when k covers the vocabulary).

    With `overwrite`, float32 `teacher_logits` are the caller's to lose: the shift and the last temperature's
    exponentials are written into them instead of into new `[items, vocab]` tensors (on a CPU, each new tensor of
    that size is mapped and first touched afresh, which cost more than the arithmetic). The results are the same.
    """
    k = min(k, teacher_logits.shape[-1])
    vocab = teacher_logits.shape[-1]
    logits = teacher_logits.float()
    overwrite = overwrite or logits.data_ptr() != teacher_logits.data_ptr()  # a cast's copy is ours to lose
    # One more than k: the largest logit outside the top k bounds the tail from below (see `vanished` below).
    values, indices = logits.topk(min(k + 1, vocab), dim=-1)
    outside = values[..., k] if k < vocab else None
    values, indices = values[..., :k], indices[..., :k]
    # The row's largest logit is the first of the top k: every temperature shifts by it, and the exponentials of one
    # pass give both the normaliser and, with the top k zeroed in place, the tail, summed apart rather than as a
    # difference so that a tail far smaller than the row keeps its precision.
    largest = values[..., :1]
    # A tail near or below float32's smallest normal number (a very peaked row, tail < -80) is taken by its own
    # maximum. tail >= (outside - largest) / T - log(vocab), so only rows below -79 + log(vocab) can need it: when
    # the logits are overwritten, those rows are kept first.
    kept: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    if outside is not None and overwrite:
        for temperature in temperatures:
            rows = ((outside - largest[..., 0]) / temperature < -79 + math.log(vocab)).nonzero().flatten()
            kept[temperature] = (rows, logits[rows].clone())
    shifted = logits.sub_(largest) if overwrite else logits - largest
    normalizers, tails = [], []
    for number, temperature in enumerate(temperatures):
        last = number == len(temperatures) - 1
        if temperature == 1:
            exponentials = shifted.exp_() if last and overwrite else shifted.exp()
        else:
            exponentials = (shifted.div_(temperature) if last and overwrite else shifted.div(temperature)).exp_()
        total = exponentials.sum(-1)
        normalizers.append(values[..., 0] / temperature + total.log())
        if outside is not None:
            tail = exponentials.scatter_(-1, indices, 0.0).sum(-1).log() - total.log()
            vanished = (tail < -80).nonzero().flatten()
            if len(vanished):
                if overwrite:  # every vanished row is among the kept ones
                    rows, row_logits = kept[temperature]
                    vanished_logits = row_logits[torch.searchsorted(rows, vanished)]
                else:
                    vanished_logits = logits[vanished]
                rest = (vanished_logits / temperature).scatter_(-1, indices[vanished], float("-inf"))
                tail[vanished] = torch.logsumexp(rest, dim=-1) - normalizers[-1][vanished]
            tails.append(tail)
    tail = torch.stack(tails, dim=-1) if tails else None
    return values, indices, torch.stack(normalizers, dim=-1), tail


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    distance: str = "mse",
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Distance between student and teacher hidden states, one item per position (TinyBERT, Jiao et al., 2020).

    `mse` is the mean squared difference over the features; `cosine` is 1 − cos(student, teacher), the
    cosine embedding loss with target 1 that DistilBERT applies to its last hidden states.
    """
    if distance not in HIDDEN_DISTANCES:
        raise ValueError(f"distance must be one of {HIDDEN_DISTANCES}, got {distance!r}")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
            f"{tuple(teacher_hidden.shape)} differ in shape: project the student to the teacher's width first"
        )
    student_hidden, teacher_hidden = student_hidden.float(), teacher_hidden.float()
    if distance == "mse":
        per_item = (student_hidden - teacher_hidden).pow(2).mean(-1)
    else:
        per_item = 1.0 - F.cosine_similarity(student_hidden, teacher_hidden, dim=-1)
    return reduce_items(per_item, mask, reduction)


def attention_loss(
    student_attention: torch.Tensor,
    teacher_attention: torch.Tensor,
    distance: str = "kl",
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    eps: float = 1e-12,
) -> torch.Tensor:
    """Distance between attention distributions `[batch, heads, queries, keys]`, one item per query (TinyBERT).

    `kl` is KL(teacher || student) of each query's distribution over keys, as MiniLM distils the last
    layer's attention; `mse` is the mean squared difference over the keys, as TinyBERT does. Both are
    averaged over heads. `mask` `[batch, queries]` selects the real (non-padding) queries.
    """
    if distance not in ATTENTION_DISTANCES:
        raise ValueError(f"distance must be one of {ATTENTION_DISTANCES}, got {distance!r}")
    if student_attention.shape != teacher_attention.shape:
        raise ValueError(
            f"student attention {tuple(student_attention.shape)} and teacher attention "
            f"{tuple(teacher_attention.shape)} differ in shape: average the heads or compare relations instead"
        )
    student_attention, teacher_attention = student_attention.float(), teacher_attention.float()
    if distance == "kl":
        per_row = _row_kl(teacher_attention.clamp_min(eps).log(), student_attention.clamp_min(eps).log())
    else:
        per_row = (student_attention - teacher_attention).pow(2).mean(-1)
    return reduce_items(per_row.mean(1), mask, reduction)


def self_attention_relations(
    vectors: torch.Tensor, num_relation_heads: int, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-probabilities of scaled dot-product relations among a layer's queries, keys or values (MiniLMv2).

    `vectors` `[batch, length, width]` (all attention heads side by side) are split into
    `num_relation_heads` heads whatever the model's own head count, so teacher and student may differ in
    width and heads. Returns `[batch, relation_heads, length, length]` log-probabilities, padding keys
    excluded through `key_mask` `[batch, length]`.
    """
    batch, length, width = vectors.shape
    if width % num_relation_heads:
        raise ValueError(f"width {width} is not divisible by num_relation_heads={num_relation_heads}")
    head_width = width // num_relation_heads
    heads = vectors.float().view(batch, length, num_relation_heads, head_width).transpose(1, 2)
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(head_width)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_kl_loss(
    student_relations: torch.Tensor,
    teacher_relations: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(teacher || student) between relation log-probabilities `[batch, heads, length, length]`, per query (MiniLMv2)."""
    per_row = _row_kl(teacher_relations, student_relations).mean(1)
    return reduce_items(per_row, mask, reduction)


def similarity_preserving_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius distance of row-normalised batch Gram matrices, divided by batch² (Tung & Mori, 2019).

    Only relations between the examples of the batch are compared, so the two feature widths may differ.
    """

    def gram(features: torch.Tensor) -> torch.Tensor:
        flat = features.float().reshape(features.shape[0], -1)
        return F.normalize(flat @ flat.T, dim=1)

    batch = student_features.shape[0]
    student_gram, teacher_gram = gram(student_features), gram(teacher_features)
    return (student_gram - teacher_gram).pow(2).sum() / batch**2


def distance_relation_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Huber loss between mean-normalised pairwise distances of the examples (RKD-D, Park et al., 2019)."""
    batch = student_features.shape[0]
    if batch < 2:
        return student_features.float().sum() * 0.0

    def normalised_distances(features: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(features.float().reshape(batch, -1), features.float().reshape(batch, -1))
        off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=distances.device)
        return distances[off_diagonal] / distances[off_diagonal].mean().clamp_min(1e-12)

    with torch.no_grad():
        teacher_distances = normalised_distances(teacher_features)
    return F.smooth_l1_loss(normalised_distances(student_features), teacher_distances, reduction="mean")


def feature_map_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared difference of two `[batch, channels, height, width]` maps pooled to a common grid (FitNets, Romero et al., 2015).

    The larger map is average-pooled down to the smaller grid; channels must already agree (the
    module projects the student with a 1×1 convolution). One item per example.
    """
    if student_map.shape[:2] != teacher_map.shape[:2]:
        raise ValueError(
            f"feature maps {tuple(student_map.shape)} and {tuple(teacher_map.shape)} differ in batch or channels"
        )
    grid = (min(student_map.shape[-2], teacher_map.shape[-2]), min(student_map.shape[-1], teacher_map.shape[-1]))
    student_map = F.adaptive_avg_pool2d(student_map.float(), grid)
    teacher_map = F.adaptive_avg_pool2d(teacher_map.float(), grid)
    per_item = (student_map - teacher_map).pow(2).flatten(1).mean(1)
    return reduce_items(per_item, None, reduction)


def deep_to_shallow_loss(
    exit_logits: torch.Tensor,
    final_logits: torch.Tensor,
    exit_features: torch.Tensor,
    final_features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    feature_weight: float,
    reduction: str = "sum",
) -> torch.Tensor:
    """One shallow exit of Be Your Own Teacher (Zhang et al., 2019), per example:

        (1 − α) · CE(q_i, y) + α · T² · KL(q_C^T ‖ q_i^T) + λ · ‖F_i − F_C‖²

    where `q_i` is the exit's distribution, `q_C` the deepest classifier's (detached: the deepest exit teaches) and
    `F_i`, `F_C` their features (`F_C` detached). `λ` is `feature_weight`; the squared distance is summed over the
    feature's components, as in the paper."""
    final_logits, final_features = final_logits.detach().float(), final_features.detach().float()
    exit_logits = exit_logits.float()
    cross_entropy = F.cross_entropy(exit_logits, labels.to(exit_logits.device), reduction="none")
    target = F.log_softmax(final_logits / temperature, dim=-1)
    kl = _row_kl(target, F.log_softmax(exit_logits / temperature, dim=-1)) * temperature**2
    features = (exit_features.float() - final_features).pow(2).sum(-1)
    return reduce_items((1 - alpha) * cross_entropy + alpha * kl + feature_weight * features, reduction=reduction)

"""The configured terms of a `DistillationTrainer` run, held in one object: `trainer.terms`.

    terms.losses       # nn.ModuleDict {term: DistillationLoss}, placed with the student (projectors train)
    terms.weights      # {term: weight}, the mirrored terms of learning teachers included
    terms.routes       # {term: [the teachers it reads]}
    terms.peers        # {"<teacher>_<term>": PeerTerm} for teachers that learn (deep mutual learning)

Each term is its loss's sum over items divided by `normalizer(term, inputs)`: in training the item count of the
whole accumulated (and global) batch, counted once per optimizer step by `count_window`; otherwise of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .logit_rows import ProjectedRows
from .losses import DistillationLoss, output_flags, rows_per_chunk
from .losses.row_terms import shared_rows_loss
from .teacher_roster import naming
from .teacher_sources import TeacherSource, detached
from .vocabulary import teacher_columns


@dataclass(frozen=True)
class PeerTerm:
    """A term of a teacher that learns: `loss` on that `teacher`, mirroring the configured term `source`."""

    teacher: str
    source: str
    weight: float
    loss: DistillationLoss


class TermSet:
    """The terms: their losses, weights and routes to teachers, the learning teachers' mirrors, and item counts."""

    def __init__(self, terms: dict[str, tuple[float, DistillationLoss]], routes: dict[str, list[str]]):
        self.losses = nn.ModuleDict({term: loss for term, (_, loss) in terms.items()})
        self.weights = {term: weight for term, (weight, _) in terms.items()}
        self.routes = routes
        self.peers: dict[str, PeerTerm] = {}
        self.window_counts: dict[str, torch.Tensor] | None = None

    def reading(self, name: str) -> list[DistillationLoss]:
        """The losses that read teacher `name`."""
        return [loss for term, loss in self.losses.items() if name in self.routes[term]]

    def set_up(self, student: nn.Module, references: dict[str, Any], columns: Mapping[str, int] | None = None) -> None:
        """Set each loss up against the student and every teacher it reads (`columns`: the teachers whose logits are
        cut to the student's vocabulary, [`hf_distill.vocabulary`])."""
        for term, loss in self.losses.items():
            for name in self.routes[term] or [None]:
                with naming(name, len(references)), teacher_columns((columns or {}).get(name)):
                    loss.setup(student, None if name is None else references[name])

    def place(self, device: torch.device, dtype: torch.dtype, engine: str | None) -> None:
        """The losses on the student's device and dtype (their projectors train with the student). `engine`: the
        sharding engine the student trains under ("DeepSpeed", "FSDP"), which the projectors are refused with."""
        self.losses.to(device=device, dtype=dtype)
        learnable = [term for term, loss in self.losses.items() if any(True for _ in loss.parameters())]
        if engine and learnable:
            raise ValueError(
                f"the losses {learnable} learn projectors, which DistillationTrainer does not train under {engine} "
                "yet: give the student the teacher's widths (hidden_state with 'projection': false), use relation or "
                "attention 'heads': 'relations' (no projector), or train with DDP"
            )

    def add_peers(self, teachers: Mapping[str, TeacherSource], student: nn.Module, device: torch.device) -> None:
        """For each trainable teacher, its mirror of every configured term that has one (`DistillationLoss.mirror`:
        `hard_label`, its task loss, and `soft_target`, toward the other models' predictions), under
        `<teacher>_<term>`, with the same weight and options."""
        for name, source in teachers.items():
            if not source.trainable:
                continue
            for term, loss in self.losses.items():
                key = f"{name}_{term}"
                mirror = loss.mirror_for(name, key)
                if mirror is None:
                    continue
                if key in self.losses:
                    raise ValueError(
                        f"losses[{key!r}] has the name of teacher {name!r}'s own {term} term: rename the loss term"
                    )
                mirror.setup(source.reference, student)  # the teacher learns as a student would, from the others
                mirror.to(device)
                self.peers[key] = PeerTerm(name, term, self.weights[term], mirror)
        if any(source.trainable for source in teachers.values()) and not self.peers:
            raise ValueError(
                "a teacher is trainable, but no hard_label or soft_target term (nor a loss of yours with a `mirror`) "
                "is configured for it to learn from: add them to losses (mutual learning uses both)"
            )
        self.weights.update({term: peer.weight for term, peer in self.peers.items()})

    def peer_loss(
        self,
        student_outputs: Any,
        teacher_outputs: Any,
        inputs: Mapping[str, Any],
        roster: Any,
        computable: Callable,
        normalizer: Callable,
        device: torch.device,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The terms of the teachers that learn (deep mutual learning, Zhang et al. 2018): for each, its own task loss
        and the mean divergence from every other model's detached predictions, with the weight, temperature and
        divergence of the configured `hard_label` / `soft_target` term and its item count (`normalizer`)."""
        predictions = {"student": detached(student_outputs)}
        for name in roster.sources:
            predictions[name] = detached(roster.of(name, teacher_outputs))
        loss = torch.zeros((), device=device)
        terms = {}
        for term, peer in self.peers.items():
            own = roster.of(peer.teacher, teacher_outputs)
            if not computable(peer.loss, True, inputs):
                continue
            if peer.loss.needs_teacher:
                others = [outputs for name, outputs in predictions.items() if name != peer.teacher]
                total = sum(peer.loss(own, other, inputs) for other in others) / len(others)
            else:
                total = peer.loss(own, None, inputs)
            terms[term] = total / normalizer(term, inputs).to(total.device)
            loss = loss + peer.weight * terms[term]
        return loss, terms

    def shared_row_totals(
        self,
        student_outputs: Any,
        inputs: Mapping[str, Any],
        outputs_of: Callable[[str], Any],
        computable: Callable,
        normalizer: Callable,
    ) -> dict[str, torch.Tensor]:
        """`{term: sum}` of the terms that take part in one loop over the student's unprojected logit rows
        ([`hf_distill.losses.row_terms`]): each chunk of rows is projected once for all of them, and their gradients,
        weighted as the total loss weights the terms (weight / `normalizer`), are taken as the loop goes. Empty when
        the student's logits are not `ProjectedRows` (`fused_token_logits`) or no term takes part (`row_term`).
        `outputs_of(term)` is what the term reads of the teachers; `computable(loss, has_teacher, inputs)` as in
        the trainer."""
        projected = getattr(student_outputs, "logits", None)
        if not isinstance(projected, ProjectedRows):
            return {}
        parts, coefficients = {}, []
        for term, loss in self.losses.items():
            outputs = outputs_of(term)
            if not computable(loss, outputs is not None, inputs):
                continue
            part = loss.row_term(student_outputs, outputs, inputs)
            if part is not None:
                parts[term] = part
                coefficients.append(self.weights[term] / float(normalizer(term, inputs)))
        if not parts:
            return {}
        sizes = [part.chunk_size for part in parts.values() if part.chunk_size is not None]
        chunk_size = min(sizes) if sizes else rows_per_chunk(projected.shape[-1])
        totals = shared_rows_loss(projected, list(parts.values()), coefficients, chunk_size)
        return {term: totals[index] for index, term in enumerate(parts)}

    def output_flags(self) -> dict[str, bool]:
        """What the student is asked for beyond its logits (`output_hidden_states`, `output_attentions`)."""
        return output_flags(loss.student_outputs for loss in self.losses.values())

    def count_window(
        self, batches: Sequence[Mapping[str, Any]], device: torch.device, reduce: Callable, generated: bool = False
    ) -> None:
        """Count each term's items over the micro-batches of one optimizer step (`reduce` sums over processes); in a
        step of `generated` completions, a term on the dataset's completions only counts none."""
        zero = torch.zeros((), device=device)
        counts = torch.stack(
            [
                zero
                if generated and loss.dataset_completions_only
                else sum(loss.count_items(batch).to(device) for batch in batches)
                for loss in self.losses.values()
            ]
        )
        self.window_counts = dict(zip(self.losses, reduce(counts).clamp_min(1), strict=True))

    def normalizer(self, term: str, inputs: Mapping[str, Any], training: bool) -> torch.Tensor:
        """How many items a term's sum is divided by; a learning teacher's term counts the items of the configured
        term it mirrors."""
        if term in self.peers:
            term = self.peers[term].source
        if training and self.window_counts is not None:
            return self.window_counts[term]
        return self.losses[term].count_items(inputs).clamp_min(1)

    def counts_items(self, term: str) -> bool:
        """Whether `term` is one of these terms (its evaluation weighs by items), not one an override added."""
        return term in self.losses or term in self.peers

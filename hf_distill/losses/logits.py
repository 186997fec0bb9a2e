"""Losses on the models' predictions: `soft_target` (the teacher's distribution) and `hard_label` (the labels)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..logit_rows import ProjectedRows, label_rows
from ..model_kind import SPAN_LABELS, describe
from ..positions import label_positions, logit_positions
from ..seq2seq import decoder_start_token_id
from ..vocabulary import setup_columns
from .base import CachedLogits, DistillationLoss, TeacherEnsemble, batch_size, register_loss
from .chunked import chunked_rows_loss, chunked_soft_target_loss, rows_per_chunk
from .functional import (
    TEACHER_MIXTURES,
    Divergence,
    mix_teacher_logits,
    soft_target_loss,
    topk_soft_target_loss,
)
from .gradients import (
    cross_entropy_value_and_grad,
    divergence_value_and_grad,
    reads_teacher_probs,
    topk_value_and_grad,
)
from .row_terms import RowChunk, RowTerm, shared_rows_loss, teacher_log_probs, teacher_probs

#: What a span model's logits are replaced with at padding: far enough below any logit to carry no probability.
_PADDING_LOGIT = -1e4


def _default_labels(id2label: Mapping[int, str] | None) -> bool:
    """True when a config's labels are the placeholder LABEL_0, LABEL_1... that nobody chose."""
    return not id2label or all(str(name) == f"LABEL_{index}" for index, name in id2label.items())


def check_same_outputs(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a pair whose logits do not mean the same classes (or tokens) in the same order."""
    student_config, teacher_config = student.config, teacher.config
    student_kind, teacher_kind = describe(student), describe(teacher)
    if student_kind.dense_prediction:
        raise ValueError(
            f"soft_target does not support a {type(student).__name__} student: its logits are not one class "
            "distribution per example or per token on the last axis; distil it with hidden_state, relation or "
            "feature_map, or a loss of your own (register_loss)"
        )
    seq2seq = student_kind.seq2seq
    if seq2seq != teacher_kind.seq2seq and isinstance(teacher, nn.Module):
        raise ValueError(
            f"the student is a {type(student).__name__} and the teacher a {type(teacher).__name__}: token-level soft "
            "targets need two encoder-decoder models (whose decoders read the same inputs) or neither; load the "
            "teacher with AutoModelForSeq2SeqLM"
        )
    if seq2seq and decoder_start_token_id(student) != decoder_start_token_id(teacher):
        raise ValueError(
            f"the student's decoder starts from token {decoder_start_token_id(student)} and the teacher's from "
            f"{decoder_start_token_id(teacher)}: both decoders are fed the student's decoder inputs, so set the same "
            "decoder_start_token_id in both configs"
        )
    span = student_kind.span
    if span != teacher_kind.span and isinstance(teacher, nn.Module):
        raise ValueError(
            f"the student is a {type(student).__name__} and the teacher a {type(teacher).__name__}: soft targets need "
            "two question-answering models (start and end logits) or neither; load the teacher with the student's "
            "task head (e.g. AutoModelForQuestionAnswering)"
        )
    if span:
        return  # distributions over the positions of the same inputs: nothing else to match
    if student_kind.language_model or seq2seq:
        student_vocab, teacher_vocab = student_config.vocab_size, setup_columns(teacher)
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"token-level soft targets need one vocabulary, but the student has {student_vocab} tokens and the "
                f"teacher {teacher_vocab}: if the teacher's tokenizer extends the student's, give DistillationTrainer "
                "both (processing_class, teacher_processing_class); otherwise build the student with the teacher's "
                "tokenizer (or drop soft_target)"
            )
        return
    if student_config.num_labels != teacher_config.num_labels:
        raise ValueError(
            f"the student predicts {student_config.num_labels} labels and the teacher {teacher_config.num_labels}: "
            "soft targets need the same label set; build the student with the teacher's num_labels, id2label and "
            "label2id"
        )
    student_labels, teacher_labels = student_config.id2label, teacher_config.id2label
    if not (_default_labels(student_labels) or _default_labels(teacher_labels)) and dict(student_labels) != dict(
        teacher_labels
    ):
        raise ValueError(
            f"student and teacher order their labels differently (student id2label {dict(student_labels)}, teacher "
            f"{dict(teacher_labels)}): build the student with the teacher's id2label and label2id"
        )


@register_loss("soft_target")
class SoftTargetLoss(DistillationLoss):
    """Temperature-scaled divergence from the teacher's predicted distribution, times T² (Hinton et al., 2015).

    Options:
        temperature (`float`, defaults to 2.0): softens both distributions; must be > 0.
        divergence (`str`, defaults to `"forward_kl"`): `"forward_kl"` (KL(teacher || student), the published
            loss), `"reverse_kl"`, `"jsd"`, `"generalized_jsd"` (GKD's, with `beta`), `"skew_kl"` or
            `"skew_reverse_kl"` (DistiLLM's, with `alpha`); formulas in [`~hf_distill.losses.functional.Divergence`].
        beta (`float`, *optional*): `generalized_jsd`'s weight of the teacher in the mixture, in [0, 1] (default
            0.5; 0 is `forward_kl`, 1 is `reverse_kl`, TRL's convention).
        alpha (`float`, *optional*): the skew of `skew_kl` / `skew_reverse_kl`, in [0, 1) (default 0.1, DistiLLM's).
        chunk_size (`int`, *optional*): token-level losses run this many positions at a time
            ([`chunked_soft_target_loss`]), so that a large vocabulary adds one full-vocabulary tensor to peak
            memory instead of several. Same value and gradients; smaller chunks save more and loop more. By
            default as many positions as keep one chunk's float32 logits within 16 MiB (`rows_per_chunk`: 83 for
            GPT-2's 50,257 tokens, 137 for BERT's 30,522).

    For extractive question answering (`*ForQuestionAnswering`, DistilBERT's SQuAD setting) the loss is the
    mean of the divergences of the start and of the end distributions over the positions; padding positions
    (`attention_mask` 0) are left out of both distributions, so the padding length changes nothing.

    One item per example for sequence and image classification and question answering; one per token for
    masked and causal LMs and token classification, counting only positions whose label is not -100 (for masked
    LM: the masked positions, as DistilBERT does) or, without labels, the non-padding positions.

    From a teacher-output cache ([`hf_distill.cache`]), classification and question answering use the stored
    logits (the same loss); token-level tasks use the stored rows of the counted positions: every logit (the
    same loss) or the top k, with [`~hf_distill.losses.functional.topk_soft_target_loss`]'s documented
    approximation.

    A language model's logits may also arrive as `[rows, vocab]`, the counted positions only, in row-major
    order ([`hf_distill.logit_rows`]): the same loss on the same rows. Either model's rows may also arrive
    unprojected ([`~hf_distill.logit_rows.ProjectedRows`]): each chunk of `chunk_size` rows is then projected
    here ([`~hf_distill.losses.projected_rows_loss`]), so that no `[rows, vocab]` tensor is held.

    With several teachers and no `"teacher"` entry, the target is their weighted mixture
    (`DistillationConfig.teacher_weights`), `teacher_mixture` (`str`, defaults to `"probabilities"`) saying how:
    `"probabilities"` mixes the distributions at temperature T (an ensemble's prediction), `"logits"` averages
    the logits ([`~hf_distill.losses.functional.mix_teacher_logits`]). A top-k teacher cache cannot be mixed
    (`teacher_cache_top_k=0` can).
    """

    student_outputs = teacher_outputs = frozenset({"logits"})
    accepts_row_logits = True
    accepts_projected_logits = True
    mixes_teachers = True

    def __init__(
        self,
        temperature: float = 2.0,
        divergence: str = "forward_kl",
        chunk_size: int | None = None,
        teacher_mixture: str = "probabilities",
        beta: float | None = None,
        alpha: float | None = None,
    ):
        super().__init__()
        if teacher_mixture not in TEACHER_MIXTURES:
            raise ValueError(f"soft_target teacher_mixture must be one of {TEACHER_MIXTURES}, got {teacher_mixture!r}")
        self.teacher_mixture = teacher_mixture
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"soft_target chunk_size must be an integer >= 1 (or unset), got {chunk_size!r}")
        self.chunk_size = chunk_size
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"soft_target temperature must be a number > 0, got {temperature!r}")
        try:
            #: The divergence with its parameter, as the loss functions take it.
            self.measure = Divergence(divergence, beta, alpha)
        except ValueError as problem:
            raise ValueError(f"soft_target {problem}") from None
        self.temperature = float(temperature)
        self.divergence, self.beta, self.alpha = divergence, beta, alpha
        self.kind = None  # the student's (setup)
        self.shift = False
        self.token_level = False
        self.span = False
        self.seq2seq = False

    def extra_repr(self) -> str:
        parameter = "".join(
            f", {name}={value}" for name, value in (("beta", self.beta), ("alpha", self.alpha)) if value is not None
        )
        return (
            f"temperature={self.temperature}, divergence={self.divergence!r}{parameter}, "
            f"teacher_mixture={self.teacher_mixture!r}"
        )

    def mirror(self, teacher: str) -> SoftTargetLoss | None:
        if self.teacher_name not in (None, teacher):
            return None  # a term that follows another teacher has no counterpart for this one
        return SoftTargetLoss(
            self.temperature, self.divergence, self.chunk_size, self.teacher_mixture, self.beta, self.alpha
        )

    def cached_logits(self) -> CachedLogits:
        level = "span" if self.span else ("token" if self.token_level else "example")
        return CachedLogits(level, self.temperature, self.shift, self.position_mask if self.token_level else None,
                            mixes_teachers=self.teacher_name is None)  # fmt: skip

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        check_same_outputs(student, teacher)
        self.kind = describe(student)
        self.seq2seq, self.token_level, self.span = self.kind.seq2seq, self.kind.token_level, self.kind.span
        self.shift = self.kind.causal_lm  # position i predicts token i + 1 (recorded with a teacher cache)

    def count_items(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        if not self.token_level:
            return torch.tensor(float(batch_size(inputs)))
        return self.position_mask(inputs).sum().float()

    def position_mask(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """For token-level tasks, the `[batch, length]` positions of the logits that count
        ([`hf_distill.positions.logit_positions`]: the same rule as the logit rows and a teacher cache's rows)."""
        return logit_positions(self.kind, inputs)

    def forward(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        if isinstance(teacher_outputs, TeacherEnsemble):
            teacher_outputs = self.mixed_teacher(teacher_outputs, inputs)
        if self.span:
            return self._span_loss(student_outputs, teacher_outputs, inputs)
        student_logits = student_outputs.logits
        if not self.token_level:
            if student_logits.dim() != 2:
                raise ValueError(
                    f"soft_target expects a classifier's [batch, classes] logits, but the student returned "
                    f"{tuple(student_logits.shape)}; for per-position outputs of another kind of model, write a loss "
                    "of your own (register_loss)"
                )
            return soft_target_loss(
                student_logits, teacher_outputs.logits, self.temperature, self.measure, reduction="sum"
            )
        mask = self.position_mask(inputs)
        if isinstance(student_logits, ProjectedRows):
            return self._projected_loss(student_logits, teacher_outputs, mask)
        # Logits of the counted positions only ([rows, vocab]) need no mask; full ones are masked.
        student_mask = self._rows_mask(student_logits, mask, "student")
        cached = getattr(teacher_outputs, "token_targets", None)
        if cached is not None:
            return chunked_rows_loss(
                student_logits,
                student_mask,
                self._cached_row_loss(cached, mask),
                rows_per_chunk(student_logits.shape[-1], self.chunk_size),
            )
        teacher_logits = teacher_outputs.logits
        if isinstance(teacher_logits, ProjectedRows):
            self._rows_mask(teacher_logits, mask, "teacher")
            teacher_logits = teacher_logits.logits()  # the student's logits are materialized: match them
        teacher_mask = self._rows_mask(teacher_logits, mask, "teacher")
        if (student_mask is None) != (teacher_mask is None):
            # One side holds only the counted rows: take the same rows of the other.
            if student_mask is None:
                teacher_logits = teacher_logits[teacher_mask.to(teacher_logits.device)]
            else:
                student_logits = student_logits[student_mask]
            student_mask = None
        return chunked_soft_target_loss(
            student_logits,
            teacher_logits,
            self.temperature,
            self.measure,
            mask=student_mask,
            chunk_size=rows_per_chunk(student_logits.shape[-1], self.chunk_size),
        )

    def _projected_loss(self, student: ProjectedRows, teacher_outputs: Any, mask: torch.Tensor) -> torch.Tensor:
        """The token-level loss with the student's rows unprojected: this term alone in the shared row loop."""
        term = self._row_term(student, teacher_outputs, mask)
        return shared_rows_loss(student, [term], chunk_size=term.chunk_size)[0]

    def row_term(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> RowTerm | None:
        student = getattr(student_outputs, "logits", None)
        if not self.token_level or self.span or not isinstance(student, ProjectedRows):
            return None
        if isinstance(teacher_outputs, TeacherEnsemble):
            teacher_outputs = self.mixed_teacher(teacher_outputs, inputs)
        return self._row_term(student, teacher_outputs, self.position_mask(inputs))

    def _row_term(self, student: ProjectedRows, teacher_outputs: Any, mask: torch.Tensor) -> RowTerm:
        """The divergence on each chunk of the student's unprojected rows against a cache's rows, the teacher's rows
        (projected too, chunk by chunk, or already logits), or its full logits (their counted positions), with its
        gradient in closed form ([`hf_distill.losses.gradients`])."""
        self._rows_mask(student, mask, "student")
        temperature, divergence = self.temperature, self.measure
        uses_teacher_probs = reads_teacher_probs(divergence)
        chunk_size = rows_per_chunk(student.shape[-1], self.chunk_size)
        cached = getattr(teacher_outputs, "token_targets", None)
        if cached is not None:
            self._check_cached_rows(cached, mask)
            if cached.logits is not None:
                teacher_rows = cached.logits
            else:
                column = cached.temperature_column(temperature)

                def topk(chunk: RowChunk) -> tuple[torch.Tensor, torch.Tensor]:
                    start, end = chunk.start, chunk.end
                    device = chunk.logits.device
                    tail = None if cached.tail is None else cached.tail[start:end, column].to(device)
                    return topk_value_and_grad(
                        chunk.log_probs(temperature),
                        cached.values[start:end].to(device),
                        cached.indices[start:end].to(device),
                        cached.log_normalizer[start:end, column].to(device),
                        tail,
                        temperature,
                        divergence,
                        chunk.probs(temperature),
                    )

                return RowTerm(topk, chunk_size)
        else:
            teacher_rows = teacher_outputs.logits
            if not isinstance(teacher_rows, ProjectedRows) and teacher_rows.dim() != 2:
                teacher_rows = teacher_rows[mask.to(teacher_rows.device)]
            self._rows_mask(teacher_rows, mask, "teacher")

        def value_and_grad(chunk: RowChunk) -> tuple[torch.Tensor, torch.Tensor]:
            return divergence_value_and_grad(
                chunk.log_probs(temperature),
                teacher_log_probs(chunk, teacher_rows, temperature),
                temperature,
                divergence,
                chunk.probs(temperature),
                teacher_probs(chunk, teacher_rows, temperature) if uses_teacher_probs else None,
            )

        return RowTerm(value_and_grad, chunk_size)

    def mixed_teacher(self, ensemble: TeacherEnsemble, inputs: Mapping[str, Any]) -> SimpleNamespace:
        """The teachers' outputs as one teacher's: logits whose distribution at this term's temperature is their
        mixture. Token-level logits become the `[rows, vocab]` of the counted positions."""
        weights = list(ensemble.weights)
        mix = partial(mix_teacher_logits, weights=weights, temperature=self.temperature, mixture=self.teacher_mixture)
        if self.span:
            mask = inputs.get("attention_mask")
            mixed = {}
            for name in ("start_logits", "end_logits"):
                members = [getattr(outputs, name).float() for outputs in ensemble.outputs]
                if mask is not None:  # each teacher's distribution over the real positions only, then the mixture
                    padding = ~mask.bool().to(members[0].device)
                    members = [member.masked_fill(padding, _PADDING_LOGIT * self.temperature) for member in members]
                mixed[name] = mix(members)
            return SimpleNamespace(**mixed)
        if not self.token_level:
            return SimpleNamespace(logits=mix([outputs.logits for outputs in ensemble.outputs]))
        mask = self.position_mask(inputs)
        rows = []
        for name, outputs in zip(ensemble.names, ensemble.outputs, strict=True):
            cached = getattr(outputs, "token_targets", None)
            if cached is not None and cached.logits is None:
                raise ValueError(
                    f"soft_target mixes the teachers, but the cache of teacher {name!r} keeps only its top-k logits, "
                    "which cannot be mixed: build the caches with teacher_cache_top_k=0, or name one teacher"
                )
            logits = cached.logits if cached is not None else outputs.logits
            if isinstance(logits, ProjectedRows):
                logits = logits.logits()  # mixing needs every teacher's rows at once
            rows.append(logits if logits.dim() == 2 else logits[mask.to(logits.device)])
        return SimpleNamespace(logits=mix(rows))

    def _span_loss(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Question answering: the sum over examples of the mean of the start and the end divergences."""
        mask = inputs.get("attention_mask")
        total = 0.0
        for name in ("start_logits", "end_logits"):
            student, teacher = getattr(student_outputs, name).float(), getattr(teacher_outputs, name).float()
            if mask is not None:
                # Scaled by T so that after the temperature padding still sits 1e4 below: exactly zero probability.
                padding = ~mask.bool().to(student.device)
                student = student.masked_fill(padding, _PADDING_LOGIT * self.temperature)
                teacher = teacher.masked_fill(padding.to(teacher.device), _PADDING_LOGIT * self.temperature)
            total = total + soft_target_loss(student, teacher, self.temperature, self.measure, reduction="sum")
        return total / 2

    @staticmethod
    def _rows_mask(logits: torch.Tensor, mask: torch.Tensor, side: str) -> torch.Tensor | None:
        """`mask` for full `[batch, length, vocab]` logits; None for the rows of the counted positions alone."""
        if logits.dim() != 2:
            return mask
        if logits.shape[0] != int(mask.sum()):
            raise ValueError(
                f"the {side}'s logits hold {logits.shape[0]} rows, but the batch counts {int(mask.sum())} positions: "
                "row logits must be those of the counted positions (hf_distill.logit_rows), in row-major order"
            )
        return None

    @staticmethod
    def _check_cached_rows(targets: Any, mask: torch.Tensor) -> None:
        """Refuse a cache's rows that are not the batch's counted positions."""
        if targets.num_rows != int(mask.sum()):
            raise ValueError(
                f"the teacher cache holds {targets.num_rows} target positions for this batch but the loss counts "
                f"{int(mask.sum())}: the labels (masking) differ from those the cache was built with; rebuild it"
            )

    def _cached_row_loss(self, targets: Any, mask: torch.Tensor):
        """The per-row loss against a cache's rows, stored in the order of the counted positions."""
        self._check_cached_rows(targets, mask)
        temperature, divergence = self.temperature, self.measure
        if targets.logits is not None:
            return lambda rows, start, end: soft_target_loss(
                rows, targets.logits[start:end], temperature, divergence, reduction="sum"
            )
        column = targets.temperature_column(temperature)

        def row_loss(rows: torch.Tensor, start: int, end: int) -> torch.Tensor:
            tail = None if targets.tail is None else targets.tail[start:end, column]
            return topk_soft_target_loss(
                rows,
                targets.values[start:end],
                targets.indices[start:end],
                targets.log_normalizer[start:end, column],
                tail,
                temperature,
                divergence,
                reduction="sum",
            )

        return row_loss


@register_loss("hard_label")
class HardLabelLoss(DistillationLoss):
    """The student's own task loss on the labels, as its model computes it (`outputs.loss`).

    For a language model whose logits arrive as the rows of the labeled positions ([`hf_distill.logit_rows`]),
    the same cross-entropy is computed from those rows.

    One item per label that is not -100 (an example for classification, a masked token for masked LM),
    the unit the model averages over; for question answering (labels `start_positions` / `end_positions`), one
    per example. Examples labeled -100 (a transfer set, [`hf_distill.transfer`]) count for nothing.
    """

    student_outputs = frozenset({"logits"})
    needs_teacher = False
    needs_labels = True
    accepts_row_logits = True
    accepts_projected_logits = True
    dataset_completions_only = True  # sampled completions are not targets to imitate as labels

    #: Rows projected at a time when the logits arrive unprojected (`ProjectedRows`); None: `rows_per_chunk`.
    chunk_size: int | None = None

    def __init__(self):
        super().__init__()
        #: Under mixup/cutmix ([`hf_distill.augmentation`], `use_class_probabilities`): float labels
        #: `[batch, classes]` are class probabilities, and each row counts for its probability mass.
        self.class_probabilities = False
        self.shift = False
        self.language_model = False
        self.span = False

    def use_class_probabilities(self) -> bool:
        self.class_probabilities = True
        return True

    def mirror(self, teacher: str) -> HardLabelLoss:
        return HardLabelLoss()  # the teacher's own task loss on the labels

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        kind = describe(student)
        self.shift, self.language_model, self.span = kind.causal_lm, kind.language_model, kind.span

    def count_items(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        if self.span:
            if any(inputs.get(key) is None for key in SPAN_LABELS):
                raise ValueError(
                    "the hard_label loss of a question-answering student needs the answer span, but the batch has no "
                    "start_positions / end_positions: add them to the dataset, or drop hard_label from losses"
                )
            return torch.tensor(float(batch_size(inputs)))
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                "the hard_label loss needs labels, but the batch has none: give the dataset a 'label' or 'labels' "
                "column (or use a collator that makes them), or drop hard_label from losses"
            )
        if self._mixed(labels):
            return labels.sum().float()
        return label_positions(labels, self.shift).sum().float()

    def row_term(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> RowTerm | None:
        logits = getattr(student_outputs, "logits", None)
        if not (self.language_model and isinstance(logits, ProjectedRows)):
            return None
        _, targets = label_rows(inputs["labels"], self.shift)
        targets = targets.to(logits.device)
        if targets.numel() != logits.shape[0]:
            raise ValueError(
                f"the student's logits hold {logits.shape[0]} rows, but the batch has {targets.numel()} labels: row "
                "logits must be those of the labeled positions (hf_distill.logit_rows), in row-major order"
            )

        def value_and_grad(chunk: RowChunk) -> tuple[torch.Tensor, torch.Tensor]:
            return cross_entropy_value_and_grad(chunk.log_probs(), targets[chunk.start : chunk.end], chunk.probs())

        return RowTerm(value_and_grad, rows_per_chunk(logits.shape[-1], self.chunk_size))

    def _mixed(self, labels: torch.Tensor) -> bool:
        return self.class_probabilities and labels.is_floating_point()

    def forward(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        logits = getattr(student_outputs, "logits", None)
        term = self.row_term(student_outputs, teacher_outputs, inputs)
        if term is not None:
            # Unprojected rows (hf_distill.logit_rows): the same cross-entropy, projected chunk by chunk.
            return shared_rows_loss(logits, [term], chunk_size=term.chunk_size)[0]
        if self.language_model and logits is not None and logits.dim() == 2:
            # Logits of the labeled positions only (hf_distill.logit_rows): the model's own cross-entropy, summed.
            _, targets = label_rows(inputs["labels"], self.shift)
            return nn.functional.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
        labels = inputs.get("labels")
        if labels is not None and self._mixed(labels):
            # Mixup/cutmix: cross-entropy against class probabilities, summed over the batch.
            log_probs = nn.functional.log_softmax(logits.float(), dim=-1)
            return -(labels.to(log_probs) * log_probs).sum()
        if student_outputs.loss is None:
            raise ValueError(
                "the student returned no loss although the batch has labels; hard_label needs a model with a task "
                "head (e.g. *ForSequenceClassification) that computes its loss from `labels`"
            )
        count = self.count_items(inputs).to(student_outputs.loss.device)
        if not count:
            # Only unlabeled examples (a transfer set): the model's mean over no labels is NaN, and so is its gradient.
            return student_outputs.logits.float().sum() * 0.0
        # The model averages over its labels; undo it so the trainer can average over the whole batch.
        return student_outputs.loss.float() * count

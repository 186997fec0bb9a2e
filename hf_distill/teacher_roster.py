"""The teachers of a `DistillationTrainer` run, held in one object: `trainer.roster`.

    roster.sources              # {name: TeacherSource}, in the order the teachers were given
    roster.outputs(batch, ...)  # every teacher's outputs for a batch
    roster.for_term(names, outputs)  # what one term reads of them

It also knows their weights (`teacher_weights`), which of them learn (trainable or moving average), their facts for
the model card, and the caches that stand in for them. The functions below turn the trainer's `teacher_model`
argument into teachers and check what the config asks of them; each error names the fix.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .alignment import Retokenizer, teacher_retokenizer
from .cache.training import ConfigOnly
from .checks import check_same_inputs, load_tokenizer
from .config import DistillationConfig
from .losses import DistillationLoss, TeacherEnsemble, output_flags
from .teacher import load_teacher, teacher_call_flags
from .teacher_sources import (
    DEFAULT_TEACHER,
    EMA_TEACHER,
    CachedTeacher,
    EMATeacher,
    FrozenTeacher,
    TeacherSource,
    TrainableTeacher,
    detached,
)


class TeacherRoster:
    """The teachers by name: where their outputs come from, how they are weighted, which learn.

    Attributes:
        names (`list[str]`): the teachers given (or known from a cache), in order.
        sources (`dict[str, TeacherSource]`): each teacher's source, once built (none when no loss reads a teacher).
        weights (`dict[str, float]`): `DistillationConfig.teacher_weights`, normalised to sum to 1.
        learning (`dict[str, str]`): `{name: "trainable" or "ema"}` for the teachers that change in training.
        facts (`dict[str, dict]`): `card.model_facts` of each teacher as given, for the model card.
        caches (`dict`): each teacher's cache when a teacher-output cache stands in for the teachers.
        columns (`dict[str, int]`): for a teacher whose vocabulary extends the student's, the student's vocabulary
            size, to which its logits are cut ([`hf_distill.vocabulary`]).
        retokenizers (`dict[str, Retokenizer]`): for a teacher read by cross-tokenizer losses (`uld`, `gold`), how
            the student's batches are re-tokenized for it and aligned ([`hf_distill.alignment`]).
    """

    def __init__(self, names: list[str], weights: dict[str, float], learning: dict[str, str]):
        self.names, self.weights, self.learning = names, weights, learning
        self.sources: dict[str, TeacherSource] = {}
        self.facts: dict[str, dict[str, Any] | None] = {}
        self.caches: dict[str, Any] = {}
        self.columns: dict[str, int] = {}
        self.retokenizers: dict[str, Retokenizer] = {}

    @property
    def several(self) -> bool:
        return len(self.sources) > 1

    @property
    def model(self) -> nn.Module | None:
        """The teacher in memory when there is exactly one; None for a cache or several."""
        models = [source.model for source in self.sources.values()]
        return models[0] if len(models) == 1 else None

    def outputs(self, inputs: Mapping[str, Any], examples: Any, training: bool) -> Any:
        """Every teacher's outputs for this batch: the only teacher's, or `{name: outputs}` with several (None where a
        source has none, as a cache in evaluation); None without a teacher."""
        if not self.sources:
            return None
        outputs = {name: source.outputs(inputs, examples, training) for name, source in self.sources.items()}
        return outputs if len(outputs) > 1 else next(iter(outputs.values()))

    def of(self, name: str, outputs: Any) -> Any:
        """Teacher `name`'s part of what `outputs` returned."""
        return outputs[name] if self.several else outputs

    def for_term(self, names: list[str], outputs: Any) -> Any:
        """What a term that reads the teachers `names` gets of `outputs`: the only teacher's outputs, the one it names,
        or a `TeacherEnsemble` of all it reads (None when some of those are unknown)."""
        if outputs is None or not self.several:
            return outputs
        read = [outputs.get(name) for name in names]
        if not names or any(value is None for value in read):
            return None
        if len(names) == 1:
            return read[0]
        weights = [self.weights[name] for name in names]
        return TeacherEnsemble(tuple(names), tuple(read), tuple(weight / sum(weights) for weight in weights))

    def detached(self, outputs: Any) -> Any:
        """`outputs` with the predictions of the teachers that learn detached (what the student's terms read)."""
        if not any(source.trainable for source in self.sources.values()):
            return outputs
        if not self.several:
            return detached(outputs)
        return {name: detached(value) if self.sources[name].trainable else value for name, value in outputs.items()}

    def trainable(self) -> dict[str, nn.Module]:
        """The teachers in the optimizer, by name."""
        return {name: source.reference for name, source in self.sources.items() if source.trainable}

    def with_state(self) -> dict[str, nn.Module]:
        """The teachers whose weights change in training (trainable, moving average): part of every checkpoint."""
        return {name: self.sources[name].reference for name in self.learning if name in self.sources}

    def moving_averages(self) -> list[EMATeacher]:
        return [source for source in self.sources.values() if isinstance(source, EMATeacher)]

    def use_caches(self, caches: dict[str, Any], references: dict[str, Any], device: Any) -> None:
        """From here on each teacher is read from its opened cache."""
        self.caches = dict(caches)
        for name, cache in caches.items():
            self.sources[name] = CachedTeacher(name, cache, references[name], self.facts.get(name), device)


def build_source(
    name: str,
    teacher: nn.Module,
    losses: list[DistillationLoss],
    forward: Callable[..., Any],
    roster: TeacherRoster,
    prepare: Callable[[nn.Module], nn.Module],
    unwrap: Callable[[nn.Module], nn.Module],
    label_keys: tuple[str, ...],
    args: DistillationConfig,
) -> TeacherSource:
    """The source of teacher `name`, run by `forward` and asked for the outputs its `losses` read: frozen (`prepare`d
    by the trainer; `unwrap` gives back the model inside), trainable or a moving average of the student, as
    `roster.learning` says."""
    kind = roster.learning.get(name)
    retokenizer = roster.retokenizers.get(name)
    if kind is not None and retokenizer is not None and not retokenizer.identical:
        raise ValueError(
            f"teacher {name!r} has another tokenizer than the student's and learns ({kind}): the terms that train a "
            "teacher read the student's tokens; distil from a frozen teacher across tokenizers"
        )
    if kind is None:
        prepared = prepare(teacher)
    else:  # it learns, or follows the student: full precision, on the student's device, never wrapped
        prepared = teacher.to(args.device)
        prepared.requires_grad_(kind == "trainable")
        prepared.train(kind == "trainable")
    unwrapped = unwrap(prepared)
    wanted = [loss.teacher_outputs for loss in losses]
    if kind == "trainable":
        wanted.append({"logits"})  # its own terms read its predictions
    arguments = (name, prepared, unwrapped, roster.facts.get(name), teacher_call_flags(unwrapped),
                 output_flags(wanted), label_keys, forward)  # fmt: skip
    if kind == "trainable":
        source = TrainableTeacher(*arguments)
    elif kind == "ema":
        source = EMATeacher(*arguments, momentum=args.ema_momentum)
    else:
        source = FrozenTeacher(*arguments)
    source.columns = roster.columns.get(name)
    source.retokenizer = retokenizer
    return source


def check_teacher_inputs(
    student: nn.Module,
    given: Mapping[str, Any],
    models: dict[str, nn.Module],
    caches: Any,
    processor: Any,
    teacher_processors: Any = None,
    reading: Callable[[str], list[DistillationLoss]] | None = None,
) -> tuple[dict[str, int], dict[str, Retokenizer]]:
    """Each teacher reads the student's inputs alike (vocabulary, tokenizer), a cache's teacher by its config.
    `teacher_processors`: the teachers' tokenizers (one, or {name: tokenizer}); `reading(name)`: the losses that read
    teacher `name`. Returns, for each teacher whose vocabulary extends the student's, the columns its logits are cut
    to (`hf_distill.vocabulary`), and for each teacher read by cross-tokenizer losses its `Retokenizer`
    (`hf_distill.alignment`)."""
    names = list(given) or list(caches)
    if isinstance(teacher_processors, Mapping):
        unknown = sorted(set(teacher_processors) - set(names))
        if unknown:
            raise ValueError(
                f"teacher_processing_class names teachers {unknown}; the teachers are {names}: key the tokenizers by "
                "those names (or pass one tokenizer for every teacher)"
            )
    columns, retokenizers = {}, {}
    for name in names:
        finished = None if caches is None else caches[name]
        known = models[name] if finished is None else ConfigOnly(finished.teacher_config())
        source = given[name] if isinstance(given.get(name), str) and given[name] != EMA_TEACHER else None
        tokenizer = teacher_processors.get(name) if isinstance(teacher_processors, Mapping) else teacher_processors
        with naming(name, len(names)):
            losses = reading(name) if reading is not None else []
            if any(getattr(loss, "cross_tokenizer", False) for loss in losses):
                if tokenizer is None and source is not None:
                    tokenizer = load_tokenizer(source)
                retokenizers[name] = teacher_retokenizer(student, known, losses, processor, tokenizer, name)
                continue
            cut = check_same_inputs(student, known, processor, source, tokenizer)
        if cut is not None:
            columns[name] = cut
    return columns, retokenizers


def teacher_mapping(teacher_model: Any, student: nn.Module) -> dict[str, nn.Module | str]:
    """`teacher_model` as `{name: model or Hub id / path}`: one teacher is called "teacher"."""
    if teacher_model is None:
        return {}
    given = dict(teacher_model) if isinstance(teacher_model, Mapping) else {DEFAULT_TEACHER: teacher_model}
    if not given:
        raise ValueError("teacher_model is an empty mapping: give at least one {name: model}, or None")
    for name, teacher in given.items():
        if not (isinstance(name, str) and name):
            raise ValueError(f"teacher_model's keys name the teachers and must be non-empty strings, got {name!r}")
        if not isinstance(teacher, (nn.Module, str)):
            raise TypeError(
                f"teacher {name!r} is a {type(teacher).__name__}: give a model, or a Hub id or local folder (str)"
            )
        if teacher is student:
            raise ValueError("the teacher and the student are the same object: pass a separate teacher model")
    return given


def loaded(
    teacher: nn.Module | str, student: nn.Module, attention: str | None, args: DistillationConfig, frozen: bool = True
) -> nn.Module:
    """A teacher given as a Hub id or path, loaded with the student's task head (a `frozen` one in `teacher_dtype`
    when that is set, so it is never held in float32 first, and with `teacher_model_init_kwargs`); `"ema"`, a copy
    of the student (the start of its moving average); a model as it is."""
    if teacher == EMA_TEACHER:
        return copy.deepcopy(student)
    if not isinstance(teacher, str):
        return teacher
    dtype = {"dtype": getattr(torch, args.teacher_dtype)} if frozen and args.teacher_dtype is not None else {}
    extra = dict(args.teacher_model_init_kwargs or {}) if frozen else {}
    return load_teacher(
        teacher,
        student,
        attn_implementation=attention,
        trust_remote_code=args.teacher_trust_remote_code,
        **dtype,
        **extra,
    )


def route_terms(terms: dict[str, tuple[float, DistillationLoss]], names: list[str]) -> dict[str, list[str]]:
    """Which teachers each term reads: the one its `"teacher"` entry names, the only one, or all of them for a
    loss that mixes teachers; `[]` for a term that reads none. Errors name the fix."""
    routes = {}
    for term, (_, loss) in terms.items():
        if not loss.needs_teacher or not names:
            routes[term] = []
        elif loss.teacher_name is not None:
            if loss.teacher_name not in names:
                raise ValueError(
                    f"losses[{term!r}] reads the teacher {loss.teacher_name!r}, but the teachers are {names}: name "
                    "one of them (the keys of teacher_model; a single teacher is called 'teacher')"
                )
            routes[term] = [loss.teacher_name]
        elif len(names) == 1 or loss.mixes_teachers:
            routes[term] = list(names)
        else:
            raise ValueError(
                f"losses[{term!r}] reads one teacher, and there are {len(names)} ({', '.join(names)}): say which with "
                f"'teacher': {names[0]!r} in its entry (a term per teacher, under two names, follows both)"
            )
    return routes


def check_learning_teachers(args: DistillationConfig, given: Mapping[str, Any], cached: bool) -> dict[str, str]:
    """`{name: "trainable" or "ema"}` for the teachers that change in training; what cannot serve is refused."""
    learning = {name: "ema" for name, teacher in given.items() if teacher == EMA_TEACHER}
    trainable = list(args.trainable_teachers or [])
    unknown = [name for name in trainable if name not in given]
    if unknown:
        raise ValueError(
            f"trainable_teachers names {unknown}, but the teachers are {list(given) or 'none'}: name teachers given in "
            "teacher_model (a single teacher is called 'teacher')"
        )
    both = [name for name in trainable if name in learning]
    if both:
        raise ValueError(
            f"the teachers {both} are moving averages of the student (teacher_model 'ema'), which cannot also be "
            "trainable: drop them from trainable_teachers"
        )
    learning.update({name: "trainable" for name in trainable})
    if learning and cached:
        kinds = ", ".join(f"{name} ({kind})" for name, kind in learning.items())
        raise ValueError(
            f"a teacher cache stores fixed outputs, but the teachers {kinds} change at every step, so their outputs "
            "cannot be computed ahead: unset teacher_cache, or keep those teachers frozen"
        )
    if learning and (args.deepspeed or args.fsdp):
        raise ValueError(
            f"teachers that learn or follow the student ({', '.join(learning)}) are not supported under DeepSpeed or "
            "FSDP yet: train with one process or DDP"
        )
    return learning


@contextmanager
def naming(name: str | None, count: int) -> Iterator[None]:
    """With several teachers, a check's `ValueError` says which teacher it is about."""
    try:
        yield
    except ValueError as error:
        if count < 2 or name is None:
            raise
        raise ValueError(f"teacher {name!r}: {error}") from error

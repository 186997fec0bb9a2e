"""The loss registry and the base class every distillation loss derives from.

A loss is a small `nn.Module` registered under a name:

    @register_loss("my_loss")
    class MyLoss(DistillationLoss):
        def forward(self, student_outputs, teacher_outputs, inputs):
            return ...  # the SUM of the loss over this batch's items

and used from the config as `losses={"my_loss": {"weight": 0.3, **options}}`; the options are the keyword
arguments of its `__init__`. The trainer divides each sum by `count_items` over the whole accumulated
batch, so a loss never needs to know about gradient accumulation or processes.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..positions import position_mask, token_mask  # noqa: F401 - also where losses of users import them from
from ..seq2seq import stack_size

if TYPE_CHECKING:
    from .row_terms import RowTerm

_REGISTRY: dict[str, type[DistillationLoss]] = {}
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
# Keys of a loss entry in the config that are not options of the loss itself.
RESERVED_KEYS = ("weight", "type", "teacher")
# Names the trainer's own logs use: a term named like one would overwrite it.
_LOG_KEYS = {"loss", "grad_norm", "learning_rate", "epoch"}


class DistillationLoss(nn.Module):
    """Base class of a distillation loss term.

    Subclasses implement `forward` and, where needed, `setup` (checks and learnable parts) and
    `count_items` (what one item is). Class attributes say what the models must return:
    `student_outputs` / `teacher_outputs` are subsets of `{"logits", "hidden_states", "attentions"}`
    (instances may narrow them in `__init__`), `needs_teacher` is False for a loss on the student alone and
    `needs_labels` is True for one that cannot be computed on a batch without `labels`.
    `cacheable` is False for a loss that reads the teacher other than through those outputs (forward hooks,
    probes), which a teacher-output cache cannot replay. `accepts_row_logits` is True for a loss that works
    when a language model's `logits` arrive as `[rows, vocab]`, the rows of the labeled positions only (see
    [`hf_distill.logit_rows`]): one that reads no logits, or reads them only at those positions. It is False
    by default, so a loss of yours sees full logits unless it says otherwise. A loss that sets it must list
    `"logits"` in `student_outputs` / `teacher_outputs` when it reads them: when no loss lists them for a model,
    that model's vocabulary projection is skipped in training (its logits come out `[0, vocab]`).
    `accepts_projected_logits` is True for a loss that also takes those rows as a
    [`~hf_distill.logit_rows.ProjectedRows`] (hidden states and the projection, projected chunk by chunk by the
    loss itself, as `soft_target` and `hard_label` do); when every loss reading a model's logits does, that
    model's projection is left to them (`DistillationConfig.fused_token_logits`). `dataset_completions_only` is
    True for a loss that learns the dataset's labels themselves (`hard_label`): in a step whose completions were
    generated (`DistillationConfig.lmbda`, `seq_kd`; [`hf_distill.rollouts`]) it counts no items and is not computed.

    With several teachers, a loss reads the one its `"teacher"` entry names (`teacher_name`); a loss with
    `mixes_teachers` True that names none reads them all, as a [`TeacherEnsemble`]
    (its `setup` is then called once per teacher).

    Four methods say what else a loss takes part in; the trainer and the teacher cache ask every loss, built-in
    or registered, the same way: `use_class_probabilities` (labels mixed by mixup/cutmix), `mirror` (the same
    term for a teacher that learns, deep mutual learning), `cached_logits` (what it reads of a teacher cache's
    stored logits) and `row_term` (its part in the one loop over the student's projected rows that the terms
    reading them share, [`hf_distill.losses.row_terms`]).
    """

    student_outputs: frozenset[str] = frozenset()
    teacher_outputs: frozenset[str] = frozenset()
    needs_teacher: bool = True
    needs_labels: bool = False
    cacheable: bool = True
    accepts_row_logits: bool = False
    accepts_projected_logits: bool = False
    mixes_teachers: bool = False
    dataset_completions_only: bool = False
    #: The name of the term in the config and in the logs; `build_loss` sets it.
    term: str = ""
    #: The teacher this term reads (its `"teacher"` entry), None for the only one or, if it mixes them, all.
    teacher_name: str | None = None

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Check that the two models suit this loss and build learnable parts; called once, before training.

        Raise `ValueError` naming the fix for a bad pairing: the trainer calls this before the first step.
        """

    def count_items(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """How many items `forward` sums over for this batch; computed from the inputs alone.

        The default counts examples. Token-level losses count tokens, so that a long and a short batch
        weigh by their tokens, as when the whole batch is seen at once.
        """
        return torch.tensor(float(batch_size(inputs)))

    def use_class_probabilities(self) -> bool:
        """Called before training when mixup or cutmix turn the labels into class probabilities `[batch, classes]`:
        return True once the loss reads them so (and counts each row by its probability mass). The default, False,
        says it cannot; the trainer then refuses mixing for a loss that reads labels (`needs_labels`)."""
        return False

    def mirror(self, teacher: str) -> DistillationLoss | None:
        """The same term for the teacher `teacher` when it learns alongside the student (deep mutual learning): a
        new loss with this one's options, set up by the trainer with the teacher as its student and named
        `<teacher>_<term>`; that teacher then optimises it toward the other models' detached predictions. None (the
        default): this term has no counterpart for a learning teacher."""
        return None

    def mirror_for(self, teacher: str, term: str) -> DistillationLoss | None:
        """`mirror(teacher)`, named `term` (`<teacher>_<term>`) as `build_loss` names a configured term."""
        mirrored = self.mirror(teacher)
        if mirrored is not None:
            mirrored.term = term
        return mirrored

    def cached_logits(self) -> CachedLogits | None:
        """What this loss reads of the teacher's logits from a teacher cache, known after `setup`; None (the
        default) when it reads them there as the model returns them, or not at all."""
        return None

    def row_term(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> RowTerm | None:
        """This batch's term as a [`~hf_distill.losses.row_terms.RowTerm`] of the shared row loop, or None (the
        default) to be computed by `forward` alone. Asked in training and evaluation when the student's logits are
        [`~hf_distill.logit_rows.ProjectedRows`]; the total the loop returns must equal what `forward` would."""
        return None

    def teacher_hidden_layers(self) -> list[int] | None:
        """The indices into the teacher's `hidden_states` that `forward` reads, known after `setup`; None for all.

        A teacher-output cache stores only these layers, so override it in a loss that reads hidden states.
        """
        return None

    def forward(self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Return the sum of the loss over this batch's items (see `count_items`)."""
        raise NotImplementedError


@dataclass(frozen=True)
class CachedLogits:
    """How a loss reads the teacher's logits from a teacher cache ([`hf_distill.cache`]).

    Args:
        level (`str`): `"example"` (one distribution per example), `"span"` (start and end distributions over the
            positions) or `"token"` (one per counted position; the cache stores those rows only).
        temperature (`float`): the temperature the loss applies (a top-k cache stores its normaliser and tail).
        shift (`bool`): position i predicts token i + 1 (causal LM).
        position_mask (`Callable`, *optional*): for `"token"`, `[batch, length]` positions whose rows are stored.
        mixes_teachers (`bool`): it reads several teachers' rows at once (a mixture), which top-k rows cannot give.
    """

    level: str
    temperature: float = 1.0
    shift: bool = False
    position_mask: Callable[[Mapping[str, Any]], torch.Tensor] | None = None
    mixes_teachers: bool = False


@dataclass(frozen=True)
class TeacherEnsemble:
    """What a loss that mixes several teachers receives as `teacher_outputs`: each teacher's outputs and weight.

    Attributes:
        names (`tuple[str, ...]`): the teachers, in order.
        outputs (`tuple`): their outputs for the batch, in the same order.
        weights (`tuple[float, ...]`): their weights, summing to 1.
    """

    names: tuple[str, ...]
    outputs: tuple[Any, ...]
    weights: tuple[float, ...]


def register_loss(name: str):
    """Class decorator: register a `DistillationLoss` subclass under `name` for use in `DistillationConfig.losses`."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(
            f"loss name {name!r} must be lower-case letters, digits and underscores, starting with a letter"
        )
    if name in _LOG_KEYS:
        raise ValueError(f"loss name {name!r} would clash with the trainer's own log key; choose another name")

    def decorator(cls: type[DistillationLoss]) -> type[DistillationLoss]:
        if not (isinstance(cls, type) and issubclass(cls, DistillationLoss)):
            raise TypeError(f"register_loss({name!r}) decorates subclasses of DistillationLoss, not {cls!r}")
        registered = _REGISTRY.get(name)
        if registered is not None and registered is not cls:
            if (registered.__module__, registered.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(
                    f"a loss named {name!r} is already registered ({registered.__module__}.{registered.__qualname__}); "
                    "choose another name"
                )
            # The same class defined again where it was (a notebook cell run twice, a module reloaded): the new one.
            warnings.warn(
                f"loss {name!r} is registered again ({cls.__qualname__}); the new definition replaces the old",
                stacklevel=2,
            )
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_losses() -> list[str]:
    """Names of all registered losses, sorted."""
    return sorted(_REGISTRY)


def build_loss(term: str, spec: Mapping[str, Any]) -> tuple[float, DistillationLoss]:
    """Turn one `losses` entry of the config into `(weight, loss module)`, with errors that name the fix."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"losses[{term!r}] must be a mapping such as {{'weight': 0.5, ...options}}, got {spec!r}")
    loss_type = spec.get("type", term)
    if loss_type not in _REGISTRY:
        raise ValueError(
            f"unknown loss {loss_type!r} in losses[{term!r}]; registered losses: {', '.join(available_losses())}. "
            "Register your own with @hf_distill.register_loss(name)."
        )
    if term in _LOG_KEYS:
        raise ValueError(f"losses[{term!r}]: {term!r} is a log key of the trainer; rename the term and set 'type'")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"losses[{term!r}]['weight'] must be a number >= 0, got {weight!r}")
    teacher = spec.get("teacher")
    if teacher is not None and not (isinstance(teacher, str) and teacher):
        raise ValueError(f"losses[{term!r}]['teacher'] must name one of the teachers (a string), got {teacher!r}")
    cls = _REGISTRY[loss_type]
    if teacher is not None and not cls.needs_teacher:
        raise ValueError(f"losses[{term!r}] ({loss_type}) reads no teacher, so it takes no 'teacher' entry; drop it")
    options = {key: value for key, value in spec.items() if key not in RESERVED_KEYS}
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(accepted) - {"self"})
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        valid = [p for p in accepted if p not in ("self",)]
        # "teacher" last: it names one of several teachers, for the losses that read one.
        valid = ["weight", "type", *valid, *(["teacher"] if cls.needs_teacher else [])]
        raise ValueError(
            f"losses[{term!r}] ({loss_type}) has no option {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid)}"
        )
    loss = cls(**options)
    loss.term, loss.teacher_name = term, teacher
    return float(weight), loss


def build_losses(losses: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[float, DistillationLoss]]:
    """Build every entry of `DistillationConfig.losses`."""
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError(
            "losses must name at least one loss, e.g. {'soft_target': {'weight': 1.0, 'temperature': 2.0}}; "
            f"registered losses: {', '.join(available_losses())}"
        )
    return {term: build_loss(term, spec) for term, spec in losses.items()}


def reads_teacher(losses: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether any entry of a `losses` mapping reads a teacher (a plain `hard_label` does not)."""
    return any(loss.needs_teacher for _, loss in build_losses(losses).values())


def output_flags(needs: Any) -> dict[str, bool]:
    """`output_hidden_states` / `output_attentions` for the union of what some losses read of one model (each an
    element of `needs`, a set such as `loss.teacher_outputs`)."""
    wanted = set().union(*needs)
    return {f"output_{name}": True for name in ("hidden_states", "attentions") if name in wanted}


def needs_attention_maps(terms: Mapping[str, tuple[float, DistillationLoss]]) -> bool:
    """Whether a built loss reads the teacher's attention maps, which only eager attention returns."""
    return any("attentions" in loss.teacher_outputs for _, loss in terms.values())


def batch_size(inputs: Mapping[str, Any]) -> int:
    """Number of examples in a batch: the first dimension of its first tensor."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError(f"cannot tell the batch size: no tensor among the inputs {list(inputs)}")


def check_layer_map(term: str, layer_map: Any) -> list[tuple[int, int]] | None:
    """Validate the shape of a user's `layer_map` (ranges are checked against the models in `setup`)."""
    if layer_map is None:
        return None
    if not isinstance(layer_map, (list, tuple)) or not layer_map:
        raise ValueError(f"losses[{term!r}]['layer_map'] must be a non-empty list of [student, teacher] pairs")
    pairs = []
    for pair in layer_map:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
        ):
            raise ValueError(
                f"losses[{term!r}]['layer_map'] holds {pair!r}; each entry must be a [student_layer, teacher_layer] "
                "pair of integers, e.g. [[3, 6], [6, 12]]"
            )
        pairs.append((pair[0], pair[1]))
    return pairs


def resolve_layer_map(
    term: str,
    layer_map: list[tuple[int, int]] | None,
    student: nn.Module,
    teacher: nn.Module,
    first_layer: int = 1,
    stack: str | None = None,
) -> list[tuple[int, int]]:
    """Return concrete, in-range layer pairs; the default spreads the student's layers evenly over the teacher's.

    Layers are numbered as `output_hidden_states` returns them: 0 is the embedding output and 1..N the
    blocks. Negative indices count from the last block (-1 is the last). `first_layer` is the lowest
    valid index (1 for attention maps, which the embeddings do not have). Depths come from the configs (of the
    `stack`, `"encoder"` or `"decoder"`, for encoder-decoder models).
    """
    student_layers = config_value(student, "num_hidden_layers", term, stack)
    teacher_layers = config_value(teacher, "num_hidden_layers", term, stack)
    if layer_map is None:
        # Student block i learns from teacher block round(i * T / S): with S = T/2, every other block.
        return [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]
    resolved = []
    for student_layer, teacher_layer in layer_map:
        pair = []
        for side, index, depth in (
            ("student", student_layer, student_layers),
            ("teacher", teacher_layer, teacher_layers),
        ):
            absolute = index + depth + 1 if index < 0 else index
            if not first_layer <= absolute <= depth:
                raise ValueError(
                    f"losses[{term!r}]['layer_map'] names {side} layer {index}, but the {side} has layers "
                    f"{first_layer}..{depth} (or -1..-{depth + 1 - first_layer} from the end); fix the map"
                )
            pair.append(absolute)
        resolved.append(tuple(pair))
    return resolved


def config_value(model: nn.Module, attribute: str, term: str, stack: str | None = None) -> int:
    """A size from a model's config (`hidden_size`, `num_hidden_layers`...), or an error that says which is missing.

    For an encoder-decoder model, `stack` (`"encoder"` or `"decoder"`) says whose size.
    """
    if stack is not None:
        return stack_size(model, stack, attribute, term)
    value = getattr(getattr(model, "config", None), attribute, None)
    if not isinstance(value, int):
        raise ValueError(
            f"losses[{term!r}] needs `config.{attribute}`, which {type(model).__name__} does not have; "
            "for convolutional models use the feature_map or relation loss"
        )
    return value


def count_positions(inputs: Mapping[str, Any], stack: str | None = None) -> torch.Tensor:
    """Items of a per-position loss: the positions `position_mask` counts, or examples when it is None."""
    mask = position_mask(inputs, stack)
    return torch.tensor(float(batch_size(inputs))) if mask is None else mask.sum().float()


def sum_positions(per_position: torch.Tensor, inputs: Mapping[str, Any], stack: str | None = None) -> torch.Tensor:
    """Sum a `[batch, positions]` loss over the items `count_positions` counts.

    With a mask every counted position is an item; without one (images) each example is an item worth the
    mean over its positions.
    """
    mask = position_mask(inputs, stack)
    if mask is None:
        return per_position.mean(-1).sum()
    return (per_position * mask.to(per_position.dtype)).sum()


class ModuleOutputs:
    """Keeps the latest output of chosen submodules through forward hooks, for losses on inner activations."""

    def __init__(self) -> None:
        self.outputs: dict[Any, torch.Tensor] = {}
        self.handles: list[Any] = []

    def watch(self, key: Any, module: nn.Module) -> None:
        def keep(_module, _args, output, key=key):
            self.outputs[key] = output[0] if isinstance(output, (tuple, list)) else output

        self.handles.append(module.register_forward_hook(keep))

    def get(self, key: Any) -> torch.Tensor:
        if key not in self.outputs:
            raise RuntimeError(
                f"no output was captured for {key!r}: the hooked module did not run in this forward pass; "
                "check the module path in the loss options"
            )
        return self.outputs[key]

    def clear(self) -> None:
        """Drop the kept outputs once used, so they do not hold activations until the next step."""
        self.outputs.clear()

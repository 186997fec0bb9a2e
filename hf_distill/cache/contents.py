"""What a teacher-output cache stores for a set of losses, how a batch's outputs become stored tensors, and how
stored tensors become the `teacher_outputs` the losses read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..alignment import ALIGNMENT_KEY
from ..logit_rows import ProjectedRows
from ..losses import DistillationLoss, rows_per_chunk
from ..losses.functional import teacher_top_k
from ..losses.row_terms import group_rows
from ..model_kind import describe
from ..positions import position_mask, token_mask
from ..seq2seq import stack_size
from .groups import GroupTargets, group_contents, groups_mismatch, stored_groups
from .store import row_counts_key

#: The fewest rows of a token-level teacher's logits a cache build projects and reduces to its top k at a time.
BUILD_CHUNK_ROWS = 256
#: The most logits a cache build projects in one product (256 MiB in float32; a plain teacher pass holds all of a
#: batch's): without gradients nothing else of that size is held beside it. On 2 CPU cores, a GPT-2 batch of 1,016
#: rows x 50,257 words projected and reduced to its top 64 in one product took 1.22 s, in two of 508 rows 1.35 s,
#: against 1.27 s for the product alone into a new tensor (medians of 6 interleaved rounds).
BUILD_GROUP_ELEMENTS = 2**26
#: Input tensors a checksum is taken of, in order of preference: what the teacher's outputs depend on.
CHECKSUM_KEYS = ("input_ids", "pixel_values", "input_values", "input_features", "inputs_embeds")
_CHECKSUM_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}
#: Where each stack's hidden states live in a model's output and in a cache: `<prefix>hidden_states` (None: a
#: model with one stack; "encoder", "decoder": those of an encoder-decoder model).
STATE_PREFIXES = {"": None, "encoder_": "encoder", "decoder_": "decoder"}
#: Contents keys a record may lack (the stacks a model does not have; caches written before encoder-decoders).
_ABSENT = {
    "seq2seq": False,
    "teacher_columns": None,  # the teacher's logits cut to the student's vocabulary (hf_distill.vocabulary)
    "groups": None,  # a teacher with another tokenizer: its aligned groups (hf_distill.cache.groups)
    **{f"{prefix}hidden_layers": [] for prefix in STATE_PREFIXES},
    **{f"num_{prefix}hidden_states": None for prefix in STATE_PREFIXES},
}


def cache_contents(
    losses: list[DistillationLoss], teacher: Any, top_k: int, retokenizer: Any = None
) -> dict[str, Any]:
    """What the cache must hold for `losses` (already `setup`): a JSON-able description, part of its record.

    `teacher` is the teacher model (or an object with its `config`), read for the depth of its layer stacks;
    `top_k` is used for token-level logits and a cross-tokenizer teacher's groups (0 keeps every logit);
    `retokenizer` is the teacher's `Retokenizer` when cross-tokenizer losses (`uld`, `gold`) read it.
    """
    teacher_losses = [loss for loss in losses if loss.needs_teacher]
    refused = [loss.term for loss in teacher_losses if not loss.cacheable]
    if refused:
        raise ValueError(
            f"the losses {refused} read the teacher in ways a teacher cache cannot replay (forward hooks on its "
            "modules, probes, attention maps too large to store): train them online (teacher_cache=None) or drop them"
        )
    cross = [loss.term for loss in teacher_losses if getattr(loss, "cross_tokenizer", False)]
    if cross and retokenizer is None:
        raise ValueError(
            f"the losses {cross} distil across tokenizers, and the cache aligns the two: pass the student's tokenizer "
            "as processing_class and the teacher's as teacher_processing_class"
        )
    positional = [loss for loss in teacher_losses if not getattr(loss, "cross_tokenizer", False)]
    asked = {loss.term: loss.cached_logits() for loss in positional}
    requests = [request for request in asked.values() if request is not None]
    span = any(request.level == "span" for request in requests)
    token_level = any(request.level == "token" for request in requests)
    reads_logits = any("logits" in loss.teacher_outputs for loss in positional)
    if token_level and any("logits" in loss.teacher_outputs and asked[loss.term] is None for loss in positional):
        raise ValueError(
            "only losses that say how they read a cache's logits (cached_logits: soft_target) can read a token-level "
            "teacher's logits from a cache (it stores the counted positions only); train the other logit losses online"
        )
    dense = not token_level or top_k <= 0
    kind = "span" if span else ("dense" if dense else "top_k")
    contents = {
        "logits": kind if reads_logits else None,
        "token_level": token_level,
        "shift": any(request.shift for request in requests),
        "top_k": None if dense or not reads_logits else int(top_k),
        "temperatures": [] if dense or not reads_logits else sorted({request.temperature for request in requests}),
        "seq2seq": describe(teacher).seq2seq,
        "groups": group_contents(teacher_losses, retokenizer, teacher, top_k) if cross else None,
    }
    # An encoder-decoder's hidden states come per stack (the losses name theirs); other models have one.
    for prefix, stack in STATE_PREFIXES.items():
        if (stack is not None) != contents["seq2seq"]:
            continue
        readers = [
            loss
            for loss in teacher_losses
            if "hidden_states" in loss.teacher_outputs and getattr(loss, "stack", None) == stack
        ]
        count = _num_hidden_states(teacher, stack, readers)
        layers: set[int] = set()
        for loss in readers:
            wanted = loss.teacher_hidden_layers()
            layers |= set(range(count)) if wanted is None else {i % count for i in wanted}
        contents[f"{prefix}hidden_layers"] = sorted(layers)
        contents[f"num_{prefix}hidden_states"] = count
    return contents


def _num_hidden_states(teacher: Any, stack: str | None, readers: list[DistillationLoss]) -> int | None:
    """How many hidden states (layers + 1) the teacher returns for a stack (its only one when `stack` is None)."""
    if stack is not None:  # read only when a loss needs that stack (its depth may have any attribute name)
        return stack_size(teacher, stack, "num_hidden_layers", readers[0].term) + 1 if readers else None
    depth = getattr(getattr(teacher, "config", None), "num_hidden_layers", None)
    if depth is None and readers:
        raise ValueError(
            f"losses[{readers[0].term!r}] reads the teacher's hidden states, but its config has no num_hidden_layers "
            "to tell how many it returns; train this loss online (teacher_cache=None)"
        )
    return None if depth is None else depth + 1


def contents_mismatch(stored: dict[str, Any], needed: dict[str, Any]) -> list[str]:
    """Why a cache holding `stored` cannot serve losses that need `needed` (empty when it can)."""
    problems = []
    stored, needed = {**_ABSENT, **stored}, {**_ABSENT, **needed}
    for key in ("token_level", "shift", "seq2seq", "teacher_columns",
                *(f"num_{prefix}hidden_states" for prefix in STATE_PREFIXES)):  # fmt: skip
        if stored[key] != needed[key]:
            problems.append(f"{key} is {stored[key]} in the cache, {needed[key]} now")
    if needed["logits"] is not None and (stored["logits"], stored["top_k"]) != (needed["logits"], needed["top_k"]):
        problems.append(
            f"the cache keeps {stored['logits'] or 'no'} logits (top_k {stored['top_k']}), the losses now need "
            f"{needed['logits']} logits (top_k {needed['top_k']})"
        )
    for key in ("temperatures", *(f"{prefix}hidden_layers" for prefix in STATE_PREFIXES)):
        missing = sorted(set(needed[key]) - set(stored[key]))
        if missing:
            problems.append(f"{key} {missing} are needed but the cache has only {stored[key]}")
    return problems + groups_mismatch(stored["groups"], needed["groups"])


def input_checksums(inputs: Mapping[str, Any]) -> tuple[str, torch.Tensor]:
    """One float64 number per example, from the inputs the teacher sees, to tell whether they changed.

    Token ids (real tokens only, so padding does not matter) give an exact integer: sum of (id + 1) x (1 +
    rank among the real tokens). Float inputs (pixels) give a weighted sum, compared with a tolerance.
    """
    key = next((key for key in CHECKSUM_KEYS if isinstance(inputs.get(key), torch.Tensor)), None)
    if key is None:
        raise ValueError(
            f"a teacher cache needs one of {CHECKSUM_KEYS} among the inputs; the batch has {list(inputs)}"
        )
    values = inputs[key]
    flat = values.reshape(values.shape[0], -1)
    if not values.is_floating_point():
        mask = inputs.get("attention_mask")
        if key != "input_ids" or mask is None:
            mask = torch.ones_like(flat)
        return key, _token_checksum(flat, mask.reshape(flat.shape))
    weights = _CHECKSUM_WEIGHTS.get((flat.shape[1], str(flat.device)))
    if weights is None:
        steps = torch.arange(flat.shape[1], dtype=torch.float64, device=flat.device)
        weights = _CHECKSUM_WEIGHTS.setdefault((flat.shape[1], str(flat.device)), 1.0 + 0.5 * torch.sin(steps))
    return key, flat.double() @ weights


def label_checksums(inputs: Mapping[str, Any]) -> torch.Tensor:
    """One exact number per example from an encoder-decoder's labels (which set its decoder inputs); the decoder
    inputs stand in for them in a batch without labels."""
    labels = inputs.get("labels")
    if labels is None:
        labels = inputs.get("decoder_input_ids")
    if labels is None:
        raise ValueError(
            "a teacher cache for an encoder-decoder model needs labels (or decoder_input_ids) in each batch"
        )
    return _token_checksum(labels, labels.ne(-100))


def _token_checksum(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of (id + 1) x (1 + rank among the counted tokens), per row: exact in float64, blind to padding."""
    mask = mask.long()
    ranks = mask.cumsum(1) * mask
    return ((ids.long() + 1) * ranks).sum(1).double()


def same_inputs(stored: torch.Tensor, seen: torch.Tensor, exact: bool) -> torch.Tensor:
    """Which examples' checksums agree: exactly for token ids, within float rounding for float inputs."""
    stored = stored.to(seen.device)
    if exact:
        return stored == seen
    return torch.isclose(stored, seen, rtol=1e-6, atol=1e-6)


class OutputExtractor:
    """Turns one batch's teacher outputs into the per-example tensors a shard stores (see `store`)."""

    def __init__(self, contents: dict[str, Any], losses: list[DistillationLoss]):
        self.contents = contents
        # The counted positions of token-level logits, by the rule of the losses that read them.
        requests = [request for request in (loss.cached_logits() for loss in losses) if request is not None]
        self.position_mask = next((r.position_mask for r in requests if r.position_mask is not None), None)

    def __call__(self, inputs: Mapping[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        contents = self.contents
        stored = {"checksum": input_checksums(inputs)[1]}
        if contents["logits"] == "span":
            # Question answering: start and end logits at the real tokens (the loss leaves padding out).
            mask = token_mask(inputs)
            if mask is None:
                mask = torch.ones_like(outputs.start_logits, dtype=torch.bool)
            mask = mask.to(outputs.start_logits.device)
            stored["span_rows"] = mask.sum(1)
            stored["span.start_logits"] = outputs.start_logits[mask].float()
            stored["span.end_logits"] = outputs.end_logits[mask].float()
        elif contents["logits"] is not None and not contents["token_level"]:
            stored["logits"] = outputs.logits.float()
        elif contents["logits"] is not None:
            mask = self.position_mask(inputs)
            stored["rows"] = mask.sum(1)
            rows = outputs.logits
            if isinstance(rows, torch.Tensor) and rows.dim() != 2:  # not already the counted rows (logit_rows)
                rows = rows[mask]  # the counted positions, in the order the loss takes them
            elif rows.shape[0] != int(mask.sum()):
                raise ValueError(
                    f"the teacher returned {rows.shape[0]} logit rows for {int(mask.sum())} counted positions"
                )
            stored.update(token_rows(rows, contents))
        if contents.get("groups"):
            stored.update(stored_groups(inputs, outputs, contents))
        if contents.get("seq2seq"):
            stored["label_checksum"] = label_checksums(inputs)
        for prefix, stack in STATE_PREFIXES.items():
            if not contents.get(f"{prefix}hidden_layers") or (not prefix and _grouped_hidden(contents)):
                continue
            # Real tokens (labeled positions for a decoder) only; without a mask, whole examples.
            mask = position_mask(inputs, stack)
            if mask is not None:
                stored[f"{prefix}hidden_rows"] = mask.sum(1)
            states = getattr(outputs, f"{prefix}hidden_states")
            for layer in contents[f"{prefix}hidden_layers"]:
                hidden = states[layer]
                stored[f"{prefix}hidden.{layer}"] = hidden if mask is None else hidden[mask.to(hidden.device)]
        return stored


@torch.no_grad()
def token_rows(rows: torch.Tensor | ProjectedRows, contents: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What a cache stores of a token-level teacher's `[rows, vocab]` logits (or its unprojected rows): all of them
    (`"dense"`), or the top k with the log normaliser and tail per temperature.

    Unprojected rows are projected a group at a time (`group_rows`: at most `BUILD_GROUP_ELEMENTS` logits) into one
    buffer that the top k's reduction then overwrites: no group-sized tensor is allocated per group. On 2 CPU
    cores, 1,016 rows x 50,257 words: projected 0.82 s; projected and reduced into new tensors (each mapped and first
    touched afresh) 1.50 s, into the buffer 0.99 s; in 256-row products 1.22 s. Logits given whole are taken
    `rows_per_chunk` rows at a time (at least `BUILD_CHUNK_ROWS`). Stored values are never differentiated."""
    vocab = rows.shape[-1]
    projected = isinstance(rows, ProjectedRows) and contents["logits"] != "dense"
    chunk_size = max(rows_per_chunk(vocab), BUILD_CHUNK_ROWS)
    if projected:
        chunk_size = group_rows(rows.shape[0], chunk_size, vocab, BUILD_GROUP_ELEMENTS)
    parts: dict[str, list[torch.Tensor]] = {}
    buffer = None
    for start in range(0, max(rows.shape[0], 1), chunk_size):  # one empty chunk when no row counts
        end = min(start + chunk_size, rows.shape[0])
        if projected:
            if buffer is None:
                buffer = torch.empty(chunk_size, vocab, dtype=rows.weight.dtype, device=rows.weight.device)
            logits = rows.logits_into(buffer[: end - start], start)
        else:
            logits = rows.logits(start, end) if isinstance(rows, ProjectedRows) else rows[start:end]
        if contents["logits"] == "dense":
            parts.setdefault("token.logits", []).append(logits.float())
            continue
        values, indices, normalizer, tail = teacher_top_k(
            logits, contents["top_k"], contents["temperatures"], overwrite=projected
        )
        chunk = {"token.values": values, "token.indices": indices.int(), "token.log_normalizer": normalizer}
        if tail is not None:
            chunk["token.tail"] = tail
        for key, tensor in chunk.items():
            parts.setdefault(key, []).append(tensor)
    return {key: torch.cat(tensors) for key, tensors in parts.items()}


def _grouped_hidden(contents: dict[str, Any]) -> bool:
    """Whether the teacher's hidden states are stored as the means of aligned groups (another tokenizer)."""
    return bool((contents.get("groups") or {}).get("aligned_hidden"))


def _teacher_value(key: str) -> bool:
    """Whether a stored tensor is the teacher's own output (the log-normaliser and tail are derived from them)."""
    return key == "logits" or key.startswith(("token.logits", "token.values", "span.", "group.")) or "hidden." in key


def nonfinite_examples(stored: dict[str, torch.Tensor]) -> list[int]:
    """The examples (positions in the batch) whose stored teacher outputs hold a NaN or an infinity."""
    checked = {key: tensor for key, tensor in stored.items() if tensor.is_floating_point() and _teacher_value(key)}
    if not checked or bool(torch.stack([torch.isfinite(tensor).all() for tensor in checked.values()]).all()):
        return []
    examples = len(stored["checksum"])
    bad = torch.zeros(examples, dtype=torch.bool)
    for key, tensor in checked.items():
        finite_rows = torch.isfinite(tensor.reshape(len(tensor), -1)).all(1).cpu()
        counts = stored.get(row_counts_key(key) or "")
        if counts is not None:
            owner = torch.repeat_interleave(torch.arange(examples), counts.cpu())
            bad[owner[~finite_rows]] = True
        else:
            bad |= ~finite_rows
    return bad.nonzero().flatten().tolist()


class TokenTargets:
    """A batch's cached token-level targets, one row per counted position in the loss's order."""

    def __init__(self, gathered: dict[str, torch.Tensor], temperatures: list[float], device: torch.device):
        self.logits = _maybe(gathered, "token.logits", device)
        self.values = _maybe(gathered, "token.values", device)
        self.indices = _maybe(gathered, "token.indices", device)
        self.log_normalizer = _maybe(gathered, "token.log_normalizer", device)
        self.tail = _maybe(gathered, "token.tail", device)
        self.temperatures = temperatures
        self.num_rows = int(gathered["rows"].sum())

    def temperature_column(self, temperature: float) -> int:
        if temperature not in self.temperatures:
            raise ValueError(
                f"the teacher cache holds top-k targets for temperatures {self.temperatures}, not {temperature}: "
                "rebuild it with the losses you train with"
            )
        return self.temperatures.index(temperature)


class CachedHiddenStates:
    """`hidden_states` as a sequence that holds only the cached layers and says so when another is read."""

    def __init__(self, layers: dict[int, torch.Tensor], length: int):
        self.layers, self.length = layers, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        layer = index % self.length if -self.length <= index < self.length else index
        if layer not in self.layers:
            raise KeyError(
                f"the teacher cache holds hidden states {sorted(self.layers)}, not {index}: rebuild it for these losses"
            )
        return self.layers[layer]


class CachedTeacherOutputs:
    """Stands in for the teacher's model output when training from a cache: `logits`, `hidden_states` (for an
    encoder-decoder `encoder_hidden_states` and `decoder_hidden_states`), for token-level tasks `token_targets`
    (the soft-target rows) and for question answering `start_logits` and `end_logits`, each only as far as the
    cache holds it."""

    def __init__(
        self,
        logits=None,
        hidden_states=None,
        token_targets=None,
        start_logits=None,
        end_logits=None,
        encoder_hidden_states=None,
        decoder_hidden_states=None,
    ):
        self._logits, self.hidden_states, self.token_targets = logits, hidden_states, token_targets
        self.start_logits, self.end_logits = start_logits, end_logits
        self.encoder_hidden_states, self.decoder_hidden_states = encoder_hidden_states, decoder_hidden_states
        self.attentions = None
        #: A teacher with another tokenizer: the batch's aligned groups and the teacher's side of each.
        self.group_targets: GroupTargets | None = None

    def get(self, key: str, default: Any = None) -> Any:
        """The batch's `Alignment` under "alignment" (a teacher with another tokenizer), as a model output carries
        it online; `default` for anything else."""
        if key == ALIGNMENT_KEY and self.group_targets is not None:
            return self.group_targets.alignment
        return default

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            raise ValueError(
                "this teacher cache holds no per-example logits (token-level caches keep the soft-target rows of the "
                "counted positions only, question-answering caches start_logits and end_logits); train losses that "
                "need the teacher's full logits online"
            )
        return self._logits


def assemble(
    gathered: dict[str, torch.Tensor], inputs: Mapping[str, Any], contents: dict[str, Any], device: torch.device
) -> CachedTeacherOutputs:
    """The `teacher_outputs` of a batch from the tensors `CacheReader.gather` returned for its examples."""
    token_targets = None
    if contents["token_level"] and contents["logits"] is not None:
        token_targets = TokenTargets(gathered, contents["temperatures"], device)
    hidden, group_targets = {}, None
    if contents.get("groups"):
        group_targets = GroupTargets(gathered, inputs, contents, device)
    for prefix, stack in STATE_PREFIXES.items():
        if not contents.get(f"{prefix}hidden_layers"):
            continue
        if not prefix and _grouped_hidden(contents):  # one row per aligned group
            hidden["hidden_states"] = CachedHiddenStates(group_targets.hidden_layers(), contents["num_hidden_states"])
            continue
        mask = position_mask(inputs, stack)
        layers = {}
        for layer in contents[f"{prefix}hidden_layers"]:
            rows = gathered[f"{prefix}hidden.{layer}"].to(device)
            if mask is None:
                layers[layer] = rows
                continue
            mask = mask.to(device)
            layer_states = rows.new_zeros((*mask.shape, rows.shape[-1]))
            layer_states[mask] = rows  # counted positions back in place; the rest stays zero (the losses mask it)
            layers[layer] = layer_states
        hidden[f"{prefix}hidden_states"] = CachedHiddenStates(layers, contents[f"num_{prefix}hidden_states"])
    spans = {}
    if contents["logits"] == "span":
        mask = inputs.get("attention_mask")
        for name in ("start_logits", "end_logits"):
            rows = gathered[f"span.{name}"].to(device)
            if mask is None:  # every position was stored
                spans[name] = rows.reshape(len(gathered["checksum"]), -1)
            else:  # real tokens back in place; padding stays zero (the loss leaves it out)
                spans[name] = rows.new_zeros(mask.shape).masked_scatter(mask.bool().to(device), rows)
    logits = _maybe(gathered, "logits", device)
    outputs = CachedTeacherOutputs(logits=logits, token_targets=token_targets, **hidden, **spans)
    outputs.group_targets = group_targets
    return outputs


def _maybe(gathered: dict[str, torch.Tensor], name: str, device: torch.device) -> torch.Tensor | None:
    return gathered[name].to(device) if name in gathered else None

"""Stage 4: score every model on the same held-out split with the same metric, and time it on the CPU.

Metrics are computed here from the predictions (`evaluate.load` would fetch its metric scripts from the
Hub): accuracy for classification; masked-token accuracy and perplexity for masked LM; for causal LM, the share of
held-out prompts whose greedy completion passes the data set's metric, and the perplexity of the references.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import causal
from .data import PreparedData
from .settings import CAUSAL_LM, MASKED_LM


@torch.no_grad()
def evaluate_model(
    model: nn.Module, data: PreparedData, batch_size: int = 64, name: str = "model"
) -> dict[str, float]:
    """Accuracy (and, for masked LM, perplexity over the masked tokens) of `model` on `data.eval`, on the device
    the model is on. Each batch is reduced as it comes (hits and log-probabilities of the labels), so no logits
    pile up; the loop is our own because transformers' Trainer refuses quantized models, even for evaluation."""
    if data.task == CAUSAL_LM:
        settings = data.settings
        return causal.evaluate_generation(
            model, data.eval, data.eval_collator, data.processor, data.eval_references,
            causal.metric_name(settings.generation_metric, settings.dataset), batch_size,
            settings.eval_max_new_tokens, name,
        )  # fmt: skip
    masked_lm = data.task == MASKED_LM
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    hits, count, label_log_prob = 0, 0, 0.0
    loader = DataLoader(
        data.eval, batch_size=batch_size, sampler=length_order(data.eval), collate_fn=data.eval_collator
    )
    try:
        for batch in tqdm(loader, desc=f"Evaluating the {name}", leave=False):
            batch = {key: value.to(device) for key, value in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            counted = labels != -100  # masked LM: the masked positions; classification: every example
            hits += int((logits.argmax(-1) == labels)[counted].sum())
            count += int(counted.sum())
            if masked_lm:
                log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
                label_log_prob += float(log_probs.squeeze(-1)[counted].sum())
    finally:
        model.train(training)
    if count == 0:
        raise ValueError(f"the held-out split has no labeled {'masked tokens' if masked_lm else 'examples'} to score")
    metrics = {"accuracy": hits / count}
    if masked_lm:
        metrics["perplexity"] = math.exp(-label_log_prob / count)
    return metrics


def length_order(dataset: Any) -> list[int] | None:
    """The examples of a tokenized split from shortest to longest (ties in their order), so that each batch pads to
    lengths close to its own: scores do not depend on the order, and a batch of short texts costs less. None (the
    split's own order) when it holds no `input_ids`."""
    if "input_ids" not in getattr(dataset, "column_names", ()):
        return None
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model, each tied tensor counted once."""
    return sum(parameter.numel() for parameter in model.parameters())


def _stored(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a weight is stored as: itself, or a quantized weight's (a tensor subclass) inner tensors,
    such as int8 values and their scales."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [inner for name in names for inner in _stored(getattr(tensor, name))]


def weights_size_bytes(model: nn.Module) -> int:
    """Bytes the model's saved weights take (each tied tensor once), as in its safetensors file minus the header:
    parameters and persistent buffers; a quantized weight counts as its int8 values and scales."""
    seen, total = set(), 0
    for tensor in [inner for weight in model.state_dict().values() for inner in _stored(weight)]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


#: Above this interquartile range (as a share of the median) a latency is too noisy to trust.
NOISY_SPREAD = 0.25
#: Two models of one architecture (student and baseline) whose medians differ by more than this ratio were timed
#: under different conditions.
SAME_NETWORK_RATIO = 1.25
_clock = time.perf_counter  # the tests replace it to inject a slow spell


def _spread(times: list[float]) -> float:
    """Interquartile range over the median: how much the repeats of one measurement disagree."""
    if len(times) < 4:
        return 0.0
    quartiles = statistics.quantiles(times, n=4)
    return (quartiles[2] - quartiles[0]) / statistics.median(times)


#: Compiled graphs allowed per function: teacher, student and baseline share BERT's code and compile once per batch
#: size each, past torch's default of 8, after which torch would silently run the function eagerly.
RECOMPILE_LIMIT = 64


def compiled_models(models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Each model under `torch.compile` with static shapes (one graph per batch size), the recompile limit raised so
    that none falls back to eager (`measure_latency` then refuses any recompilation while it times)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, RECOMPILE_LIMIT * 4
    )
    return {name: torch.compile(model, dynamic=False) for name, model in models.items()}


@torch.no_grad()
def measure_latency(
    models: dict[str, nn.Module],
    data: PreparedData,
    batch_sizes: list[int],
    repeats: int = 20,
    warmup: int = 3,
    compile: bool = False,
    views: dict[str, PreparedData] | None = None,
) -> dict[str, dict[str, float]]:
    """Median CPU wall time of one forward pass, in milliseconds, per model and batch size (held-out inputs), and
    the spread of the repeats (`latency_spread_batch_<b>`: interquartile range over the median).

    The models take turns, one forward each per round, so that whatever else the machine does drifts over all
    of them alike instead of favouring the one timed in a quiet moment. Runs on the CPU with the process's
    torch threads whatever device the models trained on, because the report is about deployment where memory
    and latency are tight. Each model is put back where it was.

    With `compile`, every model runs under `torch.compile` (`compiled_models`): the warm-up rounds compile, and
    the timed rounds run under torch's "fail_on_recompile" stance, so a figure is never an eager run in disguise.
    The keys are then `compiled_latency_ms_batch_<b>` and `compiled_latency_spread_batch_<b>`. A model named in
    `views` is timed on that data's inputs (its own tokens), the others on `data`'s.
    """
    placement = {name: (next(model.parameters()).device, model.training) for name, model in models.items()}
    for model in models.values():
        model.to("cpu").eval()
    runs = compiled_models(models) if compile else models
    prefix = "compiled_" if compile else ""
    latency: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch_size in batch_sizes:
        batches = {name: (views or {}).get(name, data).example_batch(batch_size) for name in models}
        times: dict[str, list[float]] = {name: [] for name in models}
        for round_index in range(warmup + repeats):
            stance = "fail_on_recompile" if compile and round_index >= warmup else "default"
            with torch.compiler.set_stance(stance):
                for name, model in runs.items():
                    start = _clock()
                    model(**batches[name])
                    if round_index >= warmup:
                        times[name].append(_clock() - start)
        for name in models:
            latency[name][f"{prefix}latency_ms_batch_{batch_size}"] = 1000 * statistics.median(times[name])
            latency[name][f"{prefix}latency_spread_batch_{batch_size}"] = _spread(times[name])
    for name, model in models.items():
        device, training = placement[name]
        model.to(device).train(training)
    return latency


def untrusted_latencies(results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Batch size -> why its latencies cannot be trusted, for each batch size whose figures disagree with
    themselves: a model whose repeats spread widely, or two models of one architecture (student and baseline) whose
    medians differ. Both mean that something else was using the CPU while they were timed."""
    problems: dict[str, str] = {}
    names = list(results)
    pairs = [
        (a, b) for index, a in enumerate(names) for b in names[index + 1 :]
        if results[a].get("architecture") and results[a].get("architecture") == results[b].get("architecture")
    ]  # fmt: skip
    batch_sizes = [
        key.rsplit("_", 1)[1] for key in next(iter(results.values())) if key.startswith("latency_ms_batch_")
    ]
    for batch in batch_sizes:
        reasons = [
            f"the {name}'s repeats spread over {row[f'latency_spread_batch_{batch}']:.0%} of their median"
            for name, row in results.items()
            if row.get(f"latency_spread_batch_{batch}", 0.0) > NOISY_SPREAD
        ]
        for a, b in pairs:
            fast, slow = sorted((results[a][f"latency_ms_batch_{batch}"], results[b][f"latency_ms_batch_{batch}"]))
            if slow > SAME_NETWORK_RATIO * fast:
                reasons.append(f"the {a} and the {b}, one architecture, took {results[a][f'latency_ms_batch_{batch}']:.1f} "
                               f"and {results[b][f'latency_ms_batch_{batch}']:.1f} ms")  # fmt: skip
        if reasons:
            problems[batch] = "; ".join(reasons)
    return problems


def describe_models(
    models: dict[str, nn.Module],
    data: PreparedData,
    latency_batch_sizes: list[int],
    repeats: int,
    compiled: bool = False,
    views: dict[str, PreparedData] | None = None,
) -> dict[str, dict[str, Any]]:
    """Size and CPU speed of each model: parameters, weight bytes and latency per batch size, eager and (with
    `compiled`) also under torch.compile. `views`: the data of a model that reads other tokens (a teacher with its
    own tokenizer), by name."""
    latency = measure_latency(models, data, latency_batch_sizes, repeats, views=views)
    if compiled:
        timed = measure_latency(models, data, latency_batch_sizes, repeats, compile=True, views=views)
        for name, figures in timed.items():
            latency[name].update(figures)
    parameters = {name: count_parameters(model) for name, model in models.items()}
    return {
        name: {
            "parameters": parameters[name],
            "size_bytes": weights_size_bytes(model),
            # Same class, size and number format: the same network, which should run at the same speed.
            "architecture": f"{type(model).__name__}, {parameters[name]:,} parameters"
            + (", int8" if getattr(model, "is_quantized", False) else ""),
            **latency[name],
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        }
        for name, model in models.items()
    }

"""Stage 4: score every model on the same held-out split with the same metric, and time it on the CPU.

Metrics are computed here from the predictions (`evaluate.load` would fetch its metric scripts from the
Hub): accuracy for classification; masked-token accuracy and perplexity for masked LM.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .data import PreparedData


def _keep_label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shrink masked-LM logits to what the metrics need, per position: [argmax, log p(label)] (no vocab axis)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    safe = labels.clamp(min=0).unsqueeze(-1)
    return torch.stack([logits.argmax(-1).to(log_probs.dtype), log_probs.gather(-1, safe).squeeze(-1)], dim=-1)


def _classification_metrics(prediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


def _masked_lm_metrics(prediction) -> dict[str, float]:
    kept, labels = prediction.predictions, prediction.label_ids
    masked = labels != -100
    hits = kept[..., 0][masked] == labels[masked]
    return {"accuracy": float(hits.mean()), "perplexity": float(math.exp(-kept[..., 1][masked].mean()))}


def evaluate_model(
    model: nn.Module, data: PreparedData, batch_size: int = 64, name: str = "model"
) -> dict[str, float]:
    """Accuracy (and, for masked LM, perplexity over the masked tokens) of `model` on `data.eval`."""
    masked_lm = data.task == "masked-lm"
    with tempfile.TemporaryDirectory() as scratch:
        arguments = TrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=batch_size,
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=torch.accelerator.is_available(),
            eval_accumulation_steps=16,
            disable_tqdm=False,
            remove_unused_columns=False,  # image splits are transformed on the fly from their image column
        )
        trainer = Trainer(
            model=model,
            args=arguments,
            eval_dataset=data.eval,
            data_collator=data.eval_collator,
            compute_metrics=_masked_lm_metrics if masked_lm else _classification_metrics,
            preprocess_logits_for_metrics=_keep_label_log_probs if masked_lm else None,
        )
        metrics = trainer.evaluate(metric_key_prefix=name)
    prefix = f"{name}_"  # the Trainer also adds an unprefixed `epoch`, which is no metric
    return {
        key[len(prefix) :]: value
        for key, value in metrics.items()
        if key.startswith(prefix) and not key.endswith(("runtime", "per_second", "preparation_time"))
    }


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model, each tied tensor counted once."""
    return sum(parameter.numel() for parameter in model.parameters())


def weights_size_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take (each tied tensor once), as in a safetensors file minus its header."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
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


@torch.no_grad()
def measure_latency(
    models: dict[str, nn.Module], data: PreparedData, batch_sizes: list[int], repeats: int = 20, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """Median CPU wall time of one forward pass, in milliseconds, per model and batch size (held-out inputs), and
    the spread of the repeats (`latency_spread_batch_<b>`: interquartile range over the median).

    The models take turns, one forward each per round, so that whatever else the machine does drifts over all
    of them alike instead of favouring the one timed in a quiet moment. Runs on the CPU with the process's
    torch threads whatever device the models trained on, because the report is about deployment where memory
    and latency are tight. Each model is put back where it was.
    """
    placement = {name: (next(model.parameters()).device, model.training) for name, model in models.items()}
    for model in models.values():
        model.to("cpu").eval()
    latency: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch_size in batch_sizes:
        batch = data.example_batch(batch_size)
        times: dict[str, list[float]] = {name: [] for name in models}
        for round_index in range(warmup + repeats):
            for name, model in models.items():
                start = _clock()
                model(**batch)
                if round_index >= warmup:
                    times[name].append(_clock() - start)
        for name in models:
            latency[name][f"latency_ms_batch_{batch_size}"] = 1000 * statistics.median(times[name])
            latency[name][f"latency_spread_batch_{batch_size}"] = _spread(times[name])
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
    models: dict[str, nn.Module], data: PreparedData, latency_batch_sizes: list[int], repeats: int
) -> dict[str, dict[str, Any]]:
    """Size and CPU speed of each model: parameters, weight bytes and latency per batch size."""
    latency = measure_latency(models, data, latency_batch_sizes, repeats)
    parameters = {name: count_parameters(model) for name, model in models.items()}
    return {
        name: {
            "parameters": parameters[name],
            "size_bytes": weights_size_bytes(model),
            # Same class, same size: the same network, which should run at the same speed.
            "architecture": f"{type(model).__name__}, {parameters[name]:,} parameters",
            **latency[name],
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        }
        for name, model in models.items()
    }

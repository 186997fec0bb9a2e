"""The report's CPU latency says when it cannot be trusted: a slow spell injected into the timing is flagged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import bert_classifier

from hf_distill.pipeline import evaluation
from hf_distill.pipeline.report import build_report, report_lines


class Batches:
    """What `describe_models` reads of the prepared data: held-out batches of a given size."""

    def example_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(5, 64, (batch_size, 8))}


def timed_models(monkeypatch, slow_rounds: set[int]):
    """Three models timed by a fake clock: the teacher costs 4 ms, student and baseline (one network) 2 ms each;
    in `slow_rounds`, something else takes the CPU while the baseline runs (+6 ms)."""
    clock = {"now": 0.0, "round": 0}
    monkeypatch.setattr(evaluation, "_clock", lambda: clock["now"])
    models = {
        "teacher": bert_classifier(0),
        "student": bert_classifier(1, layers=2),
        "baseline": bert_classifier(2, layers=2),
    }
    costs = {"teacher": 4e-3, "student": 2e-3, "baseline": 2e-3}
    for name, model in models.items():

        def advance(_module, _inputs, name=name):
            slow = name == "baseline" and clock["round"] in slow_rounds
            clock["now"] += costs[name] + (6e-3 if slow else 0.0)
            if name == "baseline":  # the last model of a round
                clock["round"] += 1

        model.register_forward_pre_hook(advance)
    return models


def report_for(models, batch_sizes):
    results = evaluation.describe_models(models, Batches(), batch_sizes, repeats=12)
    for row in results.values():
        row["accuracy"] = 0.8
    return build_report(results, recipe="test")


def test_a_quiet_measurement_is_trusted(monkeypatch):
    report = report_for(timed_models(monkeypatch, slow_rounds=set()), [1])
    assert report["summary"]["latency_untrusted"] == {}
    assert report["results"]["student"]["latency_ms_batch_1"] == pytest.approx(2.0)
    assert report["summary"]["speedup_batch_1"] == pytest.approx(2.0)
    assert not any("cannot be trusted" in line or "noisy" in line for line in report_lines(report))


def test_a_slow_spell_is_flagged_in_the_table_and_the_summary(monkeypatch):
    # Warm-up is 3 rounds; rounds 3..14 are timed. Half of them slow: the baseline's median moves to 5 ms.
    report = report_for(timed_models(monkeypatch, slow_rounds=set(range(3, 15, 2))), [1])
    reason = report["summary"]["latency_untrusted"]["1"]
    assert "the baseline's repeats spread over" in reason
    assert "the student and the baseline, one architecture, took 2.0 and 5.0 ms" in reason
    lines = report_lines(report)
    assert "CPU ms, batch 1 (noisy)" in lines[2]
    assert any(line.startswith("- CPU speed-up at batch 1") and "not to be trusted" in line for line in lines)
    advice = next(line for line in lines if "cannot be trusted" in line)
    assert "rerun with nothing else running" in advice


@pytest.mark.slow  # torch.compile of four models: most of a minute
def test_compiled_latency_runs_compiled_and_is_reported_beside_eager():
    import torch._dynamo

    torch._dynamo.reset()
    models = {"teacher": bert_classifier(0, layers=2), "student": bert_classifier(1, layers=1)}
    results = evaluation.describe_models(models, Batches(), [2], repeats=2, compiled=True)
    # Two models sharing BERT's code, each compiled once: two frames of BertForSequenceClassification.forward.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    for row in results.values():
        row["accuracy"] = 0.8
        assert row["compiled_latency_ms_batch_2"] > 0 and row["latency_ms_batch_2"] > 0
    report = build_report(results, recipe="test")
    assert report["summary"]["compiled_speedup_batch_2"] == pytest.approx(
        results["teacher"]["compiled_latency_ms_batch_2"] / results["student"]["compiled_latency_ms_batch_2"]
    )
    lines = "\n".join(report_lines(report))
    assert "compiled CPU ms, batch 2" in lines and "speed-up at batch 2, both compiled" in lines
    # The timed rounds refuse recompilation: a new shape under the same stance fails instead of running eagerly.
    compiled = evaluation.compiled_models({"student": models["student"]})["student"]
    compiled(**Batches().example_batch(2))
    with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(Exception, match="[Rr]ecompil"):
        compiled(**Batches().example_batch(3))
    torch._dynamo.reset()


def test_evaluation_batches_texts_by_length_and_scores_them_as_in_their_order():
    """Held-out texts are scored shortest first (each batch pads to lengths close to its own); the accuracy is the
    one of the examples taken one by one in the split's order."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

    generator = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(5, 64, (int(length),), generator=generator).tolist(), "labels": index % 2}
        for index, length in enumerate(torch.randint(2, 12, (20,), generator=generator))
    ]
    split = Dataset.from_list(rows)
    order = evaluation.length_order(split)
    lengths = [len(rows[index]["input_ids"]) for index in order]
    assert sorted(order) == list(range(20)) and lengths == sorted(lengths)
    assert evaluation.length_order(Dataset.from_list([{"pixel_values": [0.0], "labels": 0}])) is None

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0}, "[PAD]")))
    tokenizer.pad_token = "[PAD]"
    data = SimpleNamespace(task="text-classification", eval=split, eval_collator=DataCollatorWithPadding(tokenizer))
    model = bert_classifier(0).eval()
    with torch.no_grad():
        one_by_one = [int(model(input_ids=torch.tensor([row["input_ids"]])).logits.argmax()) for row in rows]
    expected = sum(prediction == row["labels"] for prediction, row in zip(one_by_one, rows, strict=True)) / 20
    assert evaluation.evaluate_model(model, data, batch_size=8)["accuracy"] == pytest.approx(expected)

"""The teacher-output cache: same loss as online, no teacher in memory, refusals, resumable atomic builds."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from helpers import (
    VOCAB,
    bart,
    bert_classifier,
    bert_masked_lm,
    bert_qa,
    causal_lm,
    config,
    image_dataset,
    masked_lm_dataset,
    mobilenet_classifier,
    pad_right,
    prompt_completion_dataset,
    qa_dataset,
    seq2seq_dataset,
    text_dataset,
    vit_classifier,
)
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
)

from hf_distill import DistillationTrainer
from hf_distill.cache import INDEX_KEY, TeacherCache
from hf_distill.pipeline import build_student
from hf_distill.seq2seq import with_decoder_inputs
from hf_distill.teacher_sources import CachedTeacher

MLM_LOSSES = {
    "soft_target": {"weight": 1.0, "temperature": 2.0},
    "hard_label": {"weight": 0.5},
    "hidden_state": {"weight": 1.0, "distance": "cosine", "layer_map": [[-1, -1]]},
}
CLASSIFIER_LOSSES = {"soft_target": {"weight": 0.5, "temperature": 4.0}, "hard_label": {"weight": 0.5}}
QA_LOSSES = {**MLM_LOSSES, "soft_target": {"weight": 1.0, "temperature": 3.0}}
SEQ2SEQ_LOSSES = {
    "soft_target": {"weight": 1.0, "temperature": 2.0},
    "hard_label": {"weight": 0.5},
    "encoder_hidden": {"type": "hidden_state", "stack": "encoder", "distance": "cosine", "layer_map": [[1, 2]]},
    "decoder_hidden": {"type": "hidden_state", "stack": "decoder"},
    "decoder_relation": {"type": "relation", "stack": "decoder"},
}


class Stack:
    """Collator for pre-padded rows: stacks every column."""

    def __call__(self, rows):
        return {key: torch.as_tensor([row[key] for row in rows]) for key in rows[0]}


def tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(64)}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")))
    fast.pad_token, fast.mask_token = "t0", "t4"
    return fast


def mlm_pair(width: int = 16):
    teacher = bert_masked_lm(0, width=width)
    student, _ = build_student(teacher, num_layers=2)
    return teacher, student


def setups():
    """(teacher, student, dataset, collator, losses) for each task a cache serves differently."""
    teacher, student = mlm_pair()
    yield "masked-lm", teacher, student, masked_lm_dataset(24), Stack(), MLM_LOSSES
    yield "classifier", bert_classifier(0), bert_classifier(1, layers=2), text_dataset(24), None, CLASSIFIER_LOSSES
    yield "vision", vit_classifier(0), mobilenet_classifier(1), image_dataset(24), None, CLASSIFIER_LOSSES
    yield "question-answering", bert_qa(0), bert_qa(1, layers=2), qa_dataset(24), None, QA_LOSSES
    # Ragged targets padded per batch: the cache is built at another padding length than it is trained at.
    data, collator = seq2seq_dataset(24, padded=False), DataCollatorForSeq2Seq(tokenizer(), label_pad_token_id=-100)
    yield "encoder-decoder", bart(0), bart(1, layers=1, width=16), data, collator, SEQ2SEQ_LOSSES


def train(tmp_path, name, teacher, student, data, collator, losses, **overrides):
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path / name, losses, max_steps=5, **overrides),
        train_dataset=data,
        data_collator=collator,
    )
    trainer.train()
    return trainer


def train_logs(trainer):
    return [log for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("task", ["masked-lm", "classifier", "vision", "question-answering", "encoder-decoder"])
def test_dense_cache_trains_exactly_like_online_distillation(tmp_path, task):
    _, teacher, student, data, collator, losses = next(s for s in setups() if s[0] == task)
    online_student = copy.deepcopy(student)
    online = train(tmp_path, "online", teacher, online_student, data, collator, losses)
    cache_dir = str(tmp_path / "cache")
    cached = train(tmp_path, "cached", teacher, student, data, collator, losses, teacher_cache=cache_dir,
                   teacher_cache_top_k=0)  # fmt: skip
    assert cached.teacher_model is None and TeacherCache.is_finished(cache_dir)
    online_logs, cached_logs = train_logs(online), train_logs(cached)
    assert len(cached_logs) == 5
    for online_log, cached_log in zip(online_logs, cached_logs, strict=True):
        for term in [*losses, "loss"]:
            assert cached_log[term] == pytest.approx(online_log[term], rel=1e-6, abs=1e-6), term
    cached_weights = student.state_dict()
    for name, online_value in online_student.state_dict().items():
        torch.testing.assert_close(cached_weights[name], online_value, rtol=1e-6, atol=1e-6, msg=name)


def test_second_run_needs_no_teacher_and_evaluates_student_only_terms(tmp_path):
    teacher, student = mlm_pair()
    data, cache_dir = masked_lm_dataset(24), str(tmp_path / "cache")
    train(tmp_path, "first", teacher, copy.deepcopy(student), data, Stack(), MLM_LOSSES, teacher_cache=cache_dir)
    trainer = DistillationTrainer(
        model=student,
        args=config(tmp_path / "second", MLM_LOSSES, teacher_cache=cache_dir),
        train_dataset=data,
        eval_dataset=masked_lm_dataset(8, seed=1),  # one batch: eval_loss is then exactly its weighted terms
        data_collator=Stack(),
    )
    trainer.train()
    assert trainer.teacher_model is None
    assert {"soft_target", "hidden_state", "hard_label"} <= set(trainer.state.log_history[0])
    metrics = trainer.evaluate()
    # Outside the cache there is no teacher: only the student's own term is evaluated.
    assert "eval_hard_label" in metrics and "eval_soft_target" not in metrics
    assert metrics["eval_loss"] == pytest.approx(0.5 * metrics["eval_hard_label"], rel=1e-5)


def test_top_k_cache_matches_online_when_k_covers_the_vocabulary_and_is_close_below(tmp_path):
    teacher, student = bert_masked_lm(0), bert_masked_lm(1, layers=2)  # unrelated: a loss well above rounding
    data = masked_lm_dataset(24)
    losses = {"soft_target": {"weight": 1.0, "temperature": 2.0}}
    online = train(tmp_path, "online", teacher, copy.deepcopy(student), data, Stack(), losses)
    full = train(tmp_path, "k64", teacher, copy.deepcopy(student), data, Stack(), losses,
                 teacher_cache=str(tmp_path / "k64"), teacher_cache_top_k=64)  # fmt: skip
    top8 = train(tmp_path, "k8", teacher, copy.deepcopy(student), data, Stack(), losses,
                 teacher_cache=str(tmp_path / "k8"), teacher_cache_top_k=8)  # fmt: skip
    reference = online.state.log_history[0]["soft_target"]
    # Same divergence through top-k arithmetic (values / T - log normaliser): float32 rounding apart.
    assert full.state.log_history[0]["soft_target"] == pytest.approx(reference, rel=1e-4, abs=1e-6)
    approximate = top8.state.log_history[0]["soft_target"]
    assert approximate <= reference * (1 + 1e-6)  # merging the tail never increases the divergence
    assert approximate > 0.3 * reference


def test_mismatched_cache_is_refused(tmp_path):
    teacher, student = mlm_pair()
    data, cache_dir = masked_lm_dataset(24), str(tmp_path / "cache")
    train(tmp_path, "build", teacher, copy.deepcopy(student), data, Stack(), MLM_LOSSES, teacher_cache=cache_dir)

    def make(teacher_model=None, dataset=data, losses=MLM_LOSSES, **overrides):
        return DistillationTrainer(
            model=copy.deepcopy(student),
            teacher_model=teacher_model,
            args=config(tmp_path / "again", losses, teacher_cache=cache_dir, **overrides),
            train_dataset=dataset,
            data_collator=Stack(),
        )

    with pytest.raises(ValueError, match="teacher's weights differ"):
        make(teacher_model=bert_masked_lm(seed=5))
    with pytest.raises(ValueError, match="training data differ"):
        make(dataset=masked_lm_dataset(24, seed=3))
    other_temperature = {**MLM_LOSSES, "soft_target": {"weight": 1.0, "temperature": 3.0}}
    with pytest.raises(ValueError, match=r"temperatures \[3.0\] are needed"):
        make(losses=other_temperature)
    with pytest.raises(ValueError, match="top_k 64"):
        make(teacher_cache_top_k=16)
    more_layers = {**MLM_LOSSES, "hidden_state": {"weight": 1.0, "layer_map": [[1, 2], [2, 4]]}}
    with pytest.raises(ValueError, match=r"hidden_layers \[2\] are needed"):
        make(losses=more_layers)
    make()  # the matching settings are accepted


def test_the_weights_fingerprint_hashes_shared_memory_once_on_any_number_of_threads_and_sees_every_change(
    monkeypatch,
):
    from hf_distill.cache import teacher_cache

    monkeypatch.setattr(teacher_cache, "HASH_PIECE_BYTES", 256)  # many pieces even in a tiny model
    monkeypatch.setattr(teacher_cache, "HASH_BATCH_BYTES", 4096)
    tied = causal_lm(0)
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()
    value = teacher_cache.weights_fingerprint(tied, threads=1)
    assert teacher_cache.weights_fingerprint(tied, threads=3) == value
    monkeypatch.setattr(teacher_cache, "HASH_BATCH_BYTES", 1 << 30)  # every tensor in one batch: the same value
    assert teacher_cache.weights_fingerprint(tied, threads=2) == value
    monkeypatch.setattr(teacher_cache, "HASH_BATCH_BYTES", 4096)
    untied = copy.deepcopy(tied)
    untied.lm_head.weight = torch.nn.Parameter(untied.transformer.wte.weight.detach().clone())
    assert teacher_cache.weights_fingerprint(untied) != value  # the same numbers, but no longer one tensor
    for name, _ in tied.named_parameters():
        changed = copy.deepcopy(tied)
        with torch.no_grad():
            dict(changed.named_parameters())[name].view(-1)[-1] += 1e-3
        assert teacher_cache.weights_fingerprint(changed) != value, name


def test_a_cache_recorded_with_the_earlier_weights_hash_is_still_recognised(tmp_path):
    from hf_distill.cache import weights_sha256

    teacher, student = mlm_pair()
    data, cache_dir = masked_lm_dataset(24), str(tmp_path / "cache")
    train(tmp_path, "build", teacher, copy.deepcopy(student), data, Stack(), MLM_LOSSES, teacher_cache=cache_dir)
    for name in ("cache.json", "building.json"):  # as a cache written before the fingerprint was
        path = os.path.join(cache_dir, name)
        record = json.load(open(path, encoding="utf-8"))
        assert record["teacher"].pop("weights_hash") == 2
        record["teacher"]["weights_sha256"] = weights_sha256(teacher)
        json.dump(record, open(path, "w", encoding="utf-8"))
    again = train(tmp_path, "again", teacher, copy.deepcopy(student), data, Stack(), MLM_LOSSES,
                  teacher_cache=cache_dir)  # fmt: skip
    assert again.teacher_model is None
    with pytest.raises(ValueError, match="teacher's weights differ"):
        train(tmp_path, "other", bert_masked_lm(seed=5), copy.deepcopy(student), data, Stack(), MLM_LOSSES,
              teacher_cache=cache_dir)  # fmt: skip


def test_random_masking_and_random_augmentation_are_refused_before_training(tmp_path):
    teacher, student = mlm_pair()
    masking = DataCollatorForLanguageModeling(tokenizer(), mlm_probability=0.15)
    with pytest.raises(ValueError, match="masks each batch at random"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config(tmp_path, MLM_LOSSES, teacher_cache=str(tmp_path / "cache")),
            train_dataset=text_dataset(16, labels=False),
            data_collator=masking,
        )

    def jitter(batch):
        noise = torch.randn(len(batch["pixel_values"]), 3, 32, 32) * 0.1
        pixels = torch.as_tensor(batch["pixel_values"]) + noise
        return {"pixel_values": pixels, "label": batch["label"]}

    augmented = image_dataset(16).with_transform(jitter)
    with pytest.raises(ValueError, match="differ from those the teacher saw"):
        DistillationTrainer(
            model=mobilenet_classifier(1),
            teacher_model=vit_classifier(0),
            args=config(tmp_path, CLASSIFIER_LOSSES, teacher_cache=str(tmp_path / "vision")),
            train_dataset=augmented,
        )


def test_inputs_that_change_later_are_caught_at_the_step(tmp_path):
    teacher, student = mlm_pair()
    data, cache_dir = masked_lm_dataset(24), str(tmp_path / "cache")
    trainer = train(tmp_path, "build", teacher, student, data, Stack(), MLM_LOSSES, teacher_cache=cache_dir)
    batch = Stack()([data[i] for i in (20, 21)])
    trainer.teacher_cache.outputs_for([20, 21], batch, torch.device("cpu"))  # as built: accepted
    batch["input_ids"][1, 0] += 1
    with pytest.raises(ValueError, match=r"examples \[21\] differ"):
        trainer.teacher_cache.outputs_for([20, 21], batch, torch.device("cpu"))


def test_losses_a_cache_cannot_replay_are_refused(tmp_path):
    losses = {"attention": {"weight": 1.0, "heads": "relations"}}
    teacher, student = mlm_pair()
    with pytest.raises(ValueError, match=r"\['attention'\] read the teacher in ways a teacher cache cannot replay"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config(tmp_path, losses, teacher_cache=str(tmp_path / "cache")),
            train_dataset=masked_lm_dataset(8),
            data_collator=Stack(),
        )
    with pytest.raises(ValueError, match="no configured loss reads the teacher"):
        DistillationTrainer(
            model=student,
            args=config(tmp_path, {"hard_label": {}}, teacher_cache=str(tmp_path / "cache")),
            train_dataset=masked_lm_dataset(8),
            data_collator=Stack(),
        )


class Interrupting(DistillationTrainer):
    """Stops the teacher after a number of batches, as a crash or Ctrl-C would."""

    teacher_cache_shard_size = 8
    calls = 0
    stop_after: int | None = None

    def teacher_forward(self, inputs, output_hidden_states=False, output_attentions=False):
        type(self).calls += 1
        if self.stop_after is not None and type(self).calls > self.stop_after:
            raise KeyboardInterrupt
        return super().teacher_forward(inputs, output_hidden_states, output_attentions)


def test_interrupted_build_is_not_readable_and_resumes_to_the_same_cache(tmp_path):
    teacher, student = mlm_pair()
    data = masked_lm_dataset(24)

    def build(directory, stop_after=None):
        Interrupting.calls, Interrupting.stop_after = 0, stop_after
        return Interrupting(
            model=copy.deepcopy(student),
            teacher_model=teacher,
            args=config(tmp_path, MLM_LOSSES, teacher_cache=directory, per_device_eval_batch_size=4),
            train_dataset=data,
            data_collator=Stack(),
        )

    partial = str(tmp_path / "partial")
    with pytest.raises(KeyboardInterrupt):
        build(partial, stop_after=3)  # 3 batches of 4: one shard of 8 is whole, 4 examples are lost
    assert not TeacherCache.is_finished(partial)
    assert sorted(os.listdir(partial)) == ["building.json", "shard-000000000-000000008.safetensors"]
    with pytest.raises(FileNotFoundError, match="interrupted"):
        TeacherCache(partial)
    open(os.path.join(partial, "shard-000000008-000000016.safetensors.tmp"), "wb").close()  # a half-written shard

    resumed = build(partial)
    assert Interrupting.calls == 4  # only examples 8..23 are run again, in batches of 4
    assert not any(name.endswith(".tmp") for name in os.listdir(partial))
    whole = build(str(tmp_path / "whole"))
    everything = list(range(len(data)))
    resumed_tensors = resumed.teacher_cache.reader.gather(everything)
    whole_tensors = whole.teacher_cache.reader.gather(everything)
    assert resumed_tensors.keys() == whole_tensors.keys()
    for name, tensor in whole_tensors.items():
        torch.testing.assert_close(resumed_tensors[name], tensor, rtol=0, atol=0, msg=name)
    with open(os.path.join(partial, "cache.json")) as handle:
        record = json.load(handle)
    assert [shard["end"] for shard in record["shards"]] == [8, 16, 24]


def test_batches_carry_the_example_index_only_to_the_cache(tmp_path):
    teacher, student = mlm_pair()
    seen = []
    original_forward = student.forward

    def forward(**inputs):
        seen.append(set(inputs))
        return original_forward(**inputs)

    student.forward = forward
    train(tmp_path, "run", teacher, student, masked_lm_dataset(16), Stack(), MLM_LOSSES,
          teacher_cache=str(tmp_path / "cache"), remove_unused_columns=False)  # fmt: skip
    assert seen and all(INDEX_KEY not in keys for keys in seen)


def test_padding_collator_and_string_columns_work_with_a_cache(tmp_path):
    teacher, student = bert_classifier(0), bert_classifier(1, layers=2)
    data = text_dataset(16).add_column("text", [f"example {i}" for i in range(16)])
    trainer = train(tmp_path, "run", teacher, student, data, DataCollatorWithPadding(tokenizer()), CLASSIFIER_LOSSES,
                    teacher_cache=str(tmp_path / "cache"))  # fmt: skip
    assert trainer.state.global_step == 5


def test_question_answering_cache_matches_online_under_other_padding(tmp_path):
    # Unpadded rows padded per batch: the cache is built in batches of 8 and trained in batches of 4, so each
    # example's start and end logits come back at another padding length than they were stored at.
    data = qa_dataset(24).map(
        lambda row: {key: row[key][: sum(row["attention_mask"])] for key in ("input_ids", "attention_mask")}
    )
    collator = DataCollatorWithPadding(tokenizer())
    teacher, student = bert_qa(0), bert_qa(1, layers=2)
    online = train(tmp_path, "online", teacher, copy.deepcopy(student), data, collator, QA_LOSSES)
    cached = train(tmp_path, "cached", teacher, student, data, collator, QA_LOSSES, teacher_cache=str(tmp_path / "c"))
    assert cached.teacher_model is None
    for online_log, cached_log in zip(train_logs(online), train_logs(cached), strict=True):
        for term in [*QA_LOSSES, "loss"]:
            assert cached_log[term] == pytest.approx(online_log[term], rel=1e-6, abs=1e-6), term


def test_encoder_decoder_cache_checks_labels_and_serves_top_k(tmp_path):
    data, collator = seq2seq_dataset(16), DataCollatorForSeq2Seq(tokenizer(), label_pad_token_id=-100)
    teacher, student = bart(0), bart(1, layers=1, width=16)
    losses = {"soft_target": {"weight": 1.0, "temperature": 2.0}}
    online = train(tmp_path, "online", teacher, copy.deepcopy(student), data, collator, losses)
    top_k = train(tmp_path, "top_k", teacher, student, data, collator, losses, teacher_cache=str(tmp_path / "k"),
                  teacher_cache_top_k=VOCAB)  # fmt: skip
    # Every token kept through the top-k arithmetic: the same divergence, float32 rounding apart.
    assert top_k.state.log_history[0]["soft_target"] == pytest.approx(
        online.state.log_history[0]["soft_target"], rel=1e-4
    )
    # The decoder reads the labels, so a changed label (same positions counted) is caught like a changed input.
    batch = with_decoder_inputs(student, collator([data[i] for i in (3, 4)]))
    top_k.teacher_cache.outputs_for([3, 4], batch, torch.device("cpu"))
    batch["labels"][0, 0] += 1
    with pytest.raises(ValueError, match=r"examples \[3\] differ"):
        top_k.teacher_cache.outputs_for([3, 4], batch, torch.device("cpu"))


def test_encoder_decoder_student_trains_from_the_cache_alone(tmp_path):
    data, collator = seq2seq_dataset(16), DataCollatorForSeq2Seq(tokenizer(), label_pad_token_id=-100)
    cache_dir = str(tmp_path / "cache")
    first = train(tmp_path, "first", bart(0), bart(1, layers=1, width=16), data, collator, SEQ2SEQ_LOSSES,
                  teacher_cache=cache_dir)  # fmt: skip
    second = DistillationTrainer(
        model=bart(1, layers=1, width=16),
        args=config(tmp_path / "second", SEQ2SEQ_LOSSES, max_steps=5, teacher_cache=cache_dir),
        train_dataset=data,
        data_collator=collator,
    )
    second.train()
    # The same student from the same start on the same cache: the same run, without a teacher.
    for before, after in zip(train_logs(first), train_logs(second), strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-6)


def test_a_collator_that_drops_the_example_index_is_refused_before_training(tmp_path):
    """The cache reads each example's outputs by its index: a collator that keeps only named keys would leave every
    step without the teacher's terms. Refused when the trainer is built; a batch without it in training is an error."""
    losses = {"soft_target": {"weight": 1.0}, "hard_label": {"weight": 1.0}}
    with pytest.raises(ValueError, match="drops the 'hf_distill_example_index' key"):
        DistillationTrainer(
            model=causal_lm(1), teacher_model=causal_lm(0), train_dataset=prompt_completion_dataset(8),
            args=config(tmp_path, losses, teacher_cache=str(tmp_path / "cache")), data_collator=pad_right,
        )  # fmt: skip
    source = CachedTeacher("teacher", None, None, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="must pass on hf_distill.cache.INDEX_KEY"):
        source.outputs({"input_ids": torch.zeros(1, 2, dtype=torch.long)}, None, training=True)
    assert source.outputs({}, None, training=False) is None  # evaluation data outside the cache

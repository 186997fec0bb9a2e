"""Encoder-decoder students and teachers (BART, T5): soft targets per decoder token, hidden states per stack."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers import TARGET_LEN, VOCAB, bart, bert_classifier, bert_masked_lm, config, seq2seq_dataset, t5, text_dataset
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerFast,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from hf_distill import DistillationSeq2SeqConfig, DistillationSeq2SeqTrainer, DistillationTrainer
from hf_distill.losses import SoftTargetLoss

SEQ2SEQ_LOSSES = {
    "soft_target": {"weight": 1.0, "temperature": 2.0},
    "hard_label": {"weight": 0.5},
    "decoder_hidden": {"type": "hidden_state", "weight": 1.0, "stack": "decoder", "layer_map": [[1, 2]]},
    "encoder_hidden": {"type": "hidden_state", "weight": 1.0, "stack": "encoder", "distance": "cosine"},
}


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer of the tiny vocabulary (id i is the word "i"), for collators that pad."""
    vocab = {str(index): index for index in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="3")), pad_token="1")


def shifted(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    decoder_inputs = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], 1)
    return decoder_inputs.masked_fill(decoder_inputs == -100, pad)


def test_terms_follow_the_per_decoder_token_formulas_and_the_teacher_sees_no_labels(tmp_path):
    student, teacher = bart(seed=2, layers=1, width=16), bart(seed=1)
    seen = []
    teacher.register_forward_pre_hook(lambda _module, _args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    test = seq2seq_dataset(12, seed=3)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, SEQ2SEQ_LOSSES, per_device_eval_batch_size=12),
        train_dataset=seq2seq_dataset(),
    )
    metrics = trainer.evaluate(test)  # one batch of 12: every term is the mean over its items

    batch = {key: torch.tensor(test[key]) for key in ("input_ids", "attention_mask", "labels")}
    labels, source_mask = batch["labels"], batch["attention_mask"].bool()
    decoder_inputs = shifted(labels, start=student.config.decoder_start_token_id, pad=student.config.pad_token_id)
    assert "labels" not in seen[-1] and seen[-1]["use_cache"] is False
    assert torch.equal(seen[-1]["decoder_input_ids"], decoder_inputs)
    with torch.no_grad():
        run = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        s, t = student(**run, decoder_input_ids=decoder_inputs), teacher(**run, decoder_input_ids=decoder_inputs)
        own_loss = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    labeled = labels.ne(-100)
    teacher_probs = F.softmax(t.logits.double() / 2.0, -1)
    kl = (teacher_probs * (teacher_probs.log() - F.log_softmax(s.logits.double() / 2.0, -1))).sum(-1) * 4.0
    # The library sums this KL of near-uniform distributions (~9e-3) in float32, the test in float64: they agree to
    # 2.4e-5 relative on some processors (AMD EPYC).
    assert metrics["eval_soft_target"] == pytest.approx(kl[labeled].mean().item(), rel=1e-4)
    assert metrics["eval_hard_label"] == pytest.approx(own_loss.item(), rel=1e-5)
    projector = trainer.distillation_losses["decoder_hidden"].projectors[0]
    with torch.no_grad():
        decoder_mse = (projector(s.decoder_hidden_states[1]) - t.decoder_hidden_states[2]).pow(2).mean(-1)
        # The default map of a 1-layer student on a 2-layer teacher: layer 1 <-> 2; cosine needs a projection too.
        encoder = trainer.distillation_losses["encoder_hidden"]
        assert encoder.pairs == [(1, 2)]
        cosine = 1 - F.cosine_similarity(
            encoder.projectors[0](s.encoder_hidden_states[1]), t.encoder_hidden_states[2], -1
        )
    assert metrics["eval_decoder_hidden"] == pytest.approx(decoder_mse[labeled].mean().item(), rel=1e-5)
    assert metrics["eval_encoder_hidden"] == pytest.approx(cosine[source_mask].mean().item(), rel=1e-5)
    weighted = sum(spec["weight"] * metrics[f"eval_{term}"] for term, spec in SEQ2SEQ_LOSSES.items())
    assert metrics["eval_loss"] == pytest.approx(weighted, rel=1e-5)

    # Decoder inputs from DataCollatorForSeq2Seq instead of the trainer: the same terms.
    collator = DataCollatorForSeq2Seq(tokenizer=word_tokenizer(), model=student, label_pad_token_id=-100)
    trainer.data_collator = collator
    again = trainer.evaluate(seq2seq_dataset(12, seed=3, padded=False))
    assert "decoder_input_ids" in collator([test[0], test[1]])
    for term in SEQ2SEQ_LOSSES:
        assert again[f"eval_{term}"] == pytest.approx(metrics[f"eval_{term}"], rel=1e-5)


def test_t5_gradient_accumulation_matches_one_big_batch_and_the_student_reloads(tmp_path):
    dataset = seq2seq_dataset(16)
    labeled_per_micro_batch = (torch.tensor(dataset["labels"]) != -100).view(4, 4, -1).sum((1, 2))
    assert len(set(labeled_per_micro_batch.tolist())) > 1  # uneven: only global normalisation makes runs agree
    runs = {}
    for name, batch, accumulation in (("big", 8, 1), ("accumulated", 4, 2)):
        trainer = DistillationTrainer(
            model=t5(seed=2, layers=1, width=16),
            teacher_model=t5(seed=1),
            args=config(
                tmp_path / name,
                SEQ2SEQ_LOSSES,
                max_steps=2,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
            ),  # fmt: skip
            train_dataset=dataset,
        )
        trainer.train()
        runs[name] = trainer
    big, accumulated = (runs[name].model.state_dict() for name in ("big", "accumulated"))
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], atol=1e-6, rtol=1e-5, msg=key)
    logs = [entry for entry in runs["big"].state.log_history if "loss" in entry]
    assert logs and all(entry[term] > 0 for entry in logs for term in SEQ2SEQ_LOSSES)

    trainer = runs["big"]
    trainer.save_model(str(tmp_path / "student"))
    assert not any(name.startswith("distillation") for name in os.listdir(tmp_path / "student"))
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "student"))
    batch = {key: torch.tensor(dataset[:4][key]) for key in ("input_ids", "attention_mask", "labels")}
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trainer.model(**batch).logits)
    predictions = trainer.predict(seq2seq_dataset(8, seed=5))
    assert predictions.predictions[0].shape[:2] == (8, TARGET_LEN)  # logits, without the hidden states asked for


def test_whisper_decoder_inputs_follow_the_model_own_rule(tmp_path):
    """Whisper has no prepare_decoder_input_ids_from_labels: the trainer shifts the labels itself, as Whisper does."""

    def whisper(seed: int, layers: int, width: int) -> WhisperForConditionalGeneration:
        torch.manual_seed(seed)
        settings = dict(vocab_size=VOCAB, num_mel_bins=8, d_model=width, encoder_layers=layers, decoder_layers=layers,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_source_positions=16, max_target_positions=16, pad_token_id=1, decoder_start_token_id=2,
                        eos_token_id=1, bos_token_id=2, dropout=0.0)  # fmt: skip
        return WhisperForConditionalGeneration(WhisperConfig(**settings))

    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor(seq2seq_dataset(8)["labels"])
    data = Dataset.from_dict(
        {"input_features": torch.randn(8, 8, 32, generator=generator).tolist(), "labels": labels.tolist()}
    )
    student = whisper(seed=2, layers=1, width=16)
    losses = {key: SEQ2SEQ_LOSSES[key] for key in ("soft_target", "hard_label", "decoder_hidden", "encoder_hidden")}
    trainer = DistillationTrainer(
        model=student,
        teacher_model=whisper(seed=1, layers=2, width=32),
        args=config(tmp_path, losses, per_device_eval_batch_size=8),
        train_dataset=data,
    )
    metrics = trainer.evaluate(data)
    with torch.no_grad():
        own_loss = student(input_features=torch.tensor(data["input_features"]), labels=labels).loss
    assert metrics["eval_hard_label"] == pytest.approx(own_loss.item(), rel=1e-5)
    assert all(metrics[f"eval_{term}"] > 0 for term in losses)
    # A frame mask (the feature extractor's return_attention_mask) is twice the encoder's length: every encoder
    # position still counts, as without it.
    frames = (torch.arange(32) < torch.randint(16, 33, (8, 1), generator=generator)).long()
    masked = trainer.evaluate(data.add_column("attention_mask", frames.tolist()))
    for key in ("eval_loss", *(f"eval_{term}" for term in losses)):
        assert masked[key] == pytest.approx(metrics[key], rel=1e-6), key
    trainer.train()


def test_relation_on_a_stack_with_a_teacher_loaded_from_a_folder(tmp_path):
    # T5 is in no task mapping but the seq2seq one, so only AutoModelForSeq2SeqLM can load it.
    t5(seed=1).save_pretrained(tmp_path / "teacher")
    losses = {"relation": {"weight": 1.0, "stack": "encoder"}, "hard_label": {"weight": 1.0}}
    trainer = DistillationTrainer(
        model=t5(seed=2, layers=1, width=16),
        teacher_model=str(tmp_path / "teacher"),  # loaded with the student's head
        args=config(tmp_path / "run", losses),
        train_dataset=seq2seq_dataset(),
    )
    assert type(trainer.teacher_model).__name__ == "T5ForConditionalGeneration"
    trainer.train()
    assert all(entry["relation"] > 0 for entry in trainer.state.log_history if "loss" in entry)


@pytest.mark.parametrize(
    "losses, make_teacher, match",
    [
        ({"hidden_state": {}}, lambda: bart(1), "set 'stack': 'encoder' or 'decoder'"),
        ({"relation": {}}, lambda: bart(1), "set 'stack'"),
        ({"soft_target": {}}, lambda: bert_masked_lm(seed=1), "two encoder-decoder models"),
        ({"hidden_state": {"stack": "decoder"}}, lambda: bert_masked_lm(seed=1), "do not pair up"),
        ({"attention": {"heads": "relations"}}, lambda: bart(1), "use hidden_state with 'stack'"),
        ({"soft_target": {}}, lambda: bart(1, decoder_start_token_id=0), "same decoder_start_token_id"),
        ({"hidden_state": {"stack": "middle"}}, lambda: bart(1), "stack must be one of"),
    ],
)
def test_encoder_decoder_misuse_is_refused_before_training(tmp_path, losses, make_teacher, match):
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(
            model=bart(seed=2, layers=1, width=16),
            teacher_model=make_teacher(),
            args=config(tmp_path, losses),
            train_dataset=seq2seq_dataset(),
        )


def test_other_misuse_is_refused(tmp_path):
    with pytest.raises(ValueError, match="drop it for a BertForMaskedLM student"):
        DistillationTrainer(
            model=bert_masked_lm(seed=2, layers=2),
            teacher_model=bert_masked_lm(seed=1),
            args=config(tmp_path, {"hidden_state": {"stack": "encoder"}}),
            train_dataset=text_dataset(),
        )
    no_start = t5(seed=2)
    no_start.config.decoder_start_token_id = no_start.generation_config.decoder_start_token_id = None
    with pytest.raises(ValueError, match="no decoder_start_token_id"):
        DistillationTrainer(
            model=no_start, teacher_model=t5(seed=1), args=config(tmp_path, {"soft_target": {}}), train_dataset=[]
        )
    # Per-pixel class maps put the classes on axis 1: a soft target along the last axis would mean nothing.
    settings = dict(num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[3], strides=[2],
                    num_attention_heads=[1], mlp_ratios=[1], decoder_hidden_size=8, num_labels=3)  # fmt: skip
    segmenter = SegformerForSemanticSegmentation(SegformerConfig(**settings))
    with pytest.raises(ValueError, match="soft_target does not support a SegformerForSemanticSegmentation"):
        SoftTargetLoss().setup(segmenter, SegformerForSemanticSegmentation(SegformerConfig(**settings)))
    # A classifier of some other kind whose logits are not [batch, classes] is stopped at its first step.
    loss = SoftTargetLoss()
    loss.setup(bert_classifier(seed=2), bert_classifier(seed=1))
    logits = SimpleNamespace(logits=torch.zeros(2, 3, 2))
    with pytest.raises(
        ValueError, match=r"expects a classifier's \[batch, classes\] logits, but the student returned"
    ):
        loss(logits, logits, {})


def test_generation_in_evaluation_keeps_the_distillation_terms(tmp_path):
    student, test = bart(seed=2, layers=1, width=16), seq2seq_dataset(6, seed=3)
    seen = {}

    def compute_metrics(prediction):
        if isinstance(prediction.predictions, tuple):  # teacher-forced logits: predict_with_generate is off
            return {}
        seen["predictions"], seen["labels"] = prediction.predictions, prediction.label_ids
        return {"exact": float((prediction.predictions[:, 1:4] == prediction.label_ids[:, :3]).all(1).mean())}

    args = config(tmp_path, SEQ2SEQ_LOSSES, per_device_eval_batch_size=6, predict_with_generate=True,
                  generation_max_length=6, config_class=DistillationSeq2SeqConfig)  # fmt: skip
    trainer = DistillationSeq2SeqTrainer(
        model=student,
        teacher_model=bart(seed=1),
        args=args,
        train_dataset=seq2seq_dataset(),
        compute_metrics=compute_metrics,
    )
    generated = trainer.evaluate(test)
    trainer.args.predict_with_generate = False
    forced = trainer.evaluate(test)
    for term in ("loss", *SEQ2SEQ_LOSSES):
        assert generated[f"eval_{term}"] == pytest.approx(forced[f"eval_{term}"], rel=1e-6)
    assert "eval_exact" in generated
    trainer.args.predict_with_generate = True
    trainer.evaluate(test)
    with torch.no_grad():
        batch = {key: torch.tensor(test[key]) for key in ("input_ids", "attention_mask")}
        tokens = student.generate(**batch, max_length=6)
    assert torch.equal(torch.as_tensor(seen["predictions"])[:, : tokens.shape[1]], tokens)
    assert torch.equal(torch.as_tensor(seen["labels"]), torch.tensor(test["labels"]))
    trainer.train()  # training is DistillationTrainer's
    assert all(entry["soft_target"] > 0 for entry in trainer.state.log_history if "loss" in entry)
    with pytest.raises(TypeError, match="DistillationSeq2SeqConfig"):
        DistillationSeq2SeqTrainer(model=student, teacher_model=bart(seed=1), args=config(tmp_path, SEQ2SEQ_LOSSES))

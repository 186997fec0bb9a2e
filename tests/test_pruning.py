"""Width pruning: keeping every unit is the teacher, the kept units are the most important, the student reloads."""

import pytest
import torch
from helpers import VOCAB, bert_classifier, bert_masked_lm, vit_classifier
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from hf_distill.pruning import prune_width, width_importance


def text_batch(seed: int = 0, size: int = 6, length: int = 10) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[1, 6:] = 0  # padding, which must not count
    return {"input_ids": torch.randint(0, VOCAB, (size, length), generator=generator), "attention_mask": mask}


@pytest.mark.parametrize("build", [bert_classifier, bert_masked_lm])
def test_keeping_every_unit_reproduces_the_teacher_exactly(build):
    teacher = build(seed=3, layers=2, width=16, heads=4).eval()
    batch = text_batch()
    kept = prune_width(teacher, width_importance(teacher, batch)).eval()
    with torch.no_grad():
        assert torch.equal(kept(**batch).logits, teacher(**batch).logits)


def test_keeping_every_unit_of_a_vit_reproduces_it_exactly():
    teacher = vit_classifier(seed=1).eval()
    pixels = {"pixel_values": torch.randn(3, 3, 32, 32)}
    kept = prune_width(teacher, width_importance(teacher, pixels)).eval()
    with torch.no_grad():
        assert torch.equal(kept(**pixels).logits, teacher(**pixels).logits)


def constructed_teacher():
    """Heads, neurons and channels of known importance: layer 0's heads scaled 0.1 / 3 / 0.5 / 2 through their
    value projection (its output is the head's output, times attention weights that do not change), every layer's
    neurons 0, 5, 9 and 30 dead, and channels 2, 7 and 11 zeroed by every layer norm."""
    teacher = bert_classifier(seed=4, layers=2, width=16, heads=4).eval()
    with torch.no_grad():
        value = teacher.bert.encoder.layer[0].attention.self.value
        value.bias.zero_()
        for head, factor in enumerate([0.1, 3.0, 0.5, 2.0]):
            value.weight[head * 4 : (head + 1) * 4] *= factor
        for layer in teacher.bert.encoder.layer:
            for neuron in (0, 5, 9, 30):
                layer.intermediate.dense.weight[neuron] = 0.0
                layer.intermediate.dense.bias[neuron] = -1e4  # GELU(-1e4) is exactly 0
        for module in teacher.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[[2, 7, 11]] = 0.0
                module.bias[[2, 7, 11]] = 0.0
    return teacher


def test_the_kept_units_are_the_most_important():
    teacher = constructed_teacher()
    importance = width_importance(teacher, text_batch())
    assert importance.heads[0].argsort().tolist() == [0, 2, 3, 1]
    assert set(torch.nonzero(importance.neurons[1] == 0).flatten().tolist()) == {0, 5, 9, 30}
    assert set(torch.nonzero(importance.channels == 0).flatten().tolist()) == {2, 7, 11}

    student = prune_width(teacher, importance, hidden_size=8, num_attention_heads=2, intermediate_size=28)
    layer0 = student.bert.encoder.layer[0].attention.self.value.weight
    original = teacher.bert.encoder.layer[0].attention.self.value.weight
    channels = torch.sort(torch.topk(importance.channels, 8).indices).values
    assert not set(channels.tolist()) & {2, 7, 11}
    heads = torch.cat([torch.arange(4, 8), torch.arange(12, 16)])  # heads 1 and 3
    assert torch.equal(layer0, original[heads][:, channels])
    kept_neurons = [n for n in range(32) if n not in (0, 5, 9, 30)]
    ffn = student.bert.encoder.layer[1].intermediate.dense.weight
    assert torch.equal(ffn, teacher.bert.encoder.layer[1].intermediate.dense.weight[kept_neurons][:, channels])
    assert torch.equal(student.classifier.weight, teacher.classifier.weight[:, channels])
    assert torch.equal(
        student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight[:, channels]
    )


def test_dropping_dead_neurons_changes_nothing():
    """Feed-forward neurons that never fire add nothing: without them the outputs are the same. (Heads cannot be
    dropped alone: BERT's hidden size is its head count times the head size, so fewer heads means fewer channels.)"""
    teacher = constructed_teacher()
    batch = text_batch()
    student = prune_width(teacher, width_importance(teacher, batch), intermediate_size=28).eval()
    assert student.bert.encoder.layer[1].intermediate.dense.out_features == 28
    with torch.no_grad():
        assert torch.allclose(student(**batch).logits, teacher(**batch).logits, atol=1e-6)


def test_padding_does_not_count_toward_importance():
    teacher = bert_classifier(seed=5, layers=2, width=16, heads=4).eval()
    batch = text_batch()
    other = {key: value.clone() for key, value in batch.items()}
    other["input_ids"][1, 6:] = (other["input_ids"][1, 6:] + 7) % VOCAB  # other tokens under the padding
    first, second = width_importance(teacher, batch), width_importance(teacher, other)
    assert torch.allclose(first.channels, second.channels, atol=1e-6)
    assert torch.allclose(first.neurons[1], second.neurons[1], atol=1e-6)


def test_the_pruned_student_reloads_with_its_real_widths(tmp_path):
    teacher = bert_masked_lm(seed=6, layers=2, width=16, heads=4).eval()
    batch = text_batch()
    student = prune_width(teacher, width_importance(teacher, batch), hidden_size=8, intermediate_size=12).eval()
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert (reloaded.config.hidden_size, reloaded.config.num_attention_heads, reloaded.config.intermediate_size) == (
        8,
        2,
        12,
    )
    assert (
        reloaded.cls.predictions.decoder.weight.data_ptr()
        == reloaded.bert.embeddings.word_embeddings.weight.data_ptr()
    )
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, student(**batch).logits)
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in teacher.parameters())


@pytest.mark.parametrize(
    "widths, message",
    [
        ({"hidden_size": 12, "num_attention_heads": 2}, "pass num_attention_heads 3"),
        ({"hidden_size": 10}, "a multiple of 4"),
        ({"intermediate_size": 64}, "intermediate_size must be an integer in 1..32"),
    ],
)
def test_widths_that_cannot_be_pruned_are_refused(widths, message):
    teacher = bert_classifier(seed=0, layers=2, width=16, heads=4)
    with pytest.raises(ValueError, match=message):
        prune_width(teacher, width_importance(teacher, text_batch()), **widths)


def test_a_model_without_bert_widths_is_refused():
    from helpers import mobilenet_classifier

    with pytest.raises(ValueError, match="student_config"):
        width_importance(mobilenet_classifier(), {"pixel_values": torch.randn(1, 3, 32, 32)})


def test_classifier_reloads_with_plain_auto_class(tmp_path):
    teacher = bert_classifier(seed=7, layers=2, width=16, heads=4).eval()
    student = prune_width(teacher, width_importance(teacher, text_batch()), hidden_size=12)
    student.save_pretrained(tmp_path)
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path).config.hidden_size == 12


def test_hidden_state_and_attention_terms_follow_the_pruned_widths(tmp_path):
    from helpers import config, text_dataset

    from hf_distill import DistillationTrainer

    teacher = bert_classifier(seed=8, layers=2, width=16, heads=4).eval()
    student = prune_width(teacher, width_importance(teacher, text_batch()), hidden_size=8)
    losses = {
        "soft_target": {"weight": 1.0},
        "hidden_state": {"weight": 1.0},  # widths 8 and 16: a projector per layer pair
        "attention": {"weight": 1.0, "heads": "relations", "num_relation_heads": 2},  # 2 heads and 4: relations
    }
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, losses), train_dataset=text_dataset()
    )
    trainer.train()
    hidden_state = trainer.distillation_losses["hidden_state"]
    assert [(p.in_features, p.out_features) for p in hidden_state.projectors] == [(8, 16)] * len(hidden_state.pairs)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor(entry["attention"])) and entry["attention"] > 0 for entry in logged)


def test_importance_over_several_batches_is_the_mean_over_all_their_tokens():
    teacher = bert_classifier(seed=9, layers=2, width=16, heads=4).eval()
    batch = text_batch(size=6)
    halves = [{key: value[:2] for key, value in batch.items()}, {key: value[2:] for key, value in batch.items()}]
    whole, parts = width_importance(teacher, batch), width_importance(teacher, halves)
    assert torch.allclose(whole.channels, parts.channels, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole.heads, parts.heads, strict=True))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole.neurons, parts.neurons, strict=True))

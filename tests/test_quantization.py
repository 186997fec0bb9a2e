"""Int8 students: the fake quantization matches torchao's int8 format, trains, and exports to plain from_pretrained."""

import copy
import os

import pytest
import torch
from helpers import VOCAB, bert_classifier, config, text_dataset
from torch import nn
from transformers import AutoModelForSequenceClassification

from hf_distill import DistillationTrainer
from hf_distill.quantization import (
    Int8TrainingEmbedding,
    Int8TrainingLinear,
    fake_quantize_int8,
    int8_module_names,
    is_int8_training,
    prepare_int8_training,
    to_int8,
    undo_int8_training,
)

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8Tensor  # noqa: E402
from torchao.quantization.granularity import PerRow  # noqa: E402


def test_fake_quantization_is_torchaos_int8_grid_with_an_identity_gradient():
    torch.manual_seed(0)
    values = torch.randn(6, 40) * torch.logspace(-3, 2, 6)[:, None]  # rows of very different ranges
    values[2, 5] = 0.0
    values[3] = 0.0  # an all-zero row: scale falls back to eps, the row stays zero
    expected = Int8Tensor.from_hp(values, granularity=PerRow()).dequantize()
    quantized = fake_quantize_int8(values)
    assert torch.equal(quantized, expected)
    assert not torch.equal(quantized, values)  # 40 values per row cannot all sit on the int8 grid
    assert torch.equal(quantized[3], torch.zeros(40))

    leaf = values.clone().requires_grad_(True)
    weights = torch.randn(6, 40)
    (fake_quantize_int8(leaf) * weights).sum().backward()
    assert torch.equal(leaf.grad, weights)


def test_prepared_model_keeps_its_weights_and_names_and_turns_back():
    model = bert_classifier()
    before = {name: parameter for name, parameter in model.named_parameters()}
    keys = list(model.state_dict())
    linears, embedding = int8_module_names(model)
    assert embedding == "bert.embeddings.word_embeddings"
    assert len(linears) == 4 * 6 + 2  # q, k, v, attention output, intermediate, output per layer; pooler, classifier

    prepare_int8_training(model)
    modules = dict(model.named_modules())
    assert all(type(modules[name]) is Int8TrainingLinear for name in linears)
    assert type(modules[embedding]) is Int8TrainingEmbedding
    assert type(modules["bert.embeddings.position_embeddings"]) is nn.Embedding  # stays floating point
    assert is_int8_training(model)
    assert list(model.state_dict()) == keys
    assert all(parameter is before[name] for name, parameter in model.named_parameters())

    undo_int8_training(model)
    assert not is_int8_training(model)
    assert all(type(modules[name]) is nn.Linear for name in linears)
    assert type(modules[embedding]) is nn.Embedding


def test_prepared_forward_equals_hand_quantized_layers():
    model = bert_classifier().eval()
    ids = torch.randint(0, VOCAB, (3, 10))
    linear = model.bert.encoder.layer[0].intermediate.dense
    inputs = {}

    def record(module, args, output):
        inputs.setdefault("x", args[0].detach())

    linear.register_forward_hook(record)
    prepare_int8_training(model)
    with torch.no_grad():
        model(input_ids=ids)
        output = linear(inputs["x"])
        rows = model.bert.embeddings.word_embeddings(ids)
    by_hand = fake_quantize_int8(inputs["x"]) @ fake_quantize_int8(linear.weight).T + linear.bias
    assert torch.allclose(output, by_hand, atol=1e-6)
    table = fake_quantize_int8(model.bert.embeddings.word_embeddings.weight)
    assert torch.equal(rows, table[ids])


def test_trained_student_exports_to_int8_that_plain_from_pretrained_reloads(tmp_path):
    teacher = bert_classifier(seed=1, width=32, heads=4).eval()
    student = prepare_int8_training(copy.deepcopy(teacher))
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path / "run", {"soft_target": {"weight": 1.0, "temperature": 2.0}}, learning_rate=1e-3),
        train_dataset=text_dataset(),
    )
    start = copy.deepcopy(student.state_dict())
    trainer.train()
    changed = [name for name, value in student.state_dict().items() if not torch.equal(value, start[name])]
    assert any("query.weight" in name for name in changed) and any("word_embeddings" in name for name in changed)

    student.eval()
    ids = torch.randint(0, VOCAB, (4, 12))
    with torch.no_grad():
        fake = student(input_ids=ids).logits
    int8 = to_int8(student)
    int8.save_pretrained(tmp_path / "int8")
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "int8")).eval()
    with torch.no_grad():
        exported, plain = int8(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert torch.equal(exported, plain)
    # The int8 kernel accumulates in int32 where the fake-quantized model sums floats: close, not equal.
    assert (exported - fake).abs().max() < 2e-2 * fake.abs().max()
    weight = reloaded.bert.encoder.layer[0].attention.self.query.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8
    assert type(reloaded.bert.embeddings.word_embeddings.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(reloaded.bert.encoder.layer[0].attention.self.query.bias) is nn.Parameter
    assert reloaded.config.quantization_config.quant_method == "torchao"
    assert sorted(os.listdir(tmp_path / "int8")) == ["config.json", "model.safetensors"]


def test_post_training_quantization_of_an_untouched_model(tmp_path):
    teacher = bert_classifier(seed=2, width=32).eval()
    ids = torch.randint(0, VOCAB, (4, 12))
    int8 = to_int8(teacher)
    int8.save_pretrained(tmp_path / "ptq")
    with torch.no_grad():
        fake = prepare_int8_training(copy.deepcopy(teacher))(input_ids=ids).logits
        exported = int8(input_ids=ids).logits
    assert not is_int8_training(teacher)
    assert (exported - fake).abs().max() < 2e-2 * fake.abs().max()
    teacher.save_pretrained(tmp_path / "fp32")
    # A tiny model's file is a good part torchao's metadata; at MiniLM's size it is ~4x smaller (docs/results.md).
    sizes = [os.path.getsize(tmp_path / folder / "model.safetensors") for folder in ("ptq", "fp32")]
    assert sizes[0] < 0.6 * sizes[1]


def test_weight_bytes_of_an_int8_model_are_those_its_safetensors_file_holds(tmp_path):
    import json
    import struct

    from hf_distill.pipeline.evaluation import weights_size_bytes

    int8 = to_int8(bert_classifier(seed=3, width=32).eval())
    int8.save_pretrained(tmp_path)
    with open(tmp_path / "model.safetensors", "rb") as handle:
        header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
    stored = sum(
        end - start for key, entry in header.items() if key != "__metadata__" for start, end in [entry["data_offsets"]]
    )
    assert weights_size_bytes(int8) == stored


def test_a_model_that_cannot_train_for_int8_is_refused_and_left_as_it_was():
    bert = bert_classifier()
    bert.bert.embeddings.word_embeddings = nn.EmbeddingBag(VOCAB, 16)  # not an nn.Embedding
    bert.get_input_embeddings = lambda: bert.bert.embeddings.word_embeddings
    with pytest.raises(ValueError, match="embeddings=False"):
        prepare_int8_training(bert)
    assert not is_int8_training(bert)  # no linear layer was changed before the refusal

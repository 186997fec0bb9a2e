"""Each loss family through `DistillationTrainer`, pinned to a computation by hand from the models' own outputs.

Every test builds a trainer with one configured term, then checks that term two ways: `evaluate()` on an
evaluation set of one batch (`eval_<term>`, the term's mean over the set's items) and `compute_loss` on the same
batch in training mode (the weighted term). The expected value is written here from the formula in
docs/losses.md, in float64, from outputs the test asks of the models itself; it shares no code with the library.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    VOCAB,
    bert_classifier,
    bert_masked_lm,
    bert_qa,
    config,
    image_dataset,
    masked_lm_dataset,
    mobilenet_classifier,
    qa_dataset,
    text_dataset,
    vit_classifier,
)

from hf_distill import DistillationTrainer
from hf_distill.losses.feature_map import teacher_grid

WEIGHT = 0.7  # not 1, so a term logged unweighted (or weighted twice) cannot pass


def as_batch(dataset) -> dict[str, torch.Tensor]:
    """The whole data set as one batch, as the default collator makes it (`label` becomes `labels`)."""
    columns = dataset.with_format("torch")[:]
    return {"labels" if column == "label" else column: values for column, values in columns.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in batch.items() if key in ("input_ids", "attention_mask", "pixel_values")}


def check_term(
    trainer: DistillationTrainer,
    term: str,
    dataset,
    expected: float,
    expected_in_training: float | None = None,
    rel: float = 1e-5,
) -> None:
    """`eval_<term>` on `dataset` equals `expected`, and the loss of `dataset` as one training batch equals
    `expected_in_training` (`expected` unless the student behaves otherwise in training: batch norm) times WEIGHT."""
    assert len(dataset) <= trainer.args.per_device_eval_batch_size  # one evaluation batch
    metrics = trainer.evaluate(dataset)
    assert metrics[f"eval_{term}"] == pytest.approx(expected, rel=rel)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, as_batch(dataset))
    in_training = expected if expected_in_training is None else expected_in_training
    assert loss.item() == pytest.approx(WEIGHT * in_training, rel=rel)


def kl_rows(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ prediction) of probability rows over the last axis; 0 · log 0 = 0."""
    return (torch.xlogy(target, target) - torch.xlogy(target, prediction)).sum(-1)


def trainer_for(tmp_path, student, teacher, losses, dataset, **overrides):
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, losses, **overrides), train_dataset=dataset
    )


# ---- attention maps (TinyBERT) -------------------------------------------------------------------------------

LAYER_MAP = [[1, 3], [2, 1]]  # neither the default spread nor in order: an off-by-one block index shows


def sharpened(model):
    """`model` with its queries scaled up: a random tiny model attends almost uniformly, and divergences between
    near-uniform maps are too small to tell a right formula from a wrong one in float32."""
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(8.0)
    return model


def attention_by_hand(student_maps, teacher_maps, heads, distance, mask):
    total = 0.0
    for student_block, teacher_block in LAYER_MAP:
        student_map = student_maps[student_block - 1].double()
        teacher_map = teacher_maps[teacher_block - 1].double()
        if heads == "average":
            student_map, teacher_map = student_map.mean(1), teacher_map.mean(1)  # [batch, queries, keys]
        if distance == "kl":
            per_query = kl_rows(teacher_map, student_map)
        else:
            per_query = (student_map - teacher_map).pow(2).mean(-1)
        if heads == "match":
            per_query = per_query.mean(1)  # the mean over heads of each head's distance
        total = total + (per_query * mask).sum()
    return (total / len(LAYER_MAP) / mask.sum()).item()


@pytest.mark.parametrize("heads", ["match", "average"])
@pytest.mark.parametrize("distance", ["kl", "mse"])
def test_attention_term_equals_its_formula(tmp_path, heads, distance):
    teacher = sharpened(bert_classifier(seed=1, heads=2 if heads == "match" else 4, attn_implementation="eager"))
    student = sharpened(bert_classifier(seed=2, layers=2, width=8, heads=2, attn_implementation="eager"))
    losses = {"attention": {"weight": WEIGHT, "heads": heads, "distance": distance, "layer_map": LAYER_MAP}}
    dataset = text_dataset(8, seed=3)
    trainer = trainer_for(tmp_path, student, teacher, losses, dataset)
    batch = as_batch(dataset)
    with torch.no_grad():
        student_maps = student.eval()(**model_inputs(batch), output_attentions=True).attentions
        teacher_maps = teacher.eval()(**model_inputs(batch), output_attentions=True).attentions
    expected = attention_by_hand(student_maps, teacher_maps, heads, distance, batch["attention_mask"].double())
    assert expected > 0
    # KL between near maps (2.6e-4 here) sums float32 terms in an order that depends on the CPU's vector width: some
    # x86_64 machines give the float64 value to within 1e-5, another was 2.5e-5 off. A wrong formula is off by more.
    check_term(trainer, "attention", dataset, expected, rel=1e-4 if distance == "kl" else 1e-5)


# ---- MiniLMv2 self-attention relations -----------------------------------------------------------------------


def record_projections(model) -> dict[tuple[str, int], torch.Tensor]:
    """Forward hooks that keep each layer's query, key and value projection outputs, by (kind, block from 1)."""
    recorded = {}
    for block, layer in enumerate(model.bert.encoder.layer, start=1):
        for kind in ("query", "key", "value"):
            module = getattr(layer.attention.self, kind)
            module.register_forward_hook(
                lambda _module, _inputs, output, key=(kind, block): recorded.__setitem__(key, output.detach())
            )
    return recorded


def relation_probabilities(vectors: torch.Tensor, heads: int, key_mask: torch.Tensor) -> torch.Tensor:
    batch, length, width = vectors.shape
    split = vectors.double().reshape(batch, length, heads, width // heads).permute(0, 2, 1, 3)
    scores = torch.einsum("bhqd,bhkd->bhqk", split, split) / math.sqrt(width // heads)
    scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def test_minilmv2_relations_equal_their_formula_rebuilt_from_the_projections(tmp_path):
    relation_heads, layer_map = 2, [[1, 2], [2, 4]]
    teacher = sharpened(bert_classifier(seed=1, heads=4))  # 16 wide, 4 heads; the student 8 wide, 2 heads
    student = sharpened(bert_classifier(seed=2, layers=2, width=8, heads=2))
    losses = {"attention": {"weight": WEIGHT, "heads": "relations", "num_relation_heads": relation_heads,
                            "layer_map": layer_map}}  # fmt: skip
    dataset = text_dataset(8, seed=4)
    trainer = trainer_for(tmp_path, student, teacher, losses, dataset)
    batch = as_batch(dataset)
    recorded = {"student": record_projections(student), "teacher": record_projections(teacher)}
    with torch.no_grad():
        student.eval()(**model_inputs(batch))
        teacher.eval()(**model_inputs(batch))
    mask = batch["attention_mask"]
    total = 0.0
    for student_block, teacher_block in layer_map:
        for kind in ("query", "key", "value"):
            student_relations = relation_probabilities(recorded["student"][kind, student_block], relation_heads, mask)
            teacher_relations = relation_probabilities(recorded["teacher"][kind, teacher_block], relation_heads, mask)
            per_query = kl_rows(teacher_relations, student_relations).mean(1)
            total = total + (per_query * mask).sum()
    expected = (total / (len(layer_map) * 3) / mask.sum()).item()
    assert expected > 0
    check_term(trainer, "attention", dataset, expected)


# ---- relations between the examples of a batch ---------------------------------------------------------------


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens alone."""
    weights = mask.double().unsqueeze(-1)
    return (hidden.double() * weights).sum(1) / weights.sum(1)


def similarity_by_hand(student: torch.Tensor, teacher: torch.Tensor) -> float:
    def normalised_gram(features):
        gram = features @ features.T
        return gram / gram.norm(dim=1, keepdim=True)

    batch = student.shape[0]
    return ((normalised_gram(student) - normalised_gram(teacher)) ** 2).sum().item() / batch**2


def distance_by_hand(student: torch.Tensor, teacher: torch.Tensor) -> float:
    def normalised_distances(features):
        distances = ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1).sqrt()
        pairs = distances[~torch.eye(len(features), dtype=torch.bool)]
        return pairs / pairs.mean()

    difference = (normalised_distances(student) - normalised_distances(teacher)).abs()
    huber = torch.where(difference < 1, 0.5 * difference**2, difference - 0.5)
    return huber.mean().item()


@pytest.mark.parametrize("method", ["similarity", "distance"])
def test_relation_term_equals_its_formula_on_hidden_states_pooled_over_real_tokens(tmp_path, method):
    teacher, student = bert_classifier(seed=1), bert_classifier(seed=2, layers=2, width=8, heads=2)
    losses = {"relation": {"weight": WEIGHT, "method": method, "source": "hidden_state", "layer": -2}}
    dataset = text_dataset(8, seed=5)
    batch = as_batch(dataset)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # padding of several lengths
    trainer = trainer_for(tmp_path, student, teacher, losses, dataset)
    mask = batch["attention_mask"]
    with torch.no_grad():
        features = [
            pooled(model.eval()(**model_inputs(batch), output_hidden_states=True).hidden_states[-2], mask)
            for model in (student, teacher)
        ]
    expected = (similarity_by_hand if method == "similarity" else distance_by_hand)(*features)
    assert expected > 0
    check_term(trainer, "relation", dataset, expected)


# ---- feature maps: ViT teacher, CNN student (FitNets) ---------------------------------------------------------


def test_the_teacher_grid_lays_patch_tokens_out_row_by_row_without_the_prefix():
    batch, channels, patch = 2, 3, 8
    pixel_values = torch.zeros(batch, 3, 2 * patch, 4 * patch)  # a 2 x 4 grid: a transposed layout cannot fit
    tokens = 1 + 2 * 4  # CLS first
    # Token t, channel c of example b holds 1000 b + 10 t + c.
    hidden = (
        1000 * torch.arange(batch)[:, None, None] + 10 * torch.arange(tokens)[None, :, None] + torch.arange(channels)
    ).float()
    grid = teacher_grid(hidden, pixel_values, patch)
    assert grid.shape == (batch, channels, 2, 4)
    for example in range(batch):
        for row in range(2):
            for column in range(4):
                token = 1 + row * 4 + column
                expected = [1000 * example + 10 * token + channel for channel in range(channels)]
                assert grid[example, :, row, column].tolist() == expected
    # Two prefix tokens (CLS and distillation, DeiT's) are both dropped.
    with_distillation_token = torch.cat([hidden[:, :1], hidden], dim=1)
    assert torch.equal(teacher_grid(with_distillation_token, pixel_values, patch), grid)


def test_feature_map_term_equals_its_formula(tmp_path):
    teacher, student = vit_classifier(seed=1), mobilenet_classifier(seed=2)
    module = "mobilenet_v2.layer.5"
    losses = {"feature_map": {"weight": WEIGHT, "student_module": module, "teacher_layer": -1}}
    dataset = image_dataset(8, seed=3)
    trainer = trainer_for(tmp_path, student, teacher, losses, dataset)
    projector = trainer.distillation_losses["feature_map"].projector
    batch = as_batch(dataset)
    with torch.no_grad():
        tokens = teacher.eval()(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states[-1]
    side = 32 // teacher.config.patch_size  # 4 x 4 patches after the CLS token
    teacher_map = tokens[:, 1:, :].double().reshape(len(dataset), side, side, -1).permute(0, 3, 1, 2)

    def by_hand(model) -> float:
        captured = {}
        model.get_submodule(module).register_forward_hook(lambda _m, _i, out: captured.__setitem__("map", out))
        with torch.no_grad():
            model(pixel_values=batch["pixel_values"])
            student_map = F.conv2d(captured["map"].double(), projector.weight.double(), projector.bias.double())
        grid = (min(student_map.shape[-2], side), min(student_map.shape[-1], side))
        assert student_map.shape[-2:] != teacher_map.shape[-2:]  # one of the two is pooled
        difference = F.adaptive_avg_pool2d(student_map, grid) - F.adaptive_avg_pool2d(teacher_map, grid)
        return difference.pow(2).flatten(1).mean(1).mean().item()

    # A copy for training mode: its batch norms normalise by the batch and update their running statistics.
    expected, in_training = by_hand(copy.deepcopy(student).eval()), by_hand(copy.deepcopy(student).train())
    check_term(trainer, "feature_map", dataset, expected, in_training)


# ---- two different teachers weighted 2:1 ----------------------------------------------------------------------

TEMPERATURE = 2.0


def confident(model, scale: float = 10.0):
    """`model` with its output layer scaled up: a random tiny model's predictions are close to uniform, and
    divergences between them too small to tell a right formula from a wrong one in float32."""
    with torch.no_grad():
        if hasattr(model, "classifier"):
            model.classifier.weight.mul_(5 * scale)  # it reads the pooler's tanh, smaller than hidden states
        elif hasattr(model, "qa_outputs"):
            model.qa_outputs.weight.mul_(scale)
        else:  # masked LM: the head's LayerNorm scales every logit (the decoder is tied to the embeddings)
            model.cls.predictions.transform.LayerNorm.weight.mul_(scale / 4)
    return model


def mixture(teacher_logits: list[torch.Tensor], how: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The target distribution of teachers weighted 2:1 at TEMPERATURE, over the positions `mask` keeps."""

    def softmax(logits):
        logits = logits.double() / TEMPERATURE
        if mask is not None:
            logits = logits.masked_fill(~mask.bool(), float("-inf"))
        return logits.softmax(-1)

    first, second = teacher_logits
    if how == "probabilities":
        return 2 / 3 * softmax(first) + 1 / 3 * softmax(second)
    return softmax(2 / 3 * first.double() + 1 / 3 * second.double())


def soft_target_by_hand(target: torch.Tensor, student_logits: torch.Tensor, mask=None) -> torch.Tensor:
    """KL(target ‖ student at TEMPERATURE) · T², per row."""
    logits = student_logits.double() / TEMPERATURE
    if mask is not None:
        logits = logits.masked_fill(~mask.bool(), float("-inf"))
    return kl_rows(target, logits.softmax(-1)) * TEMPERATURE**2


def two_teacher_trainer(tmp_path, student, teachers, how, dataset):
    losses = {"soft_target": {"weight": WEIGHT, "temperature": TEMPERATURE, "teacher_mixture": how}}
    return DistillationTrainer(
        model=student,
        teacher_model=teachers,
        args=config(tmp_path, losses, teacher_weights={"a": 2.0, "b": 1.0}),
        train_dataset=dataset,
    )


def outputs_of(models, batch):
    with torch.no_grad():
        return [model.eval()(**model_inputs(batch)) for model in models]


@pytest.mark.parametrize("how", ["probabilities", "logits"])
def test_two_teachers_weighted_two_to_one_per_example(tmp_path, how):
    teachers = {"a": confident(bert_classifier(seed=1)), "b": confident(bert_classifier(seed=3, width=24))}
    student = confident(bert_classifier(seed=2, layers=2, width=8, heads=2))
    dataset = text_dataset(8, seed=6)
    trainer = two_teacher_trainer(tmp_path, student, teachers, how, dataset)
    batch = as_batch(dataset)
    student_out, first, second = outputs_of([student, teachers["a"], teachers["b"]], batch)
    target = mixture([first.logits, second.logits], how)
    expected = soft_target_by_hand(target, student_out.logits).mean().item()
    # Either teacher alone, or equal weights, gives another value: the test sees which teachers were read.
    for other in (F.softmax(first.logits.double() / TEMPERATURE, -1), mixture([second.logits, first.logits], how)):
        assert soft_target_by_hand(other, student_out.logits).mean().item() != pytest.approx(expected, rel=1e-3)
    check_term(trainer, "soft_target", dataset, expected)


@pytest.mark.parametrize("how", ["probabilities", "logits"])
def test_two_teachers_weighted_two_to_one_per_token(tmp_path, how):
    teachers = {"a": confident(bert_masked_lm(seed=1)), "b": confident(bert_masked_lm(seed=3, layers=2, width=24))}
    student = confident(bert_masked_lm(seed=2, layers=2, width=8, heads=2))
    dataset = masked_lm_dataset(8, seed=7)
    trainer = two_teacher_trainer(tmp_path, student, teachers, how, dataset)
    batch = as_batch(dataset)
    counted = batch["labels"] != -100  # the masked positions
    student_out, first, second = outputs_of([student, teachers["a"], teachers["b"]], batch)
    target = mixture([first.logits[counted], second.logits[counted]], how)
    expected = soft_target_by_hand(target, student_out.logits[counted]).mean().item()
    check_term(trainer, "soft_target", dataset, expected)


@pytest.mark.parametrize("how", ["probabilities", "logits"])
def test_two_teachers_weighted_two_to_one_per_answer_span(tmp_path, how):
    teachers = {"a": confident(bert_qa(seed=1)), "b": confident(bert_qa(seed=3, layers=2))}
    student = confident(bert_qa(seed=2, layers=2))
    dataset = qa_dataset(8, seed=8)
    trainer = two_teacher_trainer(tmp_path, student, teachers, how, dataset)
    batch = as_batch(dataset)
    mask = batch["attention_mask"]  # distributions over the real positions only
    student_out, first, second = outputs_of([student, teachers["a"], teachers["b"]], batch)
    per_example = 0.0
    for name in ("start_logits", "end_logits"):
        target = mixture([getattr(first, name), getattr(second, name)], how, mask)
        per_example = per_example + soft_target_by_hand(target, getattr(student_out, name), mask) / 2
    check_term(trainer, "soft_target", dataset, per_example.mean().item())


# ---- causal-LM soft targets with GKD's and DistiLLM's divergences ---------------------------------------------


def tiny_gpt2(seed: int, layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=layers, n_head=2)
    return GPT2LMHeadModel(GPT2Config(**settings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


def causal_lm_dataset(size: int = 8):
    data = text_dataset(size, labels=False)
    input_ids, attention_mask = torch.tensor(data["input_ids"]), torch.tensor(data["attention_mask"])
    labels = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, -100))
    return data.add_column("labels", labels.tolist())


def causal_lm_run(tmp_path, losses: dict, fused: bool):
    """A GPT-2 pair's trainer on 8 padded sequences, the data set as one batch, and both models' float64 logits."""
    student, teacher = tiny_gpt2(seed=2, layers=2), tiny_gpt2(seed=1, layers=3)
    dataset = causal_lm_dataset(8)
    trainer = trainer_for(tmp_path, student, teacher, losses, dataset, fused_token_logits=fused)
    batch = as_batch(dataset)
    with torch.no_grad():
        inputs = model_inputs(batch)
        return trainer, dataset, batch, student(**inputs).logits.double(), teacher(**inputs).logits.double()


@pytest.mark.parametrize(
    ("options", "by_hand"),
    [
        ({"divergence": "generalized_jsd", "beta": 0.3},
         lambda p, q: 0.3 * kl_rows(p, 0.3 * p + 0.7 * q) + 0.7 * kl_rows(q, 0.3 * p + 0.7 * q)),
        ({"divergence": "skew_kl", "alpha": 0.2}, lambda p, q: kl_rows(p, 0.2 * p + 0.8 * q)),
        ({"divergence": "skew_reverse_kl"}, lambda p, q: kl_rows(q, 0.9 * p + 0.1 * q)),  # alpha 0.1 by default
    ],
)  # fmt: skip
@pytest.mark.parametrize("fused", [True, False])
def test_causal_lm_soft_target_with_gkd_and_distillm_divergences_equals_its_formula(tmp_path, options, by_hand, fused):
    """Per counted token (position i predicts token i + 1, labels -100 on padding), in chunks of 5 positions, with
    the vocabulary projection fused into the loss or not. A randomly initialised GPT-2 predicts almost uniformly:
    T = 0.1 sharpens both distributions so that float32 can tell the formulas apart."""
    losses = {"soft_target": {"weight": WEIGHT, "temperature": 0.1, "chunk_size": 5, **options}}
    trainer, dataset, batch, student_logits, teacher_logits = causal_lm_run(tmp_path, losses, fused)
    counted = batch["labels"][:, 1:] != -100
    p = F.softmax(teacher_logits[:, :-1][counted] / 0.1, -1)
    q = F.softmax(student_logits[:, :-1][counted] / 0.1, -1)
    expected = (0.1**2 * by_hand(p, q)).mean().item()
    check_term(trainer, "soft_target", dataset, expected)


@pytest.mark.parametrize("fused", [True, False])
def test_causal_lm_sampled_token_equals_its_formula(tmp_path, fused):
    """The value is the mean over counted tokens y (the label after each position) of log q(y) - log p(y)."""
    losses = {"sampled_token": {"weight": WEIGHT, "chunk_size": 5}}
    trainer, dataset, batch, student_logits, teacher_logits = causal_lm_run(tmp_path, losses, fused)
    counted = batch["labels"][:, 1:] != -100
    tokens = batch["labels"][:, 1:][counted]
    log_q = F.log_softmax(student_logits[:, :-1][counted], -1).gather(-1, tokens[:, None]).squeeze(-1)
    log_p = F.log_softmax(teacher_logits[:, :-1][counted], -1).gather(-1, tokens[:, None]).squeeze(-1)
    check_term(trainer, "sampled_token", dataset, (log_q - log_p).mean().item())

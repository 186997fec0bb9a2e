"""Several teachers: the mixture of their distributions, terms that follow one teacher, caches, checks, cards."""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    bert_classifier,
    bert_masked_lm,
    causal_lm,
    config,
    masked_lm_dataset,
    pad_right,
    prompt_completion_dataset,
    text_dataset,
    vit_classifier,
)

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.cache import TeacherCache
from hf_distill.losses import SoftTargetLoss, TeacherEnsemble
from hf_distill.losses.functional import mix_teacher_logits
from hf_distill.teacher import mapped_teacher

# The classic mixture plus one hidden-state match per teacher, each with its own projector (widths 8 -> 16, 24).
MLM_LOSSES = {
    "soft_target": {"weight": 1.0, "temperature": 2.0},
    "hard_label": {"weight": 1.0},
    "hidden_a": {"type": "hidden_state", "weight": 1.0, "teacher": "a"},
    "hidden_b": {"type": "hidden_state", "weight": 0.5, "teacher": "b", "layer_map": [[2, 2]]},
}


def mlm_teachers():
    return {"a": bert_masked_lm(seed=1), "b": bert_masked_lm(seed=3, layers=2, width=24, heads=4)}


def train(tmp_path, name, teachers, losses, dataset, student_seed=2, **overrides):
    settings = dict(max_steps=2, optim="sgd", max_grad_norm=0.0, learning_rate=0.5)
    settings.update(overrides)
    trainer = DistillationTrainer(
        model=bert_masked_lm(seed=student_seed, layers=2, width=8, heads=2),
        teacher_model=teachers,
        args=config(tmp_path / name, losses, **settings),
        train_dataset=dataset,
    )
    trainer.train()
    return trainer


def assert_same_weights(one, other, atol=1e-6):
    for key, value in one.model.state_dict().items():
        torch.testing.assert_close(other.model.state_dict()[key], value, atol=atol, rtol=1e-5, msg=key)


def train_logs(trainer):
    return [log for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_the_mixture_of_probabilities_is_the_weighted_mean_of_the_distributions(temperature):
    torch.manual_seed(0)
    logits = [torch.randn(5, 7) * 3 for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    mixed = mix_teacher_logits(logits, weights, temperature)
    expected = sum(w * torch.softmax(z / temperature, -1) for w, z in zip(weights, logits, strict=True))
    torch.testing.assert_close(torch.softmax(mixed / temperature, -1), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        mix_teacher_logits(logits, weights, temperature, "logits"),
        sum(w * z for w, z in zip(weights, logits, strict=True)),
    )
    # A teacher of weight 0 changes nothing.
    torch.testing.assert_close(
        torch.softmax(mix_teacher_logits(logits, [0.5, 0.5, 0.0], temperature) / temperature, -1),
        0.5 * torch.softmax(logits[0] / temperature, -1) + 0.5 * torch.softmax(logits[1] / temperature, -1),
    )


def test_soft_target_toward_an_ensemble_equals_its_formula():
    torch.manual_seed(0)
    student, first, second = (torch.randn(6, 4) for _ in range(3))
    loss = SoftTargetLoss(temperature=2.0)
    loss.setup(bert_classifier(0, num_labels=4), bert_classifier(1, num_labels=4))
    outputs = [type("Outputs", (), {"logits": value})() for value in (student, first, second)]
    ensemble = TeacherEnsemble(("a", "b"), (outputs[1], outputs[2]), (0.25, 0.75))
    total = loss(outputs[0], ensemble, {"input_ids": torch.zeros(6, 3, dtype=torch.long)})
    target = 0.25 * torch.softmax(first / 2, -1) + 0.75 * torch.softmax(second / 2, -1)
    log_q = torch.log_softmax(student / 2, -1)
    by_hand = (target * (target.log() - log_q)).sum() * 2.0**2
    torch.testing.assert_close(total, by_hand, atol=1e-5, rtol=1e-5)


def test_two_identical_teachers_train_like_one(tmp_path):
    losses = {"soft_target": {"weight": 1.0, "temperature": 2.0}, "hard_label": {"weight": 1.0},
              "hidden_state": {"weight": 1.0, "teacher": "a"}}  # fmt: skip
    single_losses = {**losses, "hidden_state": {"weight": 1.0}}
    dataset = masked_lm_dataset(16)
    teacher = bert_masked_lm(seed=1)
    one = train(tmp_path, "one", teacher, single_losses, dataset)
    two = train(tmp_path, "two", {"a": copy.deepcopy(teacher), "b": copy.deepcopy(teacher)}, losses, dataset)
    assert_same_weights(one, two, atol=1e-5)
    for a, b in zip(train_logs(one), train_logs(two), strict=True):
        assert b["soft_target"] == pytest.approx(a["soft_target"], rel=1e-5, abs=1e-6)  # float32 rounding of the mix


def test_a_teacher_of_weight_zero_is_ignored(tmp_path):
    losses = {"soft_target": {"weight": 1.0}, "hard_label": {"weight": 1.0}}
    data = text_dataset(16)
    alone = DistillationTrainer(model=bert_classifier(2, layers=2), teacher_model=bert_classifier(1),
                                args=config(tmp_path / "alone", losses, max_steps=2), train_dataset=data)  # fmt: skip
    mixed = DistillationTrainer(
        model=bert_classifier(2, layers=2),
        teacher_model={"a": bert_classifier(1), "b": bert_classifier(5, layers=1)},
        args=config(tmp_path / "mixed", losses, max_steps=2, teacher_weights={"a": 3.0, "b": 0}),
        train_dataset=data,
    )
    alone.train()
    mixed.train()
    assert_same_weights(alone, mixed)
    assert mixed.teacher_weights == {"a": 1.0, "b": 0.0}


def test_gradient_accumulation_is_exact_with_two_teachers(tmp_path):
    dataset = masked_lm_dataset(16)
    big = train(tmp_path, "big", mlm_teachers(), MLM_LOSSES, dataset, per_device_train_batch_size=8)
    accumulated = train(tmp_path, "accumulated", mlm_teachers(), MLM_LOSSES, dataset, per_device_train_batch_size=4,
                        gradient_accumulation_steps=2)  # fmt: skip
    assert_same_weights(big, accumulated)
    for key, value in big.distillation_losses.state_dict().items():  # a projector per teacher
        torch.testing.assert_close(accumulated.distillation_losses.state_dict()[key], value, atol=1e-6, rtol=1e-5)
    shapes = {key: tuple(value.shape) for key, value in big.distillation_losses.state_dict().items()}
    assert shapes["hidden_a.projectors.0.weight"] == (16, 8) and shapes["hidden_b.projectors.0.weight"] == (24, 8)
    for a, b in zip(train_logs(big), train_logs(accumulated), strict=True):
        for term in MLM_LOSSES:
            assert b[term] == pytest.approx(a[term], rel=1e-4)


def test_each_teacher_runs_once_per_batch_asked_only_for_its_terms_outputs(tmp_path):
    teachers = mlm_teachers()
    calls = {name: [] for name in teachers}
    for name, teacher in teachers.items():
        teacher.register_forward_pre_hook(
            lambda module, args, kwargs, name=name: calls[name].append(sorted(kwargs)), with_kwargs=True
        )
    losses = {"soft_target": {"weight": 1.0}, "hidden_state": {"weight": 1.0, "teacher": "a"}}
    trainer = train(tmp_path, "run", teachers, losses, masked_lm_dataset(16), max_steps=1)
    assert trainer.teacher_model is None and list(trainer.teachers) == ["a", "b"]
    probes = [c for c in calls["b"] if "output_hidden_states" not in c and "attention_mask" not in c]
    batches_b = [c for c in calls["b"] if "attention_mask" in c]
    batches_a = [c for c in calls["a"] if "attention_mask" in c]
    assert len(batches_a) == len(batches_b) == 1 and probes  # one batch each, after the logit-row probe
    assert "output_hidden_states" in batches_a[0] and "output_hidden_states" not in batches_b[0]


def test_a_cache_of_two_teachers_trains_like_online_and_needs_neither_after(tmp_path):
    dataset = masked_lm_dataset(16)
    online = train(tmp_path, "online", mlm_teachers(), MLM_LOSSES, dataset, max_steps=3)
    cache = str(tmp_path / "cache")
    cached = train(tmp_path, "cached", mlm_teachers(), MLM_LOSSES, dataset, max_steps=3, teacher_cache=cache,
                   teacher_cache_top_k=0)  # fmt: skip
    assert json.load(open(os.path.join(cache, "teachers.json"))) == {"teachers": ["a", "b"]}
    records = {name: TeacherCache(os.path.join(cache, name)).record for name in ("a", "b")}
    assert records["a"]["teacher"]["weights_sha256"] != records["b"]["teacher"]["weights_sha256"]
    assert records["b"]["contents"]["hidden_layers"] == [2] and records["a"]["contents"]["hidden_layers"] == [2, 4]
    assert_same_weights(online, cached)
    for a, b in zip(train_logs(online), train_logs(cached), strict=True):
        for term in [*MLM_LOSSES, "loss"]:
            assert b[term] == pytest.approx(a[term], rel=1e-6, abs=1e-6), term
    again = train(tmp_path, "again", None, MLM_LOSSES, dataset, max_steps=3, teacher_cache=cache,
                  teacher_cache_top_k=0)  # fmt: skip
    assert set(again.teacher_caches) == {"a", "b"} and all(s.model is None for s in again.teachers.values())
    assert_same_weights(online, again)


def test_mixing_top_k_caches_is_refused(tmp_path):
    with pytest.raises(ValueError, match="teacher_cache_top_k=0"):
        train(tmp_path, "run", mlm_teachers(), MLM_LOSSES, masked_lm_dataset(16), teacher_cache=str(tmp_path / "c"))


@pytest.mark.parametrize(
    "teachers, match",
    [
        ({"a": bert_classifier(1), "odd": bert_classifier(3, num_labels=3)}, "teacher 'odd'.*the teacher 3"),
        ({"a": bert_classifier(1), "odd": bert_classifier(3, vocab_size=80)}, "teacher 'odd'.*vocabulary"),
    ],
)
def test_a_teacher_that_disagrees_with_the_student_is_refused_by_name(tmp_path, teachers, match):
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(model=bert_classifier(2, layers=2), teacher_model=teachers,
                            args=config(tmp_path, {"soft_target": {}}), train_dataset=text_dataset())  # fmt: skip


@pytest.mark.parametrize(
    "losses, weights, match",
    [
        ({"hidden_state": {}}, None, "say which with 'teacher': 'a'"),
        ({"soft_target": {"teacher": "c"}}, None, "reads the teacher 'c', but the teachers are"),
        ({"soft_target": {}}, {"a": 1.0, "c": 1.0}, "'c' unknown.*'b' missing"),
    ],
)
def test_bad_routing_is_refused_before_training(tmp_path, losses, weights, match):
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(model=bert_classifier(2, layers=2),
                            teacher_model={"a": bert_classifier(1), "b": bert_classifier(3)},
                            args=config(tmp_path, losses, teacher_weights=weights), train_dataset=text_dataset())  # fmt: skip


def test_config_checks_teacher_weights_and_the_teacher_entry():
    with pytest.raises(ValueError, match="teacher_weights\\['a'\\] must be a number >= 0"):
        DistillationConfig(output_dir="x", teacher_weights={"a": -1})
    with pytest.raises(ValueError, match="hard_label.*takes no 'teacher' entry"):
        DistillationConfig(output_dir="x", losses={"hard_label": {"teacher": "a"}})
    parsed = DistillationConfig(output_dir="x", teacher_weights='{"a": 2, "b": 1}')
    assert parsed.teacher_weights == {"a": 2, "b": 1}


def test_an_override_without_the_teacher_argument_is_refused(tmp_path):
    class OldTrainer(DistillationTrainer):
        def teacher_forward(self, inputs, output_hidden_states=False, output_attentions=False):
            return super().teacher_forward(inputs, output_hidden_states, output_attentions)

    with pytest.raises(TypeError, match="add `teacher=None` to the override"):
        OldTrainer(model=bert_classifier(2, layers=2), teacher_model={"a": bert_classifier(1), "b": bert_classifier(3)},
                   args=config(tmp_path, {"soft_target": {}}), train_dataset=text_dataset())  # fmt: skip

    class NewTrainer(DistillationTrainer):
        seen: list = []

        def teacher_forward(self, inputs, output_hidden_states=False, output_attentions=False, teacher=None):
            self.seen.append(teacher)
            return super().teacher_forward(inputs, output_hidden_states, output_attentions, teacher=teacher)

    trainer = NewTrainer(model=bert_classifier(2, layers=2),
                         teacher_model={"a": bert_classifier(1), "b": bert_classifier(3)},
                         args=config(tmp_path, {"soft_target": {}}, max_steps=1), train_dataset=text_dataset())  # fmt: skip
    trainer.train()
    assert trainer.seen == ["a", "b"]


def test_the_model_card_lists_every_teacher_with_its_size(tmp_path):
    trainer = DistillationTrainer(
        model=vit_classifier(2, num_hidden_layers=1),
        teacher_model={"deep": vit_classifier(0, num_hidden_layers=4), "shallow": vit_classifier(1)},
        args=config(tmp_path, {"soft_target": {}}, max_steps=1),
        train_dataset=__import__("helpers").image_dataset(8),
    )
    trainer.train()
    trainer.create_model_card()
    text = open(os.path.join(tmp_path, "README.md")).read()
    assert "2 teachers: deep" in text and "| teacher `deep` |" in text and "| teacher `shallow` |" in text
    assert "of the largest teacher's parameters" in text
    assert "teachers:" in text.split("---")[1]  # in the metadata too


def test_a_teacher_that_overflows_is_named(tmp_path):
    teachers = {"a": bert_classifier(1), "b": bert_classifier(3)}
    teachers["b"].classifier.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    trainer = DistillationTrainer(model=bert_classifier(2, layers=2), teacher_model=teachers,
                                  args=config(tmp_path, {"soft_target": {}}, max_steps=2), train_dataset=text_dataset())  # fmt: skip
    with pytest.raises(FloatingPointError, match="step 1: NaN or infinite values in teacher 'b''s logits"):
        trainer.train()


@pytest.mark.slow  # three trainers and a run: the default suite keeps within its budget
def test_teacher_dtype_loads_a_teacher_given_as_a_path_in_half_precision_and_casts_a_model_given(tmp_path):
    """`teacher_dtype="bfloat16"` on the CPU: a teacher saved in float32 is loaded in bfloat16 (never in float32
    first), a model given is cast; the student stays float32, and soft_target is the KL to the bfloat16 teacher's
    logits computed in float32."""
    folder = str(tmp_path / "teacher")
    saved = bert_classifier(0)
    with torch.no_grad():  # sharper than the student: a divergence well above bfloat16's rounding
        saved.classifier.weight.mul_(50.0)
    saved.save_pretrained(folder)
    losses = {"soft_target": {"weight": 1.0, "temperature": 2.0}}
    data = text_dataset(8)
    trainer = DistillationTrainer(
        model=bert_classifier(1, layers=2), teacher_model=folder, train_dataset=data,
        args=config(tmp_path / "run", losses, teacher_dtype="bfloat16", per_device_eval_batch_size=8),
    )  # fmt: skip
    assert {p.dtype for p in trainer.teacher_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    batch = {key: torch.tensor(data[key]) for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        teacher = trainer.teacher_model(**batch).logits.float() / 2.0
        student = trainer.model(**batch).logits.float() / 2.0
    p = torch.softmax(teacher, -1)
    expected = 4.0 * (p * (p.log() - torch.log_softmax(student, -1))).sum(-1).mean()
    assert float(expected) > 1e-2
    assert trainer.evaluate(data)["eval_soft_target"] == pytest.approx(float(expected), rel=1e-3)
    trainer.train()  # a whole run with the half-precision teacher
    given = DistillationTrainer(
        model=bert_classifier(1, layers=2), teacher_model=bert_classifier(0), train_dataset=data,
        args=config(tmp_path / "given", losses, teacher_dtype="float16"),
    )  # fmt: skip
    assert {p.dtype for p in given.teacher_model.parameters()} == {torch.float16}
    with pytest.raises(ValueError, match=r"teacher_dtype must be one of \['bfloat16', 'float16', 'float32'\]"):
        config(tmp_path / "bad", losses, teacher_dtype="int8")


#: A 4-block GPT-2 teacher with its middle blocks on disk (the tied embedding and head stay together).
OFFLOADED = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "disk",
             "transformer.h.2": "disk", "transformer.h.3": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}  # fmt: skip


def test_a_teacher_with_layers_offloaded_to_disk_teaches_exactly_as_in_memory(tmp_path):
    """`teacher_model_init_kwargs` with a device map that keeps two of the teacher's four blocks on disk (each read
    for its forward, as accelerate's big-model placement does): the student trains to the same weights as with the
    whole teacher in memory."""
    causal_lm(seed=1, layers=4).save_pretrained(tmp_path / "teacher")
    losses = {"soft_target": {"weight": 1.0, "temperature": 2.0}, "hard_label": {"weight": 0.5}}

    def trained(name: str, **settings) -> DistillationTrainer:
        trainer = DistillationTrainer(
            model=causal_lm(seed=2), teacher_model=str(tmp_path / "teacher"), data_collator=pad_right,
            args=config(tmp_path / name, losses, max_steps=2, **settings), train_dataset=prompt_completion_dataset(8),
        )  # fmt: skip
        trainer.train()
        return trainer

    offload = {"device_map": OFFLOADED, "offload_folder": str(tmp_path / "offload")}
    offloaded = trained("offloaded", teacher_model_init_kwargs=json.dumps(offload))  # as on the command line
    on_disk = [name for name, p in offloaded.teacher_model.named_parameters() if p.device.type == "meta"]
    assert on_disk and all(name.startswith(("transformer.h.1.", "transformer.h.2.")) for name in on_disk)
    in_memory = trained("in_memory")
    for key, value in in_memory.model.state_dict().items():
        assert torch.equal(offloaded.model.state_dict()[key], value), key


def test_what_a_device_mapped_teacher_cannot_do_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"cannot set \['trust_remote_code'\]: set teacher_trust_remote_code"):
        DistillationConfig(output_dir=str(tmp_path), teacher_model_init_kwargs={"trust_remote_code": True})
    with pytest.raises(ValueError, match=r"cannot set \['dtype'\]: set teacher_dtype"):
        DistillationConfig(output_dir=str(tmp_path), teacher_model_init_kwargs='{"dtype": "bfloat16"}')
    teacher = causal_lm(seed=1, layers=4)
    teacher.hf_device_map = {"transformer": "cuda:0", "lm_head": "cuda:1"}
    with pytest.raises(ValueError, match=r"serves one process .* ZeRO-3 or FSDP2"):
        mapped_teacher(teacher, SimpleNamespace(num_processes=2), SimpleNamespace(teacher_dtype=None))
    with pytest.raises(ValueError, match=r"held in \['float32'\], but teacher_dtype is 'bfloat16'"):
        mapped_teacher(teacher, SimpleNamespace(num_processes=1), SimpleNamespace(teacher_dtype="bfloat16"))
    teacher.save_pretrained(tmp_path / "teacher")
    offload = {"device_map": OFFLOADED, "offload_folder": str(tmp_path / "offload")}
    with pytest.raises(ValueError, match=r"offloaded it to disk\), and a teacher cache records a hash"):
        DistillationTrainer(
            model=causal_lm(seed=2), teacher_model=str(tmp_path / "teacher"), data_collator=pad_right,
            args=config(tmp_path / "run", {"soft_target": {"weight": 1.0}}, teacher_model_init_kwargs=offload,
                        teacher_cache=str(tmp_path / "cache")),
            train_dataset=prompt_completion_dataset(8),
        )  # fmt: skip

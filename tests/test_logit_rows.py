"""Vocabulary projection at the labeled positions only: the same training as full logits, and used only where safe."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers import VOCAB, bert_classifier, bert_masked_lm, config, masked_lm_dataset, text_dataset
from transformers import BartConfig, BartForConditionalGeneration, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from hf_distill import DistillationLoss, DistillationTrainer, register_loss
from hf_distill.logit_rows import label_rows, output_head, project_rows, supports_rows
from hf_distill.losses import HardLabelLoss, SoftTargetLoss

LM_LOSSES = {
    "soft_target": {"weight": 1.0, "temperature": 2.0},
    "hard_label": {"weight": 0.5},
    "hidden_state": {"weight": 1.0, "distance": "cosine", "layer_map": [[-1, -1]]},
}


def gpt2(seed: int, layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=layers, n_head=2)
    return GPT2LMHeadModel(GPT2Config(**settings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def causal_lm_dataset(size: int = 32) -> Dataset:
    """Padded sequences labeled with their own tokens (-100 on padding), as a causal-LM collator makes them."""
    data = text_dataset(size, labels=False)
    input_ids, attention_mask = torch.tensor(data["input_ids"]), torch.tensor(data["attention_mask"])
    labels = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, -100))
    return data.add_column("labels", labels.tolist())


PAIRS = {
    "masked_lm": (lambda: bert_masked_lm(seed=1), lambda: bert_masked_lm(seed=2, layers=2), masked_lm_dataset),
    "causal_lm": (lambda: gpt2(seed=1, layers=4), lambda: gpt2(seed=2), causal_lm_dataset),
}


class LogitShapes(DistillationTrainer):
    """Records the logits' shapes each training step sees."""

    def compute_distillation_loss(self, student_outputs, teacher_outputs, inputs):
        if self.model.training:
            self.seen = getattr(self, "seen", []) + [(student_outputs.logits.shape, teacher_outputs.logits.shape)]
        return super().compute_distillation_loss(student_outputs, teacher_outputs, inputs)


def train_with_and_without_rows(tmp_path, make_student, make_teacher, losses, train, test, steps):
    """`{compact_token_logits: (trainer, evaluate() metrics)}` of the same training run both ways, after checking
    that both logged the same terms at every step and ended with the same weights."""
    runs = {}
    for compact in (True, False):
        trainer = LogitShapes(
            model=make_student(),
            teacher_model=make_teacher(),
            args=config(tmp_path / str(compact), losses, max_steps=steps, compact_token_logits=compact),
            train_dataset=train,
            eval_dataset=test,
        )
        trainer.train()
        runs[compact] = (trainer, trainer.evaluate())
    rows, full = runs[True][0], runs[False][0]
    for a, b in zip(rows.state.log_history, full.state.log_history, strict=True):
        for term in (*losses, "loss"):
            if term in b:
                # Float32 sums over other chunkings: a soft_target of ~5e-3 after 5 steps differs in its 5th digit on
                # some processors (AMD EPYC: 2.9e-5 relative); a wrong row or mask would differ at the first digits.
                assert a[term] == pytest.approx(b[term], rel=1e-4, abs=1e-7), term
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(rows.model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    for key in (f"eval_{term}" for term in losses):
        assert runs[True][1][key] == pytest.approx(runs[False][1][key], rel=1e-5), key
    return runs


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_row_logits_train_and_evaluate_exactly_like_full_logits(tmp_path, pair):
    make_teacher, make_student, make_data = PAIRS[pair]
    train, test = make_data(), make_data(8)
    runs = train_with_and_without_rows(tmp_path, make_student, make_teacher, LM_LOSSES, train, test, steps=5)
    (rows, rows_eval), (full, full_eval) = runs[True], runs[False]
    for trainer, compact in ((rows, True), (full, False)):
        assert trainer.logit_rows.student is compact and trainer.logit_rows.teacher is compact
    # Rows: [counted positions, vocab] for both models at every step; full: [batch, length, vocab].
    assert all(len(student) == 2 and student == teacher for student, teacher in rows.seen)
    assert all(len(student) == 3 for student, _ in full.seen)
    # Evaluation and prediction always see full logits.
    assert rows.predict(test).predictions.shape == full.predict(test).predictions.shape == (8, 12, VOCAB)
    assert rows_eval["eval_loss"] == pytest.approx(full_eval["eval_loss"], rel=1e-5)
    # The hook lives only inside a step: afterwards the student is an ordinary model.
    assert not output_head(rows.model)._forward_pre_hooks
    batch = {key: torch.tensor(value[:2]) for key, value in test.to_dict().items()}
    assert rows.model(**batch).logits.shape == (2, 12, VOCAB)


UNREAD_CASES = {
    # The teacher's logits are read by no loss; the student's by hard_label, at the labeled rows.
    "teacher_unread": (
        {"hard_label": {}, "hidden_state": {"distance": "cosine", "layer_map": [[-1, -1]]}},
        masked_lm_dataset,
        "rows",
    ),
    # Neither model's logits are read, and there are no labels: no position is projected on either side.
    "both_unread": (
        {"hidden_state": {"layer_map": [[-1, -1]]}, "relation": {"source": "hidden_state"}},
        lambda size=32: text_dataset(size, labels=False),
        "none",
    ),
}


@pytest.mark.parametrize("case", sorted(UNREAD_CASES))
def test_logits_no_loss_reads_are_not_projected(tmp_path, case):
    losses, make_data, student_rows = UNREAD_CASES[case]
    make_student, make_teacher = lambda: bert_masked_lm(seed=2, layers=2), lambda: bert_masked_lm(seed=1)
    runs = train_with_and_without_rows(tmp_path, make_student, make_teacher, losses, make_data(), make_data(8), 4)
    (compact, _), (full, _) = runs[True], runs[False]
    for student, teacher in compact.seen:
        assert tuple(teacher) == (0, VOCAB)
        assert student[1] == VOCAB and (student[0] == 0) is (student_rows == "none") and len(student) == 2
    assert all(len(student) == len(teacher) == 3 for student, teacher in full.seen)


def test_a_cache_build_skips_the_teacher_projection_no_loss_reads(tmp_path):
    """Storing hidden states only, the teacher building the cache projects no position onto the vocabulary."""
    teacher = bert_masked_lm(seed=1)
    head_inputs = []
    output_head(teacher).register_forward_hook(lambda module, args, output: head_inputs.append(tuple(args[0].shape)))
    losses = {"hard_label": {}, "hidden_state": {"distance": "cosine", "layer_map": [[-1, -1]]}}

    def trainer():
        return DistillationTrainer(
            model=bert_masked_lm(seed=2, layers=2),
            teacher_model=teacher,
            args=config(tmp_path, losses, teacher_cache=str(tmp_path / "cache")),
            train_dataset=masked_lm_dataset(),
        )

    trainer()
    probe, *build = head_inputs  # the construction-time probe projects its one selected row
    assert probe == (1, 16) and build and all(shape == (0, 16) for shape in build)
    # With the cache finished, the teacher is only hashed against it: it is neither probed nor run.
    head_inputs.clear()
    assert trainer().logit_rows.teacher is False and head_inputs == []


def test_row_losses_match_full_losses_in_value_and_gradient():
    """Each mix of row and full logits gives the same soft-target and hard-label sums and gradients."""
    student_model, teacher_model = bert_masked_lm(seed=2, layers=2), bert_masked_lm(seed=1)
    soft, hard = SoftTargetLoss(temperature=3.0), HardLabelLoss()
    soft.setup(student_model, teacher_model)
    hard.setup(student_model, teacher_model)
    batch = {key: torch.tensor(value[:4]) for key, value in masked_lm_dataset(4).to_dict().items()}
    rows, targets = label_rows(batch["labels"], shift=False)
    assert targets.tolist() == batch["labels"][batch["labels"] != -100].tolist()
    full_student = torch.randn(4, 12, VOCAB)
    teacher = torch.randn(4, 12, VOCAB)

    def losses(student_rows: bool, teacher_rows: bool):
        student = full_student.clone().requires_grad_(True)
        student_logits = student[rows] if student_rows else student
        outputs = type("Outputs", (), {"logits": student_logits, "loss": None})()
        if not student_rows:
            outputs.loss = torch.nn.functional.cross_entropy(student.view(-1, VOCAB), batch["labels"].view(-1))
        teacher_outputs = type("Outputs", (), {"logits": teacher[rows] if teacher_rows else teacher})()
        soft_value = soft(outputs, teacher_outputs, batch)
        hard_value = hard(outputs, None, batch)
        (soft_gradient,) = torch.autograd.grad(soft_value, student, retain_graph=True)
        (hard_gradient,) = torch.autograd.grad(hard_value, student)
        return soft_value, hard_value, soft_gradient, hard_gradient

    reference = losses(False, False)
    for student_rows, teacher_rows in ((True, True), (True, False), (False, True)):
        for value, expected in zip(losses(student_rows, teacher_rows), reference, strict=True):
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="row logits must be those of the counted positions"):
        soft(type("Outputs", (), {"logits": full_student[rows][:-1]})(), type("O", (), {"logits": teacher})(), batch)


def test_causal_rows_are_the_positions_before_each_label():
    labels = torch.tensor([[5, 6, -100, 7], [-100, 8, 9, -100]])
    rows, targets = label_rows(labels, shift=True)
    assert rows.tolist() == [[True, False, True, False], [True, True, False, False]]
    assert targets.tolist() == [6, 7, 8, 9]


@register_loss("full_logits_probe")
class FullLogitsProbe(DistillationLoss):
    """A user's loss that reads the student's logits at every position (says nothing about row logits)."""

    def forward(self, student_outputs, teacher_outputs, inputs):
        return student_outputs.logits.float().pow(2).mean((-2, -1)).sum()


@pytest.mark.parametrize(
    "losses, overrides",
    [
        ({**LM_LOSSES, "full_logits_probe": {"weight": 0.1}}, {}),  # a loss that may read full logits
        ({"hard_label": {}, "relation": {"source": "logits"}}, {}),  # relations between whole logit tensors
        (LM_LOSSES, {"compact_token_logits": False}),
    ],
    ids=["user_loss", "relation_on_logits", "turned_off"],
)
def test_full_logits_are_kept_where_a_loss_may_read_them(tmp_path, losses, overrides):
    trainer = LogitShapes(
        model=bert_masked_lm(seed=2, layers=2),
        teacher_model=bert_masked_lm(seed=1),
        args=config(tmp_path, losses, max_steps=1, **overrides),
        train_dataset=masked_lm_dataset(),
    )
    assert trainer.logit_rows.student is False
    trainer.train()
    assert [len(student) for student, _ in trainer.seen] == [3]


def test_classifiers_keep_their_logits(tmp_path):
    trainer = DistillationTrainer(
        model=bert_classifier(seed=2, layers=2),
        teacher_model=bert_classifier(seed=1),
        args=config(tmp_path, {"hard_label": {}, "soft_target": {}}),
        train_dataset=text_dataset(),
    )
    assert trainer.logit_rows.student is False


def test_encoder_decoders_keep_their_logits(tmp_path):
    """BART sits in the masked-LM mapping but builds its decoder inputs from the labels, which must stay."""
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)  # fmt: skip
    student = BartForConditionalGeneration(BartConfig(**settings))
    trainer = DistillationTrainer(
        model=student, args=config(tmp_path, {"hard_label": {}}), train_dataset=causal_lm_dataset()
    )
    assert supports_rows(student) and trainer.logit_rows.student is False


class ReshapingMaskedLM(BertForMaskedLM):
    """A masked LM that reshapes its logits after the projection, which the row projection cannot serve."""

    def forward(self, input_ids=None, **kwargs):
        outputs = super().forward(input_ids=input_ids, **kwargs)
        outputs.logits = outputs.logits.reshape(*input_ids.shape, -1)
        return outputs


def test_models_the_row_projection_cannot_serve_are_detected_by_a_probe():
    assert supports_rows(bert_masked_lm()) and supports_rows(gpt2(seed=0))
    unusual = ReshapingMaskedLM(bert_masked_lm().config)
    assert supports_rows(unusual) is False
    assert not output_head(unusual)._forward_pre_hooks  # the probe's hook is gone even after a failure
    assert supports_rows(bert_classifier()) is False  # no vocabulary projection at all
    model = bert_masked_lm()
    with pytest.raises(RuntimeError, match="compact_token_logits=False"):
        with project_rows(model, torch.ones(1, 3, dtype=torch.bool)):  # rows for another length
            model(input_ids=torch.zeros(1, 2, dtype=torch.long))

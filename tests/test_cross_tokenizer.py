"""A teacher with another tokenizer: `uld` and `gold` through the trainer, each pinned to its formula computed by
hand (loops over the groups, float64), the same-tokenizer case equal to today's loss, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from helpers import config
from test_alignment import CHARACTERS, LETTERS, WORDS, pieces_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from hf_distill import DistillationTrainer
from hf_distill.alignment import Retokenizer
from hf_distill.losses.cross_tokenizer import gold_loss, group_log_probs, matched_vocabulary, uld_loss

WEIGHT = 0.7
WORD_LIST = ["hello", "world", "hold", "low", "old", "we"]
#: A teacher's tokenizer with pieces the student's lacks: "hold" is h|o|ld to the student and h|ol|d to it.
PIECES = pieces_tokenizer([*LETTERS, "ol", "wo", "ow"])


def gpt2(tokenizer, seed: int, width: int = 16) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    settings = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=width, n_layer=2, n_head=2,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return GPT2LMHeadModel(settings)


def dataset(tokenizer, size: int = 6, seed: int = 0) -> Dataset:
    """Prompts of letters then `=`, completions of 1-3 words: "ab=hello world" + EOS, labels on the completion."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(size):
        prompt = "".join("abcdefg"[int(i)] for i in torch.randint(0, 7, (2,), generator=generator)) + "="
        words = [WORD_LIST[int(i)] for i in torch.randint(0, len(WORD_LIST), (int(torch.randint(1, 4, (1,),
                 generator=generator)),), generator=generator)]  # fmt: skip
        head = tokenizer(prompt)["input_ids"]
        tail = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": head + tail, "attention_mask": [1] * len(head + tail),
                     "labels": [-100] * len(head) + tail})  # fmt: skip
    return Dataset.from_list(rows)


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(row["input_ids"]) for row in rows)
    return {key: torch.tensor([row[key] + [fill] * (width - len(row[key])) for row in rows])
            for key, fill in (("input_ids", WORDS.pad_token_id), ("attention_mask", 0), ("labels", -100))}  # fmt: skip


def trainer_for(tmp_path, losses, teacher_tokenizer=CHARACTERS, teacher=None, **overrides) -> DistillationTrainer:
    teacher = teacher if teacher is not None else gpt2(teacher_tokenizer, 1, width=24)
    return DistillationTrainer(
        model=gpt2(WORDS, 0), teacher_model=teacher, args=config(tmp_path, losses, **overrides),
        train_dataset=dataset(WORDS), data_collator=collate, processing_class=WORDS,
        teacher_processing_class=teacher_tokenizer,
    )  # fmt: skip


def groups_by_hand(student, teacher, batch, teacher_tokenizer=CHARACTERS, merge="first"):
    """Each scored group's merged distributions, float64, from loops: the softmax at the position before the group's
    first (`merge` "first") or last token, times the probability of each other token at the position before it."""
    teacher_inputs, alignment = Retokenizer(WORDS, teacher_tokenizer)(batch)
    with torch.no_grad():
        q = torch.softmax(
            student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double(), -1
        )
        p = torch.softmax(teacher(**teacher_inputs).logits.double(), -1)
    pairs = []
    for row, groups in enumerate(alignment.groups):
        for mine, theirs in groups:
            merged = []
            for probs, ids, span in ((q, batch["input_ids"], mine), (p, teacher_inputs["input_ids"], theirs)):
                base = span[0] if merge == "first" else span[-1]
                distribution = probs[row, base - 1].clone()
                for k in span:
                    if k != base:
                        distribution *= probs[row, k - 1, ids[row, k]]
                merged.append(distribution)
            pairs.append(merged)
    return pairs, int((batch["labels"][:, 1:] != -100).sum())


def uld_by_hand(q, p) -> float:
    a, b = sorted((float(x) for x in q), reverse=True), sorted((float(x) for x in p), reverse=True)
    width = max(len(a), len(b))
    a, b = a + [0.0] * (width - len(a)), b + [0.0] * (width - len(b))
    return sum(abs(x - y) for x, y in zip(a, b, strict=True))


def kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def gold_by_hand(q, p, student_ids, teacher_ids, beta: float, weight: float) -> float:
    qm = [float(q[i]) for i in student_ids]
    pm = [float(p[j]) for j in teacher_ids]
    m = [beta * x + (1 - beta) * y for x, y in zip(pm, qm, strict=True)]
    jsd = beta * kl(pm, m) + (1 - beta) * kl(qm, m)
    rest_q = [float(v) for i, v in enumerate(q) if i not in set(student_ids)]
    rest_p = [float(v) for j, v in enumerate(p) if j not in set(teacher_ids)]
    return weight * jsd + (1 - weight) * uld_by_hand(rest_q, rest_p)


def test_merged_group_distributions_and_uld_equal_their_formulas_on_small_tensors():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [2.0, 0.0, 1.0]]])
    probs = torch.softmax(logits[0], -1)
    # group 0: tokens 1, 2, 0 predicted at positions 0, 1, 2; group 1: token 2 alone, predicted at position 3
    rows, first, later = torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([[1, 2, 0], [2, 0, 0]])
    merged = group_log_probs(logits, rows, later, 1.0, first, merge="first").exp()
    assert torch.allclose(merged[0], probs[0] * probs[1, 2] * probs[2, 0]) and torch.allclose(merged[1], probs[3])
    merged = group_log_probs(logits, rows, later, 1.0, first, merge="last").exp()
    assert torch.allclose(merged[0], probs[2] * probs[0, 1] * probs[1, 2]) and torch.allclose(merged[1], probs[3])
    q, p = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.1, 0.5, 0.1, 0.3]])
    assert uld_loss(q.log(), p.log()).item() == pytest.approx(0.2 + 0.1 + 0.0 + 0.1)


def test_gold_on_small_tensors_equals_its_formula():
    q = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    p = torch.tensor([[0.1, 0.6, 0.2, 0.1]], dtype=torch.float64)
    mine, theirs = torch.tensor([0, 1]), torch.tensor([1, 3])  # student 0 ~ teacher 1, student 1 ~ teacher 3
    for beta in (0.0, 0.3, 1.0):
        value = gold_loss(q.log(), p.log(), mine, theirs, beta, matched_weight=0.5).item()
        if beta in (0.0, 1.0):  # the ends are the KLs (TRL's convention)
            qm, pm = [0.5, 0.3], [0.6, 0.1]
            jsd = kl(pm, qm) if beta == 0 else kl(qm, pm)
            expected = 0.5 * jsd + 0.5 * uld_by_hand([0.2], [0.1, 0.2])
        else:
            expected = gold_by_hand(q[0], p[0], [0, 1], [1, 3], beta, 0.5)
        assert value == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("loss", "merge"), [("uld", "first"), ("gold", "first"), ("gold", "last")])
def test_a_teacher_with_another_tokenizer_is_distilled_over_aligned_groups_as_computed_by_hand(tmp_path, loss, merge):
    options = {"weight": WEIGHT, "merge": merge, **({"beta": 0.3} if loss == "gold" else {})}
    trainer = trainer_for(tmp_path, {loss: options}, teacher_tokenizer=PIECES)
    batch = collate([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    pairs, tokens = groups_by_hand(trainer.model, trainer.teacher_model, batch, PIECES, merge)
    assert len(pairs) > tokens / 2  # most groups scored: words are several characters, the EOS its own group
    if loss == "uld":
        expected = sum(uld_by_hand(q, p) for q, p in pairs) / tokens
    else:
        mine, theirs = matched_vocabulary(WORDS, PIECES, len(WORDS), len(PIECES))
        weight = len(theirs) / len(PIECES)
        assert 0 < weight < 1
        expected = sum(gold_by_hand(q, p, mine.tolist(), theirs.tolist(), 0.3, weight) for q, p in pairs) / tokens
    trainer.model.train()
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(WEIGHT * expected, rel=1e-5)
    metrics = trainer.evaluate(trainer.train_dataset)
    assert metrics[f"eval_{loss}"] == pytest.approx(expected, rel=1e-5)


def test_with_one_tokenizer_gold_is_soft_target_with_the_generalized_jsd(tmp_path):
    teacher = gpt2(WORDS, 1, width=24)
    with torch.no_grad():  # a sharper teacher, far from the student: divergences well above float32's rounding
        teacher.transformer.wte.weight.mul_(8.0)
    for temperature in (1.0, 2.0):
        gold = trainer_for(tmp_path, {"gold": {"weight": 1.0, "beta": 0.3, "temperature": temperature}},
                           teacher_tokenizer=WORDS, teacher=teacher)  # fmt: skip
        soft = trainer_for(tmp_path, {"soft_target": {"weight": 1.0, "divergence": "generalized_jsd", "beta": 0.3,
                                                      "temperature": temperature}}, teacher_tokenizer=WORDS,
                           teacher=teacher)  # fmt: skip
        batch = collate([gold.train_dataset[i] for i in range(len(gold.train_dataset))])
        assert gold.roster.sources["teacher"].retokenizer.identical
        expected = soft.compute_loss(soft.model, batch).item()
        assert expected > 0.05
        assert gold.compute_loss(gold.model, batch).item() == pytest.approx(expected, rel=1e-5)


def test_hidden_states_across_tokenizers_are_compared_group_by_group_as_computed_by_hand(tmp_path):
    """`hidden_state` beside `gold`: each side's last hidden states averaged over each aligned group's tokens, the
    mean squared difference per group, over the student's completion tokens."""
    losses = {"gold": {"weight": 1.0}, "hidden_state": {"weight": WEIGHT, "layer_map": [[-1, -1]]}}
    trainer = trainer_for(tmp_path, losses, teacher_tokenizer=PIECES, teacher=gpt2(PIECES, 1, width=16))
    batch = collate([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    teacher_inputs, alignment = Retokenizer(WORDS, PIECES)(batch)
    with torch.no_grad():
        mine = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True).hidden_states[-1].double()  # fmt: skip
        theirs = trainer.teacher_model(**teacher_inputs, output_hidden_states=True).hidden_states[-1].double()
    total = 0.0
    for row, groups in enumerate(alignment.groups):
        for student_tokens, teacher_tokens in groups:
            a = mine[row, list(student_tokens)].mean(0)
            b = theirs[row, list(teacher_tokens)].mean(0)
            total += float((a - b).pow(2).mean())
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert trainer.evaluate(trainer.train_dataset)["eval_hidden_state"] == pytest.approx(total / tokens, rel=1e-5)


def test_cross_tokenizer_distillation_trains_and_logs_its_term(tmp_path):
    trainer = trainer_for(tmp_path, {"gold": {"weight": 1.0}, "hard_label": {"weight": 0.5}}, max_steps=3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "gold" in entry]
    assert len(logged) == 3 and all(math.isfinite(entry["gold"]) and entry["gold"] > 0 for entry in logged)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("losses", "teacher_tokenizer", "message"),
    [
        ({"uld": {"weight": 1.0}}, None, "need both: pass the student's tokenizer as processing_class"),
        ({"uld": {"weight": 1.0}, "soft_target": {"weight": 1.0}}, CHARACTERS, "read its logits position by position"),
        ({"gold": {"weight": 1.0}, "relation": {"weight": 1.0}}, CHARACTERS, "not aligned across tokenizers"),
        ({"gold": {"weight": 1.0, "beta": 1.5}}, CHARACTERS, "beta must be a number in"),
        ({"gold": {"weight": 1.0, "matched_weight": 2}}, CHARACTERS, "matched_weight must be a number in"),
        ({"uld": {"weight": 1.0, "temperature": 0}}, CHARACTERS, "temperature must be a number > 0"),
        ({"uld": {"weight": 1.0, "merge": "middle"}}, CHARACTERS, "merge must be one of"),
    ],
)
def test_cross_tokenizer_mistakes_are_refused_with_the_fix(tmp_path, losses, teacher_tokenizer, message):
    with pytest.raises(ValueError, match=message):
        trainer_for(tmp_path, losses, teacher_tokenizer=teacher_tokenizer, teacher=gpt2(CHARACTERS, 1))


def test_a_teacher_with_another_tokenizer_that_learns_is_refused(tmp_path):
    with pytest.raises(ValueError, match="distil from a frozen teacher across tokenizers"):
        trainer_for(tmp_path, {"uld": {"weight": 1.0}, "hard_label": {"weight": 1.0}},
                    teacher=gpt2(CHARACTERS, 1), trainable_teachers=["teacher"])  # fmt: skip


class WordEcho:
    """A rollout backend that writes each prompt's completion as "hel lo" token by token, then the end of sequence:
    the retokenized teacher reads the student's own samples."""

    def generate(self, model, input_ids, attention_mask, generation_config, synced_gpus):
        new = WORDS.convert_tokens_to_ids(["h", "e", "l", "lo"]) + [WORDS.eos_token_id]  # not "hel lo": a sample
        return torch.cat([input_ids, torch.tensor([new] * input_ids.shape[0])], dim=1)


@pytest.mark.slow  # a run with generation: the default suite keeps within its budget
def test_on_policy_across_tokenizers_scores_the_students_own_samples_in_the_teachers_tokens(tmp_path):
    trainer = DistillationTrainer(
        model=gpt2(WORDS, 0), teacher_model=gpt2(PIECES, 1, width=24),
        args=config(tmp_path, {"gold": {"weight": 1.0, "beta": 1.0}}, lmbda=1.0, max_steps=2),
        train_dataset=dataset(WORDS), data_collator=collate, processing_class=WORDS, teacher_processing_class=PIECES,
        rollout_backend=WordEcho(),
    )  # fmt: skip
    seen = []
    source = trainer.roster.sources["teacher"]
    retokenize = source.retokenizer

    class Watch:
        identical = False

        def __call__(self, inputs):
            teacher_inputs, alignment = retokenize(inputs)
            seen.append(PIECES.batch_decode(teacher_inputs["input_ids"], skip_special_tokens=True))
            return teacher_inputs, alignment

    source.retokenizer = Watch()
    trainer.train()
    assert seen and all(text.endswith("=hello") for batch in seen for text in batch)
    assert all(math.isfinite(entry["gold"]) for entry in trainer.state.log_history if "gold" in entry)


def test_seq_kd_from_a_teacher_with_another_tokenizer_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="train on the student's own samples"):
        DistillationTrainer(
            model=gpt2(WORDS, 0), teacher_model=gpt2(PIECES, 1), args=config(tmp_path, {"uld": {"weight": 1.0}},
            seq_kd=True), train_dataset=dataset(WORDS), data_collator=collate, processing_class=WORDS,
            teacher_processing_class=PIECES,
        )  # fmt: skip

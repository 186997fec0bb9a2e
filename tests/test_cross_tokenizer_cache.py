"""A teacher cache for a teacher with another tokenizer: the aligned groups and the teacher's merged distributions
stored, trained from exactly as online, at any padding, without the teacher; top-k groups; refusals."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from helpers import config
from test_alignment import CHARACTERS, WORDS
from test_cross_tokenizer import PIECES, dataset, gpt2

from hf_distill import DistillationTrainer
from hf_distill.cache import TeacherCache

LOSSES = {
    "uld": {"uld": {"weight": 0.7, "merge": "first"}, "hard_label": {"weight": 0.5}},
    "gold": {"gold": {"weight": 1.0, "beta": 0.3, "merge": "last", "temperature": 2.0}},
    "gold+hidden": {
        "gold": {"weight": 1.0, "merge": "first"},
        "hidden_state": {"weight": 0.5, "layer_map": [[-1, -1]]},
    },
}


def collate(rows: list[dict], left: bool = False) -> dict[str, torch.Tensor]:
    """Padding to the longest (on the left with `left`: every example's tokens at other positions than the cache
    was built at); other keys (the cache's example index) passed on."""
    width = max(len(row["input_ids"]) for row in rows)
    fills = {"input_ids": WORDS.pad_token_id, "attention_mask": 0, "labels": -100}
    batch = {key: torch.tensor([row[key] for row in rows]) for key in rows[0] if key not in fills}
    for key, fill in fills.items():
        padded = [[fill] * (width - len(row[key])) + row[key] if left else row[key] + [fill] * (width - len(row[key]))
                  for row in rows]  # fmt: skip
        batch[key] = torch.tensor(padded)
    return batch


def collate_left(rows: list[dict]) -> dict[str, torch.Tensor]:
    return collate(rows, left=True)


def run(tmp_path, name, losses, teacher=None, teacher_tokenizer=PIECES, student=None, collator=collate, **overrides):
    trainer = DistillationTrainer(
        model=student if student is not None else gpt2(WORDS, 0), teacher_model=teacher,
        args=config(tmp_path / name, losses, max_steps=3, **overrides), train_dataset=dataset(WORDS, size=10),
        data_collator=collator, processing_class=WORDS, teacher_processing_class=teacher_tokenizer,
    )  # fmt: skip
    trainer.train()
    return trainer


def logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_same_run(cached, online, terms) -> None:
    assert len(logs(cached)) == len(logs(online)) == 3
    for mine, theirs in zip(logs(cached), logs(online), strict=True):
        for term in [*terms, "loss"]:
            assert mine[term] == pytest.approx(theirs[term], rel=1e-5, abs=1e-7), term
    online_weights = online.model.state_dict()
    for name, value in cached.model.state_dict().items():
        torch.testing.assert_close(value, online_weights[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("losses", list(LOSSES))
def test_a_dense_cross_tokenizer_cache_trains_exactly_like_online_and_then_needs_no_teacher(tmp_path, losses):
    losses = LOSSES[losses]
    teacher = gpt2(PIECES, 1, width=16)
    cache = str(tmp_path / "cache")
    online = run(tmp_path, "online", losses, teacher=teacher)
    built = run(tmp_path, "built", losses, teacher=teacher, teacher_cache=cache, teacher_cache_top_k=0)
    assert built.teacher_model is None and TeacherCache.is_finished(cache)
    assert_same_run(built, online, losses)
    record = json.load(open(os.path.join(cache, "cache.json"), encoding="utf-8"))
    groups = record["contents"]["groups"]
    assert groups["top_k"] is None and groups["width"] == len(PIECES)
    assert groups["aligned_hidden"] == ("hidden_state" in losses)
    # Later: no teacher, its tokenizer only, and another padding (the groups are found again from the mask).
    online_left = run(tmp_path, "online-left", losses, teacher=teacher, collator=collate_left)
    cached_left = run(
        tmp_path, "cached-left", losses, collator=collate_left, teacher_cache=cache, teacher_cache_top_k=0
    )
    assert cached_left.teacher_model is None
    assert_same_run(cached_left, online_left, losses)


def test_with_one_tokenizer_on_both_sides_the_cache_keeps_one_group_per_token_and_trains_like_online(tmp_path):
    losses = {"gold": {"weight": 1.0, "beta": 0.3}, "hidden_state": {"weight": 0.5, "layer_map": [[-1, -1]]}}
    teacher, cache = gpt2(WORDS, 1, width=16), str(tmp_path / "cache")
    online = run(tmp_path, "online", losses, teacher=teacher, teacher_tokenizer=WORDS)
    built = run(tmp_path, "built", losses, teacher=teacher, teacher_tokenizer=WORDS, teacher_cache=cache,
                teacher_cache_top_k=0)  # fmt: skip
    assert_same_run(built, online, losses)
    stored = TeacherCache(cache).reader.gather([0])
    assert torch.equal(stored["group.stop"] - stored["group.start"], torch.ones_like(stored["group.start"]))
    assert "hidden_rows" in stored  # hidden states by position, as for any teacher of the student's tokens


def test_a_top_k_cross_tokenizer_cache_is_close_to_online_and_exact_when_k_covers_the_teachers_vocabulary(tmp_path):
    losses = {"gold": {"weight": 1.0, "beta": 0.5, "merge": "first"}}
    teacher = gpt2(PIECES, 1, width=16)
    with torch.no_grad():  # a more peaked teacher than a random one (its top 8 hold about half of a group's mass)
        teacher.transformer.wte.weight.mul_(8.0)
    student = gpt2(WORDS, 0)
    online = run(tmp_path, "online", losses, teacher=teacher, student=copy.deepcopy(student))
    covering = run(tmp_path, "covering", losses, teacher=teacher, student=copy.deepcopy(student),
                   teacher_cache=str(tmp_path / "k-all"), teacher_cache_top_k=len(PIECES))  # fmt: skip
    assert_same_run(covering, online, losses)
    top = run(tmp_path, "top", losses, teacher=teacher, student=copy.deepcopy(student),
              teacher_cache=str(tmp_path / "k8"), teacher_cache_top_k=8)  # fmt: skip
    # Each group's distribution: its top 8 as built, the rest of its mass spread evenly over the other columns.
    batch = collate([{**top.train_dataset[i], "hf_distill_example_index": i} for i in range(4)])
    dense = TeacherCache(str(tmp_path / "k-all")).outputs_for(list(range(4)), batch, torch.device("cpu"))
    approximate = TeacherCache(str(tmp_path / "k8")).outputs_for(list(range(4)), batch, torch.device("cpu"))
    exact = dense.group_targets.log_probs(1.0, "first").exp()
    spread = approximate.group_targets.log_probs(1.0, "first").exp()
    values, indices = exact.topk(8, dim=-1)
    torch.testing.assert_close(spread.gather(-1, indices), values)
    # A merged distribution sums to the probability of the group's other tokens, which the cache keeps.
    torch.testing.assert_close(spread.sum(-1), exact.sum(-1))
    assert float(exact.sum(-1).min()) < 0.5  # several groups of more than one token
    rest = (exact.sum(-1, keepdim=True) - values.sum(-1, keepdim=True)) / (len(PIECES) - 8)
    torch.testing.assert_close(spread.scatter(-1, indices, 0.0), rest.expand_as(spread).scatter(-1, indices, 0.0))
    first, reference = logs(top)[0]["gold"], logs(online)[0]["gold"]
    assert first != pytest.approx(reference, rel=1e-6)  # an approximation...
    assert first == pytest.approx(reference, rel=0.1)  # ...of the same loss


def test_a_cross_tokenizer_cache_is_refused_for_other_tokenizers_or_merges_and_needs_the_teachers_tokenizer(tmp_path):
    losses = {"uld": {"weight": 1.0, "merge": "first"}}
    cache = str(tmp_path / "cache")
    run(tmp_path, "built", losses, teacher=gpt2(PIECES, 1, width=16), teacher_cache=cache)
    with pytest.raises(ValueError, match="tokenizer differs from the ones the cache was aligned with"):
        run(tmp_path, "other-tokenizer", losses, teacher_tokenizer=CHARACTERS, teacher_cache=cache)
    with pytest.raises(ValueError, match=r"pairs \[\[1.0, 'last'\]\] are needed"):
        run(tmp_path, "other-merge", {"uld": {"weight": 1.0, "merge": "last"}}, teacher_cache=cache)
    with pytest.raises(ValueError, match="need both: pass the student's tokenizer as processing_class"):
        run(tmp_path, "no-tokenizer", losses, teacher_tokenizer=None, teacher_cache=cache)

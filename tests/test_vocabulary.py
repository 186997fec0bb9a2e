"""A teacher whose vocabulary extends the student's (padding rows, added tokens): decided from the two tokenizers,
its logits cut to the student's columns on every path, its extra tokens never sampled."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import VOCAB, causal_lm, config, pad_right, prompt_completion_dataset
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from hf_distill import DistillationTrainer
from hf_distill.cache import INDEX_KEY
from hf_distill.vocabulary import shared_columns

LOSSES = {
    "soft_target": {"weight": 1.0, "temperature": 2.0, "divergence": "forward_kl"},
    "hard_label": {"weight": 0.5},
}
PADDED = VOCAB + 8  # the teacher's embedding table, padded to a multiple of 8 after 4 added tokens


def tokenizer(extra: list[str] = (), renamed: dict[int, str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the helpers' VOCAB ids (<pad>, <s>, </s>, then w3...), with `extra` tokens added
    after them and `renamed` ids given other strings."""
    names = ["<pad>", "<s>", "</s>"] + [f"w{index}" for index in range(3, VOCAB)]
    for index, name in (renamed or {}).items():
        names[index] = name
    vocab = {name: index for index, name in enumerate(names)}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
        pad_token="<pad>", bos_token="<s>", eos_token="</s>",
    )  # fmt: skip
    if extra:
        fast.add_tokens(list(extra))
    return fast


def teacher_lm() -> torch.nn.Module:
    """The helpers' GPT-2 whose last layer norm adds 1 to every feature: its final hidden states sum to the width."""
    model = causal_lm(0)
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(1.0)
    return model


def padded(teacher: torch.nn.Module, rows: int = PADDED) -> torch.nn.Module:
    """`teacher` with its (tied) embedding table grown to `rows`, the new rows all 3: each of their logits is 3 x the
    width (48), far above the others, so that, left in, they would take nearly all of every distribution."""
    grown = copy.deepcopy(teacher)
    grown.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        grown.get_output_embeddings().weight[VOCAB:] = 3.0
    assert grown.config.vocab_size == rows
    return grown


def test_an_extended_or_padded_teacher_vocabulary_gives_the_student_s_columns():
    student, teacher = causal_lm(1), padded(causal_lm(0))
    assert shared_columns(student, teacher, tokenizer(), tokenizer(["<extra_0>", "<extra_1>"])) == VOCAB
    assert shared_columns(student, teacher, tokenizer(), tokenizer()) == VOCAB  # padding rows only
    assert shared_columns(student, causal_lm(0), tokenizer(), tokenizer()) is None  # the same width: nothing to cut


@pytest.mark.parametrize(
    "student_tokenizer, teacher_tokenizer, message",
    [
        (tokenizer(), None, "pass the student's tokenizer as processing_class and the teacher's as "
                            "teacher_processing_class"),
        (tokenizer(), tokenizer(renamed={5: "w5x", 63: "w5"}), "do not keep their ids in the teacher's tokenizer"),
        (tokenizer(renamed={60: "s60"}), tokenizer(renamed={60: "t60"}), "do not keep their ids"),
    ],
)  # fmt: skip
def test_a_teacher_vocabulary_that_does_not_extend_the_student_s_is_refused_with_the_fix(
    student_tokenizer, teacher_tokenizer, message
):
    with pytest.raises(ValueError, match=message):
        shared_columns(causal_lm(1), padded(causal_lm(0)), student_tokenizer, teacher_tokenizer)


def test_tokens_of_the_teacher_among_the_student_s_ids_and_a_wider_student_are_refused():
    student = causal_lm(1)
    student.resize_token_embeddings(VOCAB + 2, mean_resizing=False)  # two padding rows, VOCAB and VOCAB + 1
    with pytest.raises(ValueError, match="has tokens among the student's ids that the student's has not"):
        shared_columns(student, padded(causal_lm(0)), tokenizer(), tokenizer(["<extra_0>"]))
    with pytest.raises(ValueError, match=r"resize the student's embeddings to the teacher's"):
        shared_columns(padded(causal_lm(0)), causal_lm(0), tokenizer(), tokenizer())
    differs = tokenizer()
    differs.pad_token = "w3"
    with pytest.raises(ValueError, match="pad_token_id 0 and the teacher's 3"):
        shared_columns(causal_lm(1), padded(causal_lm(0)), tokenizer(), differs)


def keep_index(rows: list[dict]) -> dict[str, torch.Tensor]:
    """`pad_right`, passing on the example index a teacher cache reads its outputs by."""
    batch = pad_right(rows)
    if INDEX_KEY in rows[0]:
        batch[INDEX_KEY] = torch.tensor([row[INDEX_KEY] for row in rows])
    return batch


def run(tmp_path, teacher, teacher_tokenizer=None, **overrides) -> DistillationTrainer:
    trainer = DistillationTrainer(
        model=causal_lm(1),
        teacher_model=teacher,
        args=config(tmp_path, LOSSES, max_steps=2, per_device_train_batch_size=4, **overrides),
        train_dataset=prompt_completion_dataset(8),
        data_collator=keep_index,
        processing_class=tokenizer(),
        teacher_processing_class=teacher_tokenizer,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    "settings",
    [{}, {"fused_token_logits": False}, {"compact_token_logits": False}, {"teacher_cache": "cache"},
     {"teacher_cache": "cache", "teacher_cache_top_k": 0}],
    ids=["fused", "rows", "every-position", "top-k-cache", "dense-cache"],
)  # fmt: skip
def test_a_padded_teacher_distils_exactly_as_the_teacher_it_extends(tmp_path, settings):
    """The padded teacher's extra rows are large enough to dominate its distribution: a student trained from it
    equals one trained from the unpadded teacher only if they are left out and the rest renormalised."""
    teacher = teacher_lm()
    same = run(tmp_path / "same", teacher, **_folders(settings, tmp_path / "same"))
    extended = run(tmp_path / "padded", padded(teacher), tokenizer(["<extra_0>", "<extra_1>", "<a>", "<b>"]),
                   **_folders(settings, tmp_path / "padded"))  # fmt: skip
    assert extended.roster.columns == {"teacher": VOCAB} and same.roster.columns == {}
    for key, value in same.model.state_dict().items():
        torch.testing.assert_close(extended.model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    logged = [entry for entry in extended.state.log_history if "soft_target" in entry]
    assert logged and logged[0]["soft_target"] == pytest.approx(
        [e for e in same.state.log_history if "soft_target" in e][0]["soft_target"], rel=1e-6
    )


def _folders(settings: dict, folder) -> dict:
    """`settings` with the teacher cache, if any, in `folder`."""
    return {key: str(folder / value) if key == "teacher_cache" else value for key, value in settings.items()}


def test_a_cache_of_a_teacher_cut_to_one_vocabulary_is_not_read_for_another(tmp_path):
    """The cut is part of what a cache holds: a cache built for a 64-word student refuses a student that reads the
    teacher's 72 columns whole."""
    cache = str(tmp_path / "cache")
    run(tmp_path / "a", padded(teacher_lm()), tokenizer(["<extra_0>"]), teacher_cache=cache)
    with pytest.raises(ValueError, match="teacher_columns is 64 in the cache, None now"):
        DistillationTrainer(
            model=padded(causal_lm(1)), args=config(tmp_path / "b", LOSSES, teacher_cache=cache),
            train_dataset=prompt_completion_dataset(8), data_collator=keep_index,
        )  # fmt: skip


def test_seq_kd_never_samples_the_teacher_s_extra_tokens(tmp_path):
    teacher = padded(teacher_lm())
    trainer = DistillationTrainer(
        model=causal_lm(1), teacher_model=teacher,
        args=config(tmp_path, LOSSES, seq_kd=True, rollout_generation={"max_new_tokens": 6}),
        train_dataset=prompt_completion_dataset(8), data_collator=pad_right,
        processing_class=tokenizer(), teacher_processing_class=tokenizer(["<extra_0>"]),
    )  # fmt: skip
    batch = pad_right([prompt_completion_dataset(8)[index] for index in range(8)])
    (completed,) = trainer._with_completions([batch])
    assert trainer.completion_source == "teacher"
    sampled = completed["labels"][completed["labels"] != -100]
    assert sampled.numel() > 8 and int(sampled.max()) < VOCAB
    # Left in, the extra rows win nearly every draw: the check above is not vacuous.
    unsuppressed = trainer.rollouts.complete(teacher, [batch["input_ids"][0, :3]] * 4, 0, False, torch.device("cpu"))
    assert any(int(row.max()) >= VOCAB for row in unsuppressed if row.numel())


def test_a_teacher_tokenizer_is_read_from_the_teacher_s_folder(tmp_path):
    teacher = padded(causal_lm(0))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer(["<extra_0>"]).save_pretrained(tmp_path / "teacher")
    trainer = DistillationTrainer(
        model=causal_lm(1), teacher_model=str(tmp_path / "teacher"), args=config(tmp_path / "run", LOSSES),
        train_dataset=prompt_completion_dataset(8), data_collator=pad_right, processing_class=tokenizer(),
    )  # fmt: skip
    assert trainer.teachers["teacher"].columns == VOCAB


def test_tokenizers_keyed_by_a_teacher_that_is_not_there_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"names teachers \['other'\]; the teachers are \['teacher'\]: key the"):
        DistillationTrainer(
            model=causal_lm(1), teacher_model=padded(teacher_lm()), args=config(tmp_path, LOSSES),
            train_dataset=prompt_completion_dataset(8), data_collator=pad_right, processing_class=tokenizer(),
            teacher_processing_class={"other": tokenizer(["<extra_0>"])},
        )  # fmt: skip

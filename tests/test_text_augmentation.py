"""Contextual word replacement (TinyBERT): candidates from a masked LM, copies drawn with a seed, saved and reused."""

import json
import os

import pytest
import torch
import transformers
from datasets import ClassLabel, Dataset
from helpers import bert_classifier, config
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

from hf_distill import DistillationTrainer, with_transfer_set
from hf_distill import text_augmentation as augmentation
from hf_distill.text_augmentation import (
    RECORD_NAME,
    WordReplacement,
    build_word_replacement,
    load_masked_lm,
    replaced_copies,
    replacement_candidates,
    word_replacement,
)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "good bad film plot actor scene story great dull fun cat dog sun rain tree long".split()
PIECES = ["##s", "##ly", "##ing"]
TEXTS = ["good films, great plot!", "the dull story 42 times", "a fun scene"]


def tokenizer() -> BertTokenizer:
    return BertTokenizer(vocab={t: i for i, t in enumerate(SPECIAL + WORDS + PIECES)}, model_max_length=32)


def masked_lm(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    width = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return BertForMaskedLM(BertConfig(vocab_size=len(tokenizer()), max_position_embeddings=32, **width)).eval()


def write_masked_lm(folder) -> str:
    masked_lm().save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return str(folder)


def whole_word_ids(tok) -> list[int]:
    return [tok.convert_tokens_to_ids(word) for word in WORDS]


def test_a_single_piece_word_gets_the_masked_lms_best_whole_words():
    model, tok = masked_lm(), tokenizer()
    settings = WordReplacement(candidates=4)
    found = replacement_candidates(TEXTS, model, tok, settings)
    # "good films, great plot!": good, films (two pieces), great, plot; punctuation and "42" are never replaced.
    assert [span for span, _ in found[0]] == [(0, 4), (5, 10), (12, 17), (18, 22)]
    assert [TEXTS[1][a:b] for (a, b), _ in found[1]] == ["the", "dull", "story", "times"]
    ids = tok(TEXTS[0]).input_ids  # [CLS] good film ##s [UNK] great plot [UNK] [SEP]
    allowed = torch.full((len(tok),), float("-inf"))
    allowed[whole_word_ids(tok)] = 0.0
    for word, position in (("good", 1), ("great", 5), ("plot", 6)):
        masked = list(ids)
        masked[position] = tok.mask_token_id
        with torch.no_grad():  # one unpadded sequence with its full projection: the batched path must agree
            logits = model(input_ids=torch.tensor([masked])).logits[0, position] + allowed
        logits[tok.convert_tokens_to_ids(word)] = float("-inf")
        expected = tok.convert_ids_to_tokens(logits.topk(4).indices.tolist())
        assert dict((TEXTS[0][a:b], c) for (a, b), c in found[0])[word] == expected


def test_a_word_of_several_pieces_gets_its_nearest_whole_words_by_embedding():
    model, tok = masked_lm(), tokenizer()
    found = replacement_candidates(["good films"], model, tok, WordReplacement(candidates=3))
    embeddings = model.get_input_embeddings().weight.detach()
    mean = embeddings[[tok.convert_tokens_to_ids("film"), tok.convert_tokens_to_ids("##s")]].mean(0)
    ids = whole_word_ids(tok)
    similarity = torch.nn.functional.cosine_similarity(embeddings[ids], mean[None], dim=-1)
    expected = [WORDS[i] for i in similarity.argsort(descending=True)[:3].tolist()]
    assert found[0][1] == ((5, 10), expected)
    many = replacement_candidates(["good films"], model, tok, WordReplacement(candidates=50))  # more than there are
    assert sorted(many[0][0][1]) == sorted(set(WORDS) - {"good"}) and sorted(many[0][1][1]) == sorted(WORDS)


def test_copies_replace_words_at_the_rate_with_their_candidates_and_keep_the_rest():
    text = "alpha, beta gamma 7 delta."
    candidates = [[((0, 5), ["one", "two"]), ((7, 11), ["three"]), ((12, 17), []), ((20, 25), ["four"])]]
    always = replaced_copies([text], candidates, WordReplacement(rate=1.0, copies=50, seed=1))
    assert {copy.split(" ")[1] for copy in always} == {"three"}
    assert all(copy.endswith(" gamma 7 four.") and copy[:3] in ("one", "two") for copy in always)
    assert {copy[:3] for copy in always} == {"one", "two"}
    settings = WordReplacement(rate=0.4, copies=2000, seed=3)
    copies = replaced_copies([text], candidates, settings)
    replaced = sum(not copy.startswith("alpha") for copy in copies) / len(copies)
    assert 0.36 < replaced < 0.44  # 2,000 draws: the binomial's std is 0.011
    assert copies == replaced_copies([text], candidates, settings)
    assert copies != replaced_copies([text], candidates, WordReplacement(rate=0.4, copies=2000, seed=4))
    assert replaced_copies(["Alpha"], [[((0, 5), ["one"])]], WordReplacement(rate=1.0, copies=1)) == ["One"]


def test_word_replacement_gives_copies_in_example_order():
    data = Dataset.from_dict({"text": TEXTS, "label": [1, 0, 1]})
    copies = word_replacement(data, "text", masked_lm(), tokenizer(), WordReplacement(copies=3, rate=1.0))
    assert copies.column_names == ["text"] and len(copies) == 9
    # Every replaceable word of the first text is replaced; its punctuation and its word boundaries stay.
    assert all(copy.count(",") == 1 and copy.endswith("!") for copy in copies["text"][:3])
    assert all("42" in copy for copy in copies["text"][3:6])
    assert not set(copies["text"]) & set(TEXTS)


def test_a_model_without_a_trained_masked_lm_head_is_refused(tmp_path):
    torch.manual_seed(0)
    width = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    BertModel(BertConfig(vocab_size=len(tokenizer()), **width)).save_pretrained(tmp_path / "encoder")
    tokenizer().save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match="no trained masked-LM head.*cls.predictions"):
        load_masked_lm(str(tmp_path / "encoder"))
    transformers.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "vit")  # fmt: skip
    with pytest.raises(ValueError, match="cannot load as a masked LM"):
        load_masked_lm(str(tmp_path / "vit"))
    for bad in ({"rate": 0.0}, {"rate": 1.5}, {"candidates": 0}, {"copies": 2.5}):
        with pytest.raises(ValueError, match="word replacement"):
            WordReplacement(**bad)


def test_the_set_is_saved_once_and_reused_while_texts_model_and_settings_match(tmp_path, monkeypatch):
    folder, saved = write_masked_lm(tmp_path / "mlm"), str(tmp_path / "copies")
    data = Dataset.from_dict({"text": TEXTS})
    settings = WordReplacement(copies=2, seed=5)
    first = build_word_replacement(data, "text", folder, settings, saved)
    with open(os.path.join(saved, RECORD_NAME)) as handle:
        assert json.load(handle)["settings"]["copies"] == 2
    assert not [name for name in os.listdir(tmp_path) if ".saving-" in name]

    def no_masked_lm(*args, **kwargs):
        raise AssertionError("the saved set should have been reused")

    with monkeypatch.context() as patch:
        patch.setattr(augmentation, "replacement_candidates", no_masked_lm)
        assert build_word_replacement(data, "text", folder, settings, saved)["text"] == first["text"]
        for changed in (
            (data, WordReplacement(copies=2, seed=6)),  # other settings
            (Dataset.from_dict({"text": TEXTS[:2]}), settings),  # other texts
        ):
            with pytest.raises(AssertionError, match="should have been reused"):
                build_word_replacement(changed[0], "text", folder, changed[1], saved)
    masked_lm(seed=1).save_pretrained(folder)  # other weights: rebuilt, and the new set replaces the old
    rebuilt = build_word_replacement(data, "text", folder, settings, saved)
    assert rebuilt["text"] != first["text"]
    assert build_word_replacement(data, "text", folder, settings, saved)["text"] == rebuilt["text"]


def test_the_teacher_sees_exactly_the_students_word_replaced_inputs(tmp_path):
    tok = tokenizer()
    labeled = Dataset.from_dict({"text": TEXTS, "label": [1, 0, 1]}).cast_column("label", ClassLabel(names=["n", "p"]))
    copies = word_replacement(labeled, "text", masked_lm(), tok, WordReplacement(copies=3))
    train = with_transfer_set(labeled, copies).map(lambda row: tok(row["text"]), remove_columns=["text"])
    vocabulary = {"vocab_size": len(tok)}
    student = bert_classifier(seed=2, layers=2, width=8, heads=2, **vocabulary)
    teacher = bert_classifier(seed=1, **vocabulary)
    seen = {"student": [], "teacher": []}
    for name, model in (("student", student), ("teacher", teacher)):
        model.register_forward_pre_hook(
            lambda _module, _args, kwargs, name=name: seen[name].append(kwargs["input_ids"].clone()), with_kwargs=True
        )
    losses = {"hard_label": {"weight": 1.0}, "soft_target": {"weight": 1.0, "temperature": 2.0}}
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, losses, max_steps=3, per_device_train_batch_size=4),  # one epoch of 12
        train_dataset=train,
        processing_class=tok,
    )
    trainer.train()
    assert len(seen["teacher"]) == len(seen["student"]) == 3
    assert all(torch.equal(a, b) for a, b in zip(seen["teacher"], seen["student"], strict=True))
    copy_ids = {tuple(tok(text).input_ids) for text in copies["text"]} - {tuple(tok(text).input_ids) for text in TEXTS}
    rows = {tuple(row[row != tok.pad_token_id].tolist()) for batch in seen["teacher"] for row in batch}
    assert copy_ids <= rows  # every augmented copy reached both models

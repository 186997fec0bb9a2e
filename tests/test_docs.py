"""Every Python snippet of the README and of docs/ runs, page by page, on tiny models: the docs cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    TARGET_LEN,
    bart,
    bert_classifier,
    causal_lm,
    pad_right,
    prompt_completion_dataset,
    seq2seq_dataset,
    text_dataset,
)
from pipeline_assets import write_encoder_teacher, write_masked_lm_teacher, write_sentiment_dataset, write_tokenizer

from hf_distill import DistillationConfig, DistillationTrainer

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def snippets(page: Path) -> list[str]:
    return SNIPPET.findall(page.read_text(encoding="utf-8"))


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def exact_match(prediction) -> dict[str, float]:
    """Share of generated sequences whose first tokens equal the target's (generation starts at the decoder start)."""
    length = min(prediction.predictions.shape[1] - 1, TARGET_LEN, 3)
    same = prediction.predictions[:, 1 : 1 + length] == prediction.label_ids[:, :length]
    return {"exact_match": float(same.all(1).mean())}


def namespace(folder: Path) -> dict:
    """What the pages' snippets assume: the names of the README's example, on tiny models and data."""
    return {
        "DistillationConfig": DistillationConfig,
        "DistillationTrainer": DistillationTrainer,
        "student": bert_classifier(1, layers=2),
        "other_student": bert_classifier(2, layers=2),
        "teacher": bert_classifier(0, layers=4, width=32),
        "train": text_dataset(32),
        "test": text_dataset(16, seed=1),
        "tokenizer": write_tokenizer(str(folder / "tokenizer")),
        "accuracy": accuracy,
        "seq2seq_student": bart(1, layers=1),
        "seq2seq_teacher": bart(0, layers=2),
        "pairs": seq2seq_dataset(8),
        "exact_match": exact_match,
        "lm_student": causal_lm(2),
        "lm_teacher": causal_lm(1, layers=3),
        "prompts": prompt_completion_dataset(16),
        "pad_right": pad_right,
        "encoder_dir": write_encoder_teacher(str(folder / "encoder")),
        "reviews_dir": write_sentiment_dataset(str(folder / "reviews")),
        "mlm_dir": write_masked_lm_teacher(str(folder / "mlm")),
    }


def test_every_page_has_python_snippets_and_the_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for page in PAGES:
        if page.parent.name == "docs" and page.name != "README.md":
            assert f"({page.name})" in index, f"docs/README.md does not link {page.name}"
    with_code = [page.name for page in PAGES if snippets(page)]
    assert len(with_code) >= 9, with_code


@pytest.mark.parametrize("page", [page for page in PAGES if snippets(page)], ids=lambda page: page.name)
def test_the_snippets_of_a_page_run_in_order(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets write "out", "runs/..." where they stand
    names = namespace(tmp_path)
    for number, code in enumerate(snippets(page), start=1):
        try:
            exec(compile(code, f"{page.name}, snippet {number}", "exec"), names)
        except Exception as error:
            raise AssertionError(f"{page.relative_to(ROOT)} snippet {number} fails: {error!r}\n{code}") from error


def test_every_relative_link_of_the_docs_points_at_a_file_and_heading():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#([^)]*))?\)", page.read_text(encoding="utf-8")):
            path, anchor = page.parent / target[0], target[1]
            if not path.exists():
                broken.append(f"{page.name} -> {target[0]}")
            elif anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", path.read_text(encoding="utf-8"), re.MULTILINE)
                slugs = {re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-") for heading in headings}
                if anchor not in slugs:
                    broken.append(f"{page.name} -> {target[0]}#{anchor}")
    assert broken == []

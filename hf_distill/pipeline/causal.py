"""The causal-LM task: prompts and completions, the letters task that ships here, and scoring generated answers.

    hf-distill --task causal-lm --dataset offline:letters --processor offline:letters \\
        --teacher_config '{"model_type": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 32}'

Data: a data set with a prompt column and a completion column (TRL's prompt-completion form; `--prompt_column`,
`--completion_column`). Each example is the prompt, tokenized with the tokenizer's special tokens, then the
completion and the end-of-sequence token; the prompt's labels are -100, so the prompt is what precedes the first
label, which is how on-policy distillation finds it (`hf_distill.rollouts`).

Held-out generations are scored by `--generation_metric`:
- a checker: `letters` (below), or `module:function`, a function `(prompt, completion) -> bool` of the texts;
- `exact_match`: the completion, stripped, equals the reference completion, stripped;
- `perplexity`: nothing is generated; the accuracy is then the share of reference completion tokens each model
  ranks first (teacher-forced).
By default, the data set's own checker when it ships one (`offline:letters`), else `exact_match`. The report's
accuracy is the share of held-out prompts whose greedy completion passes; its sampled accuracy the share whose
completion sampled at temperature 1 from the full distribution (one sample a prompt, from a fixed seed, so every model
of a run is scored on the same random stream) passes: where greedy answers are all valid, the sampled ones still
tell the models apart, as GKD and MiniLLM score them. The perplexity of the reference completions (teacher-forced) is
reported beside them.

The letters task (`--dataset offline:letters`, `--processor offline:letters`): a prompt of 8 distinct letters of a
16-letter alphabet in alphabetical order, then `=`; a valid completion lists the same 8 letters, each once, in any
order. The training completions are random orders, so the teacher's distribution is multi-modal, and which letters
may come next depends on those the model has already written. The tokenizer (one token per letter, `=`, and the
special tokens) is built here with `tokenizers`.
"""

from __future__ import annotations

import importlib
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ..randomness import preserved_random_state
from ..rollouts import cut_after_end, left_padded, split_prompts

LETTERS = [chr(ord("a") + index) for index in range(16)]
CHOSEN = 8
#: `offline:letters` sizes: training and held-out examples.
LETTERS_SIZES = {"train": 20_000, "validation": 500}
EXACT_MATCH, PERPLEXITY = "exact_match", "perplexity"
#: Generation settings for scoring: greedy, up to this many new tokens unless `--eval_max_new_tokens` says otherwise.
EVAL_MAX_NEW_TOKENS = 64
#: The seed of the sampled completions scored (the same for every model, so they share the random stream).
EVAL_SAMPLING_SEED = 0


def letters_examples(count: int, seed: int) -> Dataset:
    """`count` letters-task examples: prompts of 8 sorted letters then `=`, completions a random order of them."""
    generator = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(count):
        chosen = sorted(torch.randperm(len(LETTERS), generator=generator)[:CHOSEN].tolist())
        order = [chosen[int(index)] for index in torch.randperm(CHOSEN, generator=generator)]
        prompts.append(" ".join(LETTERS[index] for index in chosen) + " =")
        completions.append(" ".join(LETTERS[index] for index in order))
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def letters() -> DatasetDict:
    """The letters task's splits (fixed: the same examples on every machine)."""
    return DatasetDict(
        {name: letters_examples(count, seed) for seed, (name, count) in enumerate(LETTERS_SIZES.items())}
    )


def letters_valid(prompt: str, completion: str) -> bool:
    """Whether `completion` lists the prompt's letters, each exactly once."""
    wanted = [token for token in prompt.split() if token != "="]
    answer = completion.split()
    return len(answer) == len(wanted) and set(answer) == set(wanted)


def letters_tokenizer_dir() -> str:
    """A folder holding the letters task's tokenizer: one token per letter and `=` (written once per machine)."""
    return _letters_tokenizer("letters-tokenizer-v1", ["=", *LETTERS], characters=False)


def letters_characters_tokenizer_dir() -> str:
    """A folder holding a character-level tokenizer of the letters task's text (every letter, `=` and the space one
    token each; the same special tokens as `letters_tokenizer_dir`'s): another tokenizer of the same text, for
    distilling across tokenizers (written once per machine)."""
    return _letters_tokenizer("letters-characters-tokenizer-v1", [" ", "=", *LETTERS], characters=True)


def _letters_tokenizer(name: str, tokens: list[str], characters: bool) -> str:
    """The folder `name` holding a word-level tokenizer of `tokens` after the special tokens, each text split at
    white space or (`characters`) into characters, BOS first; written atomically, once per machine."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    from ..saving import staged_folder  # noqa: PLC0415

    folder = os.path.join(tempfile.gettempdir(), "hf_distill-offline", name)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return folder
    special = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    vocabulary = {token: index for index, token in enumerate([*special, *tokens])}
    model = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    if characters:
        model.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        model.decoder = decoders.Fuse()
    else:
        model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with staged_folder(folder, last=("tokenizer.json",)) as staging:
        tokenizer.save_pretrained(staging)
    return folder


#: Checkers by name: `(prompt, completion) -> bool`.
CHECKERS: dict[str, Callable[[str, str], bool]] = {"letters": letters_valid}
#: The checker each offline data set ships.
DATASET_METRICS = {"offline:letters": "letters"}


def metric_name(metric: str | None, dataset: str) -> str:
    """What the held-out generations are scored by: `metric`, or the data set's own checker, or exact match."""
    return metric or DATASET_METRICS.get(dataset, EXACT_MATCH)


def scorer(metric: str) -> Callable[[str, str, str], bool] | None:
    """`score(prompt, reference, completion)` under `metric` (None for perplexity alone)."""
    if metric == PERPLEXITY:
        return None
    if metric == EXACT_MATCH:
        return lambda prompt, reference, completion: completion.strip() == reference.strip()
    if metric in CHECKERS:
        check = CHECKERS[metric]
    elif ":" in metric:
        module, _, name = metric.partition(":")
        try:
            check = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as error:
            raise ValueError(
                f"--generation_metric {metric!r}: cannot import {name} from {module} ({error}); give "
                "module:function of a function (prompt, completion) -> bool that Python can import"
            ) from None
        if not callable(check):
            raise ValueError(f"--generation_metric {metric!r} names a {type(check).__name__}, not a function")
    else:
        raise ValueError(
            f"--generation_metric {metric!r} is not a metric: give {EXACT_MATCH}, {PERPLEXITY}, "
            f"{', '.join(CHECKERS)} or module:function (a function (prompt, completion) -> bool)"
        )
    return lambda prompt, reference, completion: bool(check(prompt, completion))


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """A causal-LM run needs the tokenizer's end-of-sequence token (completions end with it) and a padding token."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no end-of-sequence token, which every completion ends with: use a tokenizer that has "
            "one (--processor), or set its eos_token"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as causal LMs are usually padded; padding is masked everywhere


def tokenize(
    rows: dict[str, list[str]], tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_length: int
) -> dict[str, list[list[int]]]:
    """Prompt (with the tokenizer's special tokens) + completion + end-of-sequence token; labels -100 over the
    prompt. The completion is cut to fit `max_length`; a prompt that leaves no room for one token is an error."""
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt_text, completion_text in zip(rows[prompt], rows[completion], strict=True):
        prompt_ids = tokenizer(prompt_text)["input_ids"]
        completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt_ids) >= max_length:
            raise ValueError(
                f"a prompt of {len(prompt_ids)} tokens leaves no room for its completion within max_length "
                f"{max_length}: raise --max_length, or shorten the prompts ({prompt_text[:60]!r}...)"
            )
        completion_ids = completion_ids[: max_length - len(prompt_ids)]
        ids = prompt_ids + completion_ids
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append([-100] * len(prompt_ids) + completion_ids)
    return out


@torch.no_grad()
def evaluate_generation(
    model: nn.Module,
    eval_split: Dataset,
    collator: Any,
    tokenizer: PreTrainedTokenizerBase,
    references: Dataset,
    metric: str,
    batch_size: int,
    max_new_tokens: int,
    name: str = "model",
) -> dict[str, float]:
    """`accuracy`: the share of held-out prompts whose greedy completion passes `metric` (under `perplexity`,
    the share of reference completion tokens the model ranks first); `sampled_accuracy` (not under `perplexity`):
    the share whose completion sampled at temperature 1 passes; `perplexity`: exp of the mean cross-entropy of the
    reference completion tokens. `references` holds the prompt and completion texts of `eval_split`'s examples, in
    its order."""
    score = scorer(metric)
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    passed = {"greedy": 0, "sampled": 0}
    log_likelihood, tokens, hits = 0.0, 0, 0
    common = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "use_cache": True}  # fmt: skip
    configs = {
        "greedy": GenerationConfig(do_sample=False, **common),
        "sampled": GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, **common),
    }
    prompt_column, completion_column = references.column_names[:2]
    try:
        for start in tqdm(range(0, len(eval_split), batch_size), desc=f"Evaluating the {name}", leave=False):
            end = min(start + batch_size, len(eval_split))
            batch = {
                key: value.to(device) for key, value in collator([eval_split[i] for i in range(start, end)]).items()
            }
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            counted = labels != -100
            log_probs = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            log_likelihood += float(log_probs[counted].sum())
            tokens += int(counted.sum())
            hits += int((logits[:, :-1].argmax(-1) == labels)[counted].sum())
            if score is None:
                continue
            input_ids, attention_mask = left_padded(split_prompts(batch), tokenizer.pad_token_id, device)
            for how, config in configs.items():
                with preserved_random_state():
                    torch.manual_seed(EVAL_SAMPLING_SEED + start)  # per batch: the same stream for every model
                    sequences = model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                    )
                for offset, row in enumerate(sequences[:, input_ids.shape[1] :]):
                    text = tokenizer.decode(cut_after_end(row, [tokenizer.eos_token_id]), skip_special_tokens=True)
                    example = references[start + offset]
                    passed[how] += score(example[prompt_column], example[completion_column], text)
    finally:
        model.train(training)
    if tokens == 0:
        raise ValueError("the held-out split has no completion token to score")
    perplexity = math.exp(-log_likelihood / tokens)
    if score is None:
        return {"accuracy": hits / tokens, "perplexity": perplexity}
    return {
        "accuracy": passed["greedy"] / len(eval_split),
        "sampled_accuracy": passed["sampled"] / len(eval_split),
        "perplexity": perplexity,
    }

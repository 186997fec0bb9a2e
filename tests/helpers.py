"""Tiny random models and datasets shared by the tests: offline, CPU, seconds each."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import NoReturn

import torch
from datasets import Dataset
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

from hf_distill import DistillationConfig
from hf_distill.rollouts import GenerateBackend

VOCAB = 64
SEQ_LEN = 12
TARGET_LEN = 8
IMAGE = 32


def bert_config(layers: int = 4, width: int = 16, heads: int = 4, **overrides) -> BertConfig:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * width,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    settings.update(overrides)
    return BertConfig(**settings)


def bert_classifier(seed: int = 0, **config) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(**config))


def bert_masked_lm(seed: int = 0, **config) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(bert_config(**config))


def bert_qa(seed: int = 0, layers: int = 4) -> BertForQuestionAnswering:
    torch.manual_seed(seed)
    return BertForQuestionAnswering(bert_config(layers=layers))


def vit_classifier(seed: int = 0, **overrides) -> ViTForImageClassification:
    torch.manual_seed(seed)
    settings = dict(
        image_size=IMAGE,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    return ViTForImageClassification(ViTConfig(**settings))


def mobilenet_classifier(seed: int = 0, **overrides) -> MobileNetV2ForImageClassification:
    torch.manual_seed(seed)
    settings = dict(image_size=IMAGE, num_channels=3, depth_multiplier=0.35, num_labels=3, classifier_dropout_prob=0.0)
    settings.update(overrides)
    return MobileNetV2ForImageClassification(MobileNetV2Config(**settings))


def text_dataset(size: int = 32, seed: int = 0, labels: bool = True) -> Dataset:
    """Padded token sequences of varying length; the label depends on the first token, so it can be learnt."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (size, SEQ_LEN), generator=generator)
    lengths = torch.randint(4, SEQ_LEN + 1, (size,), generator=generator)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask  # pad id 0
    columns = {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist()}
    if labels:
        columns["label"] = (input_ids[:, 0] % 2).tolist()
    return Dataset.from_dict(columns)


def qa_dataset(size: int = 32, seed: int = 0) -> Dataset:
    """Padded sequences with an answer span inside each one's real tokens."""
    data = text_dataset(size, seed, labels=False)
    lengths = torch.tensor(data["attention_mask"]).sum(1)
    generator = torch.Generator().manual_seed(seed)
    start = (torch.rand(size, generator=generator) * (lengths - 1)).long()
    end = start + (torch.rand(size, generator=generator) * (lengths - start)).long()
    return data.add_column("start_positions", start.tolist()).add_column("end_positions", end.tolist())


def masked_lm_dataset(size: int = 32, seed: int = 0) -> Dataset:
    """Padded sequences with fixed masked-LM labels (-100 off the masked positions), for deterministic runs."""
    generator = torch.Generator().manual_seed(seed)
    dataset = text_dataset(size, seed, labels=False)
    input_ids = torch.tensor(dataset["input_ids"])
    attention_mask = torch.tensor(dataset["attention_mask"])
    chosen = (torch.rand(input_ids.shape, generator=generator) < 0.3) & attention_mask.bool()
    chosen[:, 1] = True  # at least one masked token per sequence
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    masked = torch.where(chosen, torch.full_like(input_ids, 4), input_ids)  # 4 plays [MASK]
    return Dataset.from_dict(
        {"input_ids": masked.tolist(), "attention_mask": attention_mask.tolist(), "labels": labels.tolist()}
    )


def image_dataset(size: int = 24, seed: int = 0, num_labels: int = 3) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(size, 3, IMAGE, IMAGE, generator=generator)
    labels = torch.randint(0, num_labels, (size,), generator=generator)
    return Dataset.from_dict({"pixel_values": pixels.tolist(), "label": labels.tolist()}).with_format("torch")


def bart(seed: int, layers: int = 2, width: int = 32, **overrides) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=VOCAB,
        d_model=width,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=2 * width,
        decoder_ffn_dim=2 * width,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    settings.update(overrides)
    return BartForConditionalGeneration(BartConfig(**settings))


def t5(seed: int, layers: int = 2, width: int = 32) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, d_model=width, d_ff=2 * width, d_kv=8, num_heads=2, num_layers=layers,
                    dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    return T5ForConditionalGeneration(T5Config(**settings))


def seq2seq_dataset(size: int = 16, seed: int = 0, padded: bool = True) -> Dataset:
    """Sources padded to one length, and targets of 2..TARGET_LEN tokens padded with -100 (or left ragged)."""
    data = text_dataset(size, seed, labels=False)
    generator = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(5, VOCAB, (size, TARGET_LEN), generator=generator)
    lengths = torch.randint(2, TARGET_LEN + 1, (size,), generator=generator)
    labels = [row[:length] + ([-100] * (TARGET_LEN - length) if padded else []) for row, length in
              zip(targets.tolist(), lengths.tolist(), strict=True)]  # fmt: skip
    return data.add_column("labels", labels)


#: The tiny causal LMs' special tokens: padding, start and end of sequence.
LM_PAD, LM_BOS, LM_EOS = 0, 1, 2


def causal_lm(seed: int, layers: int = 2, width: int = 16) -> GPT2LMHeadModel:
    """A small GPT-2 without dropout, whose config names its padding and end-of-sequence tokens."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, n_positions=64, n_embd=width, n_layer=layers, n_head=2)
    tokens = dict(bos_token_id=LM_BOS, eos_token_id=LM_EOS, pad_token_id=LM_PAD)
    return GPT2LMHeadModel(GPT2Config(**settings, **tokens, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def prompt_completion_dataset(size: int = 16, seed: int = 0) -> Dataset:
    """Prompts of 2-5 tokens, completions of 4 tokens and an end-of-sequence token, the prompts labeled -100."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(size):
        length = int(torch.randint(2, 6, (1,), generator=generator))
        prompt = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        completion = torch.randint(3, VOCAB, (4,), generator=generator).tolist() + [LM_EOS]
        ids = prompt + completion
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * length + completion})
    return Dataset.from_list(rows)


def pad_right(rows: list[dict]) -> dict[str, torch.Tensor]:
    """A causal-LM collator: each micro-batch right-padded to its longest row (labels with -100)."""
    length = max(len(row["input_ids"]) for row in rows)
    return {
        key: torch.tensor([row[key] + [fill] * (length - len(row[key])) for row in rows])
        for key, fill in (("input_ids", LM_PAD), ("attention_mask", 0), ("labels", -100))
    }


class PromptEcho:
    """A rollout backend that samples nothing: each prompt's completion is its last (length mod 3) + 1 tokens
    reversed, then the end-of-sequence token. Completions of different lengths, the same in any batch and process."""

    def generate(self, model, input_ids, attention_mask, generation_config, synced_gpus):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = ids[mask.bool()]
            rows.append(prompt.flip(0)[: len(prompt) % 3 + 1].tolist() + [LM_EOS])
        width = max(len(row) for row in rows)
        new = torch.tensor([row + [LM_PAD] * (width - len(row)) for row in rows], device=input_ids.device)
        return torch.cat([input_ids, new], dim=1)


class UnevenLengths(GenerateBackend):
    """Greedy generation of 1 new token on the first process and 4 on the second (no end token before), counting the
    student's forward passes: under synced generation the first keeps running them until the second is done."""

    def generate(self, model, input_ids, attention_mask, generation_config, synced_gpus):
        rank = torch.distributed.get_rank()
        config = GenerationConfig(**generation_config.to_dict())
        config.do_sample, config.max_new_tokens, config.min_new_tokens = False, 1 + 3 * rank, 1 + 3 * rank
        forwards = []
        hook = model.register_forward_hook(lambda *_: forwards.append(1))
        try:
            sequences = super().generate(model, input_ids, attention_mask, config, synced_gpus)
        finally:
            hook.remove()
        new = sequences.shape[1] - input_ids.shape[1]
        print(f"GENERATED rank {rank} new {new} forwards {len(forwards)} synced {synced_gpus}", flush=True)
        return sequences


def config(tmp_path, losses: dict | None = None, config_class=DistillationConfig, **overrides) -> DistillationConfig:
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if losses is not None:
        settings["losses"] = losses
    settings.update(overrides)
    return config_class(**settings)


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on now, for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_nodes(script: str, *arguments: str) -> list[str]:
    """`torchrun --nnodes 2 --node_rank 0|1` of the test script `script`, one process each, meeting at 127.0.0.1 as
    two machines would at the first one's address; what each printed (each must end with status 0)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    environment = {**os.environ, "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                "torchrun",
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                os.path.join(tests, script),
                *arguments,
            ],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    printed = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
        printed.append(stdout)
    return printed


def end_launched_process() -> NoReturn:
    """End a torchrun worker whose results are written, without the interpreter's teardown.

    The Trainer keeps gloo's process group alive to the end (a plain `transformers.Trainer` alike: its worker
    threads survive `destroy_process_group`), and a worker thread that releases a finished collective's tensors
    while the interpreter is being torn down needs the GIL of a dying interpreter: the process aborts ("terminate
    called without an active exception") after the run has finished. Rare, and likelier on a loaded machine.
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

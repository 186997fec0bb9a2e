"""DistillationConfig parses like any TrainingArguments: command line (JSON) and YAML."""

import json

import torch
import yaml
from transformers import HfArgumentParser

from hf_distill import DistillationConfig

LOSSES = {"hard_label": {"weight": 0.5}, "soft_target": {"weight": 0.5, "temperature": 5.0, "divergence": "jsd"}}


def test_losses_parse_from_the_command_line_as_json(tmp_path):
    parser = HfArgumentParser(DistillationConfig)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--losses", json.dumps(LOSSES), "--learning_rate", "3e-4"]
    )
    assert args.losses == LOSSES
    assert args.learning_rate == 3e-4


def test_losses_parse_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "losses": LOSSES, "num_train_epochs": 2}))
    (args,) = HfArgumentParser(DistillationConfig).parse_yaml_file(str(path))
    assert args.losses == LOSSES
    assert args.num_train_epochs == 2


def test_defaults_and_help_text():
    args = DistillationConfig(output_dir="x")
    assert args.losses == {"hard_label": {"weight": 0.5}, "soft_target": {"weight": 0.5, "temperature": 2.0}}
    assert args.teacher_trust_remote_code is False
    help_text = HfArgumentParser(DistillationConfig).format_help()
    assert "soft_target" in help_text and "trust" in help_text
    # The config round-trips through the JSON the Trainer logs.
    assert json.loads(args.to_json_string())["losses"] == args.losses


def test_teacher_weights_take_the_students_half_precision_on_a_gpu_only():
    from types import SimpleNamespace

    from hf_distill.teacher import teacher_dtype

    def args(device, bf16=False, fp16=False):
        return SimpleNamespace(device=torch.device(device), bf16=bf16, fp16=fp16)

    assert teacher_dtype(args("cuda", bf16=True)) == torch.bfloat16
    assert teacher_dtype(args("cuda", fp16=True)) == torch.float16
    assert teacher_dtype(args("cuda")) is None
    assert teacher_dtype(args("cpu", bf16=True)) is None

"""Supervised KD against SFT on the letters task in a plain PyTorch loop, without hf_distill: a check of
`on_policy.py`'s finding that forward KL to the teacher on the data's completions trains this student less well
than the data's labels do, at the same steps and learning rate.

    python benchmarks/kd_plain_loop.py --seed 1 --learning-rate 2e-3

The teacher, the warm-up and the data are `on_policy.py`'s (the teacher is trained here unless `--teacher` names
a file that `on_policy.py --teachers` kept). Each arm: AdamW at the given rate, 5% warm-up then linear decay,
gradients clipped at norm 1, 300 steps of 32 examples drawn with one fixed generator; the loss is the mean over
completion tokens of KL(teacher || student) (`kd`) or of the cross-entropy of the data's tokens (`sft`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import on_policy as letters  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--teacher", help="a teacher file kept by on_policy.py --teachers (else trained here)")
    options = parser.parse_args()
    seed, tok = options.seed, letters.tokenizer()
    train = letters.examples(20_000, seed, tok)
    held_out = letters.examples(200, 10_000 + seed, tok)
    teacher = letters.gpt2(4, 128, 4, tok, seed)
    with tempfile.TemporaryDirectory() as folder:
        if options.teacher:
            saved = torch.load(options.teacher, weights_only=True)
            teacher.load_state_dict(saved["weights"] if "weights" in saved else saved)
        else:
            letters.plain_training(teacher, train, 1500, 1e-3, seed, os.path.join(folder, "teacher"))
        teacher.eval()
        student = letters.gpt2(2, 128, 4, tok, seed + 1)
        letters.plain_training(student, train, 150, 1e-3, seed, os.path.join(folder, "warmup"))
    warmed = {key: value.clone() for key, value in student.state_dict().items()}
    data = letters.examples(9600, 20_000 + seed, tok)
    warmup = max(1, options.steps // 20)
    for arm in ("kd", "sft"):
        student.load_state_dict(warmed)
        student.train()
        optimizer = torch.optim.AdamW(student.parameters(), lr=options.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: min(1.0, (step + 1) / warmup) * max(0.0, (options.steps - step) / (options.steps - warmup)),
        )
        generator = torch.Generator().manual_seed(0)
        for _ in range(options.steps):
            rows = torch.randint(0, len(data), (32,), generator=generator).tolist()
            batch = letters.collate([data[index] for index in rows])
            logits = student(input_ids=batch["input_ids"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            counted = labels != -100
            if arm == "kd":
                with torch.no_grad():
                    log_p = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits[:, :-1], -1)
                loss = (log_p.exp() * (log_p - torch.log_softmax(logits, -1))).sum(-1)[counted].mean()
            else:
                loss = torch.nn.functional.cross_entropy(logits[counted], labels[counted])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        print(arm, json.dumps(letters.score(student, teacher, held_out, held_out, tok, seed)), flush=True)


if __name__ == "__main__":
    main()

"""Distilling encoder-decoder students that are judged by what they generate (ROUGE, BLEU, WER...).

    args = DistillationSeq2SeqConfig(output_dir="out", predict_with_generate=True, generation_max_length=64,
                                     losses={"soft_target": {"weight": 1.0}, "hard_label": {"weight": 1.0}})
    trainer = DistillationSeq2SeqTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                         eval_dataset=test, compute_metrics=rouge)

`DistillationSeq2SeqTrainer` is a [`DistillationTrainer`] and a [`~transformers.Seq2SeqTrainer`]: training is the
former's, and with `predict_with_generate` its evaluation reports the distillation terms of one teacher-forced
pass (as `DistillationTrainer` does) and hands `compute_metrics` the student's generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from .config import DistillationConfig
from .trainer import DistillationTrainer


@dataclass
class DistillationSeq2SeqConfig(DistillationConfig, Seq2SeqTrainingArguments):
    r"""
    [`DistillationConfig`] plus the generation settings of [`~transformers.Seq2SeqTrainingArguments`]
    (`predict_with_generate`, `generation_max_length`, `generation_num_beams`, `generation_config`,
    `sortish_sampler`), for a [`DistillationSeq2SeqTrainer`].
    """


class DistillationSeq2SeqTrainer(DistillationTrainer, Seq2SeqTrainer):
    """A [`DistillationTrainer`] whose evaluation can generate, as [`~transformers.Seq2SeqTrainer`]'s does.

    Args:
        model, teacher_model, **kwargs: as for [`DistillationTrainer`].
        args ([`DistillationSeq2SeqConfig`]): the losses and the generation settings.

    With `args.predict_with_generate`, each evaluation batch runs the student (and the teacher) once with the
    decoder fed the labels, which gives `eval_loss` and every `eval_<term>` exactly as without generation, then
    `generate` on the inputs alone; `compute_metrics` receives the generated token ids as predictions and the
    labels (-100 where there is no token). `evaluate()` and `predict()` take `generate`'s keyword arguments
    (`max_length`, `num_beams`...) as `Seq2SeqTrainer`'s do. Without it, evaluation is `DistillationTrainer`'s.
    """

    def __init__(self, model=None, teacher_model=None, args: DistillationSeq2SeqConfig | None = None, **kwargs: Any):
        args = DistillationSeq2SeqConfig() if args is None else args
        if not isinstance(args, DistillationSeq2SeqConfig):
            raise TypeError(
                f"DistillationSeq2SeqTrainer takes a DistillationSeq2SeqConfig as args, not {type(args).__name__}: "
                "it adds predict_with_generate and the other generation settings to DistillationConfig"
            )
        super().__init__(model=model, teacher_model=teacher_model, args=args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """The distillation terms of a teacher-forced pass, and with `predict_with_generate` the generated tokens."""
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        loss, _, _ = super().prediction_step(model, inputs, True, ignore_keys)
        labels = inputs.get("labels")
        generation_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        decoder_inputs = inputs.get("decoder_input_ids")
        if labels is not None and decoder_inputs is not None and decoder_inputs.shape == labels.shape:
            # Decoder inputs made from the labels (DataCollatorForSeq2Seq): generation must start afresh.
            generation_inputs.pop("decoder_input_ids")
            generation_inputs.pop("decoder_attention_mask", None)
        # Without labels, Seq2SeqTrainer's step generates and computes no second loss.
        _, tokens, _ = Seq2SeqTrainer.prediction_step(
            self, model, generation_inputs, False, ignore_keys=ignore_keys, **gen_kwargs
        )
        return loss, tokens, labels

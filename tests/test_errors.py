"""Bad input fails before the first step, with an error that names the fix."""

import pytest
from helpers import bert_classifier, bert_masked_lm, config, mobilenet_classifier, text_dataset, vit_classifier
from transformers import TrainingArguments

from hf_distill import DistillationConfig, DistillationTrainer


def build(tmp_path, student, teacher, losses, **kwargs):
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, losses), train_dataset=text_dataset(), **kwargs
    )


def test_unknown_loss_lists_the_registered_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown loss 'soft_targets'.*registered losses: attention, .*soft_target"):
        config(tmp_path, {"soft_targets": {"weight": 1.0}})


@pytest.mark.parametrize(
    "losses, message",
    [
        ({"soft_target": {"weight": -1.0}}, r"weight'\] must be a number >= 0"),
        ({"soft_target": {"temperature": 0}}, "temperature must be a number > 0"),
        ({"soft_target": {"temprature": 2.0}}, r"no option 'temprature'; valid options: weight, type, temperature"),
        ({"soft_target": {"divergence": "kl"}}, "divergence must be one of"),
        ({"soft_target": {"divergence": "jsd", "beta": 0.3}}, "soft_target beta is an option of the generalized_jsd"),
        ({"soft_target": {"divergence": "skew_kl", "alpha": 1.0}}, r"soft_target skew_kl alpha must be a number in"),
        ({"soft_target": {"divergence": "generalized_jsd", "beta": "half"}}, "beta must be a number in"),
        ({"hidden_state": {"layer_map": [[1, 2, 3]]}}, r"\[student_layer, teacher_layer\] pair"),
        ({"hidden_state": {"layer_map": "1:2"}}, "non-empty list"),
        ({"attention": {"heads": "relations", "distance": "mse"}}, "relations are compared with KL"),
        ({"feature_map": {}}, "needs 'student_module'"),
        ({}, "at least one loss"),
        ({"loss": {"type": "soft_target"}}, "log key"),
    ],
)
def test_malformed_losses_are_refused_by_the_config(tmp_path, losses, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, losses)


def test_plain_training_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="DistillationConfig"):
        DistillationTrainer(
            model=bert_classifier(), teacher_model=bert_classifier(), args=TrainingArguments(output_dir=str(tmp_path))
        )


def test_vocabulary_mismatch_for_token_level_soft_targets(tmp_path):
    with pytest.raises(ValueError, match="vocabulary has 80 entries and the student's 64.*teacher_processing_class"):
        build(tmp_path, bert_masked_lm(layers=2), bert_masked_lm(vocab_size=80), {"soft_target": {}})


def test_different_label_sets(tmp_path):
    with pytest.raises(ValueError, match="3 labels.*2.*same label set"):
        build(tmp_path, bert_classifier(num_labels=3), bert_classifier(), {"soft_target": {}})
    student = bert_classifier(id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    teacher = bert_classifier(id2label={0: "pos", 1: "neg"}, label2id={"pos": 0, "neg": 1})
    with pytest.raises(ValueError, match="order their labels differently.*id2label"):
        build(tmp_path, student, teacher, {"soft_target": {}})


def test_layer_map_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="teacher layer 7.*layers 0..4.*fix the map"):
        build(tmp_path, bert_classifier(layers=2), bert_classifier(), {"hidden_state": {"layer_map": [[1, 7]]}})
    with pytest.raises(ValueError, match="student layer -4"):
        build(tmp_path, bert_classifier(layers=2), bert_classifier(), {"hidden_state": {"layer_map": [[-4, 1]]}})


def test_widths_that_differ_without_projection(tmp_path):
    with pytest.raises(ValueError, match="8 wide and the teacher 16.*'projection': true"):
        build(tmp_path, bert_classifier(width=8, heads=2), bert_classifier(), {"hidden_state": {"projection": False}})


def test_attention_loss_on_models_that_return_no_maps(tmp_path):
    # transformers' default sdpa attention returns an empty attentions tuple: refuse it up front.
    with pytest.raises(ValueError, match="attn_implementation='sdpa'.*'eager'"):
        build(tmp_path, bert_classifier(layers=2), bert_classifier(), {"attention": {}})
    with pytest.raises(ValueError, match="student has 2 attention heads and the teacher 4.*'heads': 'average'"):
        build(
            tmp_path,
            bert_classifier(heads=2, attn_implementation="eager"),
            bert_classifier(attn_implementation="eager"),
            {"attention": {"heads": "match"}},
        )


def test_attention_maps_missing_at_run_time_fail_loudly(tmp_path):
    trainer = build(
        tmp_path,
        bert_classifier(layers=2, attn_implementation="eager"),
        bert_classifier(attn_implementation="eager"),
        {"attention": {"heads": "average"}},
    )
    trainer.teacher_model.set_attn_implementation("sdpa")  # switched after the checks, e.g. by user code
    with pytest.raises(RuntimeError, match="teacher returned no attention maps"):
        trainer.train()


def test_hidden_state_loss_on_a_cnn_points_to_feature_map(tmp_path):
    with pytest.raises(ValueError, match="feature_map or relation"):
        DistillationTrainer(
            model=mobilenet_classifier(), teacher_model=vit_classifier(), args=config(tmp_path, {"hidden_state": {}})
        )


def test_feature_map_with_a_wrong_module_path_lists_real_ones(tmp_path):
    with pytest.raises(ValueError, match="no submodule 'mobilenet_v2.layers.3'.*mobilenet_v2.layer.0"):
        DistillationTrainer(
            model=mobilenet_classifier(),
            teacher_model=vit_classifier(),
            args=config(tmp_path, {"feature_map": {"student_module": "mobilenet_v2.layers.3"}}),
        )


def test_teacher_id_that_cannot_be_loaded_offline(tmp_path):
    with pytest.raises(
        OSError, match="could not load the teacher 'nobody/no-such-teacher'.*Pass the path of a local folder"
    ):
        build(tmp_path, bert_classifier(layers=2), "nobody/no-such-teacher", {"soft_target": {}})


def test_teacher_from_a_local_folder_gets_the_students_head(tmp_path):
    bert_classifier(seed=1).save_pretrained(tmp_path / "teacher")
    trainer = build(tmp_path / "run", bert_classifier(layers=2), str(tmp_path / "teacher"), {"soft_target": {}})
    assert type(trainer.teacher_model).__name__ == "BertForSequenceClassification"
    assert not trainer.teacher_model.training


def test_missing_teacher(tmp_path):
    with pytest.raises(ValueError, match=r"\['soft_target'\] need a teacher: pass teacher_model"):
        build(tmp_path, bert_classifier(), None, {"soft_target": {}})


def test_hard_label_on_a_dataset_without_labels(tmp_path):
    with pytest.raises(ValueError, match="no label column.*add a 'label' column"):
        DistillationTrainer(
            model=bert_classifier(layers=2),
            teacher_model=bert_classifier(),
            args=config(tmp_path, {"hard_label": {}, "soft_target": {}}),
            train_dataset=text_dataset(labels=False),
        )


def test_teacher_identical_to_student(tmp_path):
    model = bert_classifier()
    with pytest.raises(ValueError, match="same object"):
        build(tmp_path, model, model, {"soft_target": {}})


def test_label_smoothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        DistillationTrainer(
            model=bert_classifier(),
            teacher_model=bert_classifier(),
            args=config(tmp_path, {"soft_target": {}}, label_smoothing_factor=0.1),
        )


def test_config_errors_come_from_the_config_itself():
    with pytest.raises(ValueError, match="JSON mapping"):
        DistillationConfig(output_dir="x", losses="{not json")

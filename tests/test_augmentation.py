"""Image augmentation: one view per batch, seen alike by the student and the teacher; mixed labels as probabilities."""

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from helpers import IMAGE, bert_classifier, config, image_dataset, text_dataset, vit_classifier
from PIL import Image

from hf_distill import DistillationConfig, DistillationTrainer, with_transfer_set
from hf_distill.augmentation import ImageAugmentation, augment_batch, augmented_image_copies
from hf_distill.pipeline import parse_args

LOSSES = {"hard_label": {"weight": 0.5}, "soft_target": {"weight": 0.5, "temperature": 2.0}}


def test_a_full_crop_without_flip_is_the_identity_and_a_flip_mirrors():
    pixels = torch.randn(6, 3, 8, 8)
    same, _ = ImageAugmentation(crop_scale=(1.0, 1.0))(pixels, None, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, pixels, atol=1e-6, rtol=0)
    flipped, _ = ImageAugmentation(flip=True)(pixels, None, 3, torch.Generator().manual_seed(0))
    mirrored = [torch.allclose(flipped[i], pixels[i].flip(-1), atol=1e-6) for i in range(6)]
    kept = [torch.allclose(flipped[i], pixels[i], atol=1e-6) for i in range(6)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True)) and any(mirrored) and any(kept)
    cropped, _ = ImageAugmentation(crop_scale=(0.2, 0.5))(pixels, None, 3, torch.Generator().manual_seed(0))
    assert cropped.shape == pixels.shape and not torch.allclose(cropped, pixels)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_labels_are_the_mixed_images_class_shares(kind):
    pixels = torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, -100])
    augmentation = ImageAugmentation(**{f"{kind}_alpha": 1.0})
    mixed, probabilities = augmentation(pixels, labels, 3, torch.Generator().manual_seed(3))
    partner = pixels.flip(0)
    if kind == "mixup":  # every pixel is the same blend of the image and its partner
        weight = ((mixed - partner) / (pixels - partner))[0].mean()
        torch.testing.assert_close(mixed, weight * pixels + (1 - weight) * partner)
    else:  # each pixel comes from one of the two; the label weight is the share of pixels kept
        own = torch.isclose(mixed, pixels).all(1)
        assert (own | torch.isclose(mixed, partner).all(1)).all()
        weight = own[0].float().mean()
    # Row 0 mixes image 0 (class 0) with image 3 (no label): class 0 gets the weight, nothing else.
    torch.testing.assert_close(probabilities[0], torch.tensor([weight, 0.0, 0.0]))
    # Row 1 mixes class 1 with class 2 (image 2): the probabilities sum to 1.
    torch.testing.assert_close(probabilities[1], torch.tensor([0.0, weight, 1 - weight]))


def _vision_trainer(tmp_path, augmentation, **overrides):
    return DistillationTrainer(
        model=vit_classifier(seed=2, hidden_size=8, intermediate_size=16),
        teacher_model=vit_classifier(seed=1),
        args=config(
            tmp_path, LOSSES, image_augmentation=augmentation, **{"max_steps": 2, "optim": "sgd", **overrides}
        ),
        train_dataset=image_dataset(16),
    )


AUGMENTATIONS = {
    "crop and flip": {"crop_scale": [0.3, 0.8], "flip": True},
    "mixup": {"mixup_alpha": 0.4},
    "cutmix": {"cutmix_alpha": 1.0, "crop_scale": [0.5, 1.0]},
}


def record_pixels(trainer) -> dict[str, list[torch.Tensor]]:
    """Forward pre-hooks on the student and the teacher: every `pixel_values` each receives, in order."""
    seen = {"student": [], "teacher": []}
    for role, model in (("student", trainer.model), ("teacher", trainer.teacher_model)):
        model.register_forward_pre_hook(
            lambda module, args, kwargs, role=role: seen[role].append(kwargs["pixel_values"].detach().clone()),
            with_kwargs=True,
        )
    return seen


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_the_teacher_sees_exactly_the_students_augmented_images(tmp_path, name):
    trainer = _vision_trainer(tmp_path, AUGMENTATIONS[name], gradient_accumulation_steps=2)
    seen = record_pixels(trainer)
    trainer.train()
    assert len(seen["student"]) == len(seen["teacher"]) == 4  # 2 steps x 2 micro-batches
    raw = torch.stack([torch.as_tensor(row["pixel_values"]) for row in image_dataset(16)])
    for student_view, teacher_view in zip(seen["student"], seen["teacher"], strict=True):
        assert torch.equal(student_view, teacher_view)
        # A new view: no image of the batch is one of the data set's as it is.
        assert not any(torch.allclose(view, image, atol=1e-5) for view in student_view for image in raw)
    assert not torch.equal(seen["student"][0], seen["student"][2])  # another step, another draw


def test_hard_label_under_mixup_is_the_cross_entropy_against_the_mixed_labels(tmp_path):
    trainer = _vision_trainer(tmp_path, {"mixup_alpha": 0.4}, max_steps=1, per_device_train_batch_size=8,
                              train_sampling_strategy="sequential")  # fmt: skip
    logits = []
    trainer.model.register_forward_hook(lambda module, args, output: logits.append(output.logits.detach()))
    trainer.train()
    batch = {key: torch.as_tensor(value) for key, value in image_dataset(16)[:8].items()}
    batch["labels"] = batch.pop("label")
    seed = hash((trainer.args.seed, 0, 0, trainer.args.process_index)) & (2**63 - 1)
    view = augment_batch(trainer.image_augmentation, batch, 3, seed)  # the view the trainer drew for step 0
    assert view["labels"].shape == (8, 3)
    expected = -(view["labels"] * torch.log_softmax(logits[0], -1)).sum() / view["labels"].sum()
    first = next(log for log in trainer.state.log_history if "hard_label" in log)
    assert first["hard_label"] == pytest.approx(expected.item(), rel=1e-5)
    assert trainer.model.config.problem_type in (None, "single_label_classification")  # never multi-label


def test_augmentation_that_cannot_apply_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        DistillationConfig(output_dir=str(tmp_path), image_augmentation={"rotate": 10})
    with pytest.raises(ValueError, match="crop_scale must be"):
        DistillationConfig(output_dir=str(tmp_path), image_augmentation={"crop_scale": [0.5, 2.0]})
    with pytest.raises(ValueError, match="teacher cache holds"):
        DistillationConfig(output_dir=str(tmp_path), image_augmentation={"flip": True}, teacher_cache="cache")
    with pytest.raises(ValueError, match="applies to image models"):
        DistillationTrainer(
            model=bert_classifier(seed=2, layers=2),
            teacher_model=bert_classifier(seed=1),
            args=config(tmp_path, LOSSES, image_augmentation={"flip": True}),
            train_dataset=text_dataset(),
        )
    with pytest.raises(ValueError, match="a teacher that learns cannot train on"):
        _vision_trainer(tmp_path, {"mixup_alpha": 0.2}, trainable_teachers=["teacher"])


def test_the_command_line_takes_image_augmentation_as_json():
    _, config, _ = parse_args(
        ["--recipe", "vit-fashion-mnist", "--image_augmentation", '{"flip": true, "mixup_alpha": 0.2}']
    )
    assert config.image_augmentation == {"flip": True, "mixup_alpha": 0.2}
    _, config, _ = parse_args(["--recipe", "vit-fashion-mnist"])
    assert config.image_augmentation == {"crop_scale": [0.5, 1.0], "flip": True}  # the recipe's switch, on
    _, config, _ = parse_args(["--recipe", "vit-fashion-mnist", "--image_augmentation", "none"])
    assert config.image_augmentation is None  # and off
    with pytest.raises(ValueError, match="must be a JSON mapping"):
        parse_args(["--recipe", "vit-fashion-mnist", "--image_augmentation", "flip"])


def test_a_resumed_run_draws_the_views_of_an_uninterrupted_one(tmp_path):
    augmentation = {"crop_scale": [0.3, 1.0], "flip": True, "cutmix_alpha": 1.0}
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = _vision_trainer(tmp_path / "full", augmentation, **settings)
    full.train()
    resumed = DistillationTrainer(
        model=vit_classifier(seed=9, hidden_size=8, intermediate_size=16),  # every weight comes from the checkpoint
        teacher_model=vit_classifier(seed=1),
        args=config(tmp_path / "resumed", LOSSES, image_augmentation=augmentation, optim="sgd", **settings),
        train_dataset=image_dataset(16),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_augmented_image_copies_are_fixed_views_of_each_image_in_order():
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 256, (6, 5), dtype=np.uint8)) for _ in range(3)]
    flip = ImageAugmentation(flip=True)
    views = augmented_image_copies(images, flip, copies=8, seed=1)
    assert len(views) == 24 and all(view.mode == "RGB" and view.size == (5, 6) for view in views)
    for index, view in enumerate(views):  # view i is image i // 8, as it is or mirrored
        original = np.asarray(images[index // 8].convert("RGB"))
        assert np.array_equal(np.asarray(view), original) or np.array_equal(np.asarray(view), original[:, ::-1])
    mirrored = [
        not np.array_equal(np.asarray(v), np.asarray(images[i // 8].convert("RGB"))) for i, v in enumerate(views)
    ]
    assert 0 < sum(mirrored) < 24  # a coin per view
    same = augmented_image_copies(images, flip, copies=8, seed=1)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(views, same, strict=True))
    other = augmented_image_copies(images, flip, copies=8, seed=2)
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(views, other, strict=True))
    mixed = augmented_image_copies(images[:2], ImageAugmentation(mixup_alpha=1.0), copies=1, seed=0)
    blend = [np.asarray(view, dtype=float) for view in mixed]  # each view blends the two images, weights λ, 1 − λ
    a, b = (np.asarray(image.convert("RGB"), dtype=float) for image in images[:2])
    weight = np.linalg.lstsq(np.stack([(a - b).ravel()], 1), (blend[0] - b).ravel(), rcond=None)[0][0]
    assert 0 < weight < 1 and np.abs(weight * a + (1 - weight) * b - blend[0]).max() <= 1.0
    with pytest.raises(ValueError, match="copies must be an integer >= 1"):
        augmented_image_copies(images, flip, copies=0, seed=1)


def test_the_teacher_sees_exactly_the_students_fixed_image_copies(tmp_path):
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)) for _ in range(4)]
    views = augmented_image_copies(images, ImageAugmentation(crop_scale=(0.5, 1.0), flip=True), copies=3, seed=0)
    labeled = Dataset.from_dict({"image": images, "labels": [0, 1, 2, 0]}, features=Features(
        {"image": ImageFeature(), "labels": Value("int64")}))  # fmt: skip
    train = with_transfer_set(
        labeled, Dataset.from_dict({"image": views}, features=Features({"image": ImageFeature()}))
    )

    def to_pixels(batch):
        pixels = [
            torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1) for image in batch["image"]
        ]
        return {"pixel_values": torch.stack(pixels), "labels": batch["labels"]}

    trainer = DistillationTrainer(
        model=vit_classifier(seed=2, hidden_size=8, intermediate_size=16),
        teacher_model=vit_classifier(seed=1),
        args=config(
            tmp_path, LOSSES, max_steps=4, per_device_train_batch_size=4, optim="sgd", remove_unused_columns=False
        ),
        train_dataset=train.with_transform(to_pixels),
    )
    seen = record_pixels(trainer)
    trainer.train()
    assert len(seen["student"]) == len(seen["teacher"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen["student"], seen["teacher"], strict=True))
    rows = torch.cat(seen["teacher"])
    for view in to_pixels({"image": views, "labels": [0] * len(views)})["pixel_values"]:  # each copy, seen by both
        assert any(torch.equal(view, row) for row in rows)

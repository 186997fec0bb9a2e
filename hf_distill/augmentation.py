"""Image augmentation that the student and every teacher see alike: one random view per batch, drawn in the
trainer before either model runs, so the teacher always answers for exactly the student's input (function
matching, Beyer et al., 2022: "A good teacher is patient and consistent").

    DistillationConfig(..., image_augmentation={"crop_scale": [0.35, 1.0], "flip": True, "mixup_alpha": 0.2})

- `crop_scale`: a random resized crop of each image, covering this range of its area (aspect ratio 3/4 to 4/3),
  resized back to the input size (bilinear); None: no crop.
- `flip`: a horizontal flip of each image with probability 1/2.
- `mixup_alpha` (Zhang et al., 2018) / `cutmix_alpha` (Yun et al., 2019): the batch mixed with itself reversed,
  in weight λ ~ Beta(α, α) (one λ per batch); with both, one of the two per batch, at even odds. The labels mix
  alike: `hard_label` then reads them as class probabilities (an example without a label, -100, adds none).

The views are drawn from the run's seed and the micro-batch's position in training, so a resumed run draws the
same views as an uninterrupted one. For a teacher-output cache, which holds the teacher's outputs for one version
of each image, `augmented_image_copies` draws a fixed number of views once instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .model_kind import describe

if TYPE_CHECKING:
    from PIL import Image

#: The keys of `image_augmentation`.
OPTIONS = ("crop_scale", "flip", "mixup_alpha", "cutmix_alpha")


@dataclass(frozen=True)
class ImageAugmentation:
    """Random crop, flip and mixup/cutmix of a batch of `pixel_values` (`[batch, channels, height, width]`)."""

    crop_scale: tuple[float, float] | None = None
    flip: bool = False
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> ImageAugmentation:
        """Build from `DistillationConfig.image_augmentation`, refusing unknown keys and values out of range."""
        if not isinstance(options, Mapping):
            raise ValueError(f"image_augmentation must be a mapping of {', '.join(OPTIONS)}, got {options!r}")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"image_augmentation has unknown keys {unknown}; its keys are {', '.join(OPTIONS)}")
        crop = options.get("crop_scale")
        if crop is not None:
            if not (isinstance(crop, (list, tuple)) and len(crop) == 2 and 0 < crop[0] <= crop[1] <= 1):
                raise ValueError(
                    f"image_augmentation crop_scale must be [low, high] with 0 < low <= high <= 1 (the share of the "
                    f"image's area a crop covers), got {crop!r}"
                )
            crop = (float(crop[0]), float(crop[1]))
        for key in ("mixup_alpha", "cutmix_alpha"):
            value = options.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"image_augmentation {key} must be a number >= 0 (0: off), got {value!r}")
        flip = options.get("flip", False)
        if not isinstance(flip, bool):
            raise ValueError(f"image_augmentation flip must be true or false, got {flip!r}")
        augmentation = cls(crop, flip, float(options.get("mixup_alpha", 0.0)), float(options.get("cutmix_alpha", 0.0)))
        if not augmentation.active:
            raise ValueError(
                "image_augmentation turns nothing on: set crop_scale, flip: true, mixup_alpha or cutmix_alpha (or "
                "leave image_augmentation unset)"
            )
        return augmentation

    @property
    def active(self) -> bool:
        return self.crop_scale is not None or self.flip or self.mixes

    @property
    def mixes(self) -> bool:
        """Whether labels become class probabilities (mixup or cutmix)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None, num_labels: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One view of the batch and its labels (class probabilities `[batch, num_labels]` when mixing)."""
        if self.crop_scale is not None or self.flip:
            pixel_values = self._crop_and_flip(pixel_values, generator)
        if self.mixes:
            pixel_values, labels = self._mix(pixel_values, labels, num_labels, generator)
        return pixel_values, labels

    def _crop_and_flip(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each image's crop (and flip) as one affine resampling of the batch, so the output keeps the input size."""
        batch = pixels.shape[0]
        scale_x = scale_y = torch.ones(batch)
        shift_x = shift_y = torch.zeros(batch)
        if self.crop_scale is not None:
            low, high = self.crop_scale
            area = low + (high - low) * torch.rand(batch, generator=generator)
            log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(batch, generator=generator)
            ratio = log_ratio.exp()
            # Side lengths as shares of the image's (width / height = ratio); a crop that would not fit inside the
            # image is the whole image instead, as torchvision's RandomResizedCrop falls back to.
            scale_x, scale_y = (area * ratio).sqrt(), (area / ratio).sqrt()
            fits = (scale_x <= 1) & (scale_y <= 1)
            scale_x, scale_y = scale_x.where(fits, 1.0), scale_y.where(fits, 1.0)
            # The crop's centre, in [-1, 1] coordinates, keeps the crop inside the image.
            shift_x = (1 - scale_x) * (2 * torch.rand(batch, generator=generator) - 1)
            shift_y = (1 - scale_y) * (2 * torch.rand(batch, generator=generator) - 1)
        if self.flip:
            scale_x = scale_x * torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(batch, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = scale_x, shift_x, scale_y, shift_y
        theta = theta.to(device=pixels.device, dtype=pixels.dtype)
        grid = nn.functional.affine_grid(theta, list(pixels.shape), align_corners=False)
        return nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _mix(
        self, pixels: torch.Tensor, labels: torch.Tensor | None, num_labels: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or torch.rand((), generator=generator) < 0.5)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        gamma = torch.distributions.Gamma(torch.tensor([alpha, alpha]), torch.tensor(1.0))
        # Beta(α, α) from two Gamma draws, by the generator (torch.distributions samples from the global one).
        draws = torch._standard_gamma(gamma.concentration, generator=generator)
        weight = float(draws[0] / draws.sum())
        partner = pixels.flip(0)
        if cutmix:
            height, width = pixels.shape[-2:]
            cut_h, cut_w = round(height * math.sqrt(1 - weight)), round(width * math.sqrt(1 - weight))
            centre_y = int(torch.randint(height, (), generator=generator))
            centre_x = int(torch.randint(width, (), generator=generator))
            top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h - cut_h // 2, height)
            left, right = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w - cut_w // 2, width)
            pixels = pixels.clone()
            pixels[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
            weight = 1 - (bottom - top) * (right - left) / (height * width)  # the area actually kept
        else:
            pixels = weight * pixels + (1 - weight) * partner
        if labels is None:
            return pixels, None
        # An example without a label (-100, a transfer set) adds no class mass: a row mixed from two labeled
        # images sums to 1, from one labeled image to that image's weight, and hard_label counts that mass.
        labeled = labels.ne(-100)
        one_hot = nn.functional.one_hot(labels.long().where(labeled, 0), num_labels).to(pixels.dtype)
        one_hot = one_hot * labeled.unsqueeze(-1)
        return pixels, weight * one_hot + (1 - weight) * one_hot.flip(0)


def checked_augmentation(
    config: Any, student: nn.Module, roster: Any, losses: Mapping[str, Any]
) -> ImageAugmentation | None:
    """`DistillationConfig.image_augmentation` for a run, checked against the student, the teachers (`roster`) and
    the losses; with mixing, the losses that read labels read them as class probabilities
    (`DistillationLoss.use_class_probabilities`). None when it is unset."""
    if config is None:
        return None
    augmentation = ImageAugmentation.from_config(config)
    if getattr(student, "main_input_name", None) != "pixel_values":
        raise ValueError(
            f"image_augmentation applies to image models (inputs pixel_values), but the student "
            f"{type(student).__name__} reads {getattr(student, 'main_input_name', 'other inputs')}: leave "
            "image_augmentation unset"
        )
    if not augmentation.mixes:
        return augmentation
    if roster.learning:
        raise ValueError(
            "mixup/cutmix turns labels into class probabilities, which a teacher that learns cannot train on "
            "(its model computes its own loss from integer labels): drop mixup_alpha/cutmix_alpha, or "
            "trainable_teachers"
        )
    if not describe(student).class_labels:
        raise ValueError("mixup/cutmix needs a classifier student (one class label per image)")
    refused = [term for term, loss in losses.items() if loss.needs_labels and not loss.use_class_probabilities()]
    if refused:
        raise ValueError(
            f"mixup/cutmix turns labels into class probabilities, and the losses {refused} read labels but do not "
            "say they can read those (DistillationLoss.use_class_probabilities): drop mixup_alpha/cutmix_alpha, or "
            "implement use_class_probabilities in the loss"
        )
    return augmentation


def augment_batch(
    augmentation: ImageAugmentation, inputs: Mapping[str, Any], num_labels: int, seed: int
) -> dict[str, Any]:
    """`inputs` with `pixel_values` (and, when mixing, `labels`) replaced by one view, drawn from `seed`."""
    if "pixel_values" not in inputs:
        raise ValueError(
            "image_augmentation needs image batches (pixel_values), but this batch has "
            f"{sorted(inputs)}: leave image_augmentation unset for other inputs"
        )
    generator = torch.Generator().manual_seed(seed)
    pixels, labels = augmentation(inputs["pixel_values"], inputs.get("labels"), num_labels, generator)
    augmented = {**inputs, "pixel_values": pixels}
    if labels is not None:
        augmented["labels"] = labels
    return augmented


def augmented_image_copies(
    images: Sequence[Image.Image], augmentation: ImageAugmentation, copies: int, seed: int, batch_size: int = 256
) -> list[Image.Image]:
    """`copies` augmented views of each image (image-major: view `i` is of image `i // copies`), drawn once from
    `seed`: a fixed set of images, which a teacher-output cache can serve where views drawn anew at every step
    cannot. Each view is drawn as `augment_batch` draws one, in RGB at the image's own size, and stored as 8-bit
    RGB; mixup and cutmix pair images of the same size within a batch of `batch_size`."""
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"augmented image copies: copies must be an integer >= 1, got {copies!r}")
    views: list[Image.Image] = []
    start = 0
    while start < len(images):
        size = images[start].size
        end = start + 1
        while end < min(start + batch_size, len(images)) and images[end].size == size:
            end += 1
        pixels = torch.stack([_to_tensor(image) for image in images[start:end]])
        drawn = []
        for copy in range(copies):
            generator = torch.Generator().manual_seed(hash((seed, start, copy)) & (2**63 - 1))
            drawn.append(augmentation(pixels, None, 0, generator)[0])
        for image_views in torch.stack(drawn, dim=1):  # [images, copies, channels, height, width]
            views.extend(_to_image(view) for view in image_views)
        start = end
    return views


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _to_image(pixels: torch.Tensor) -> Image.Image:
    from PIL import Image  # pillow comes with the [pipeline] extra; only image data needs it

    array = (pixels.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)

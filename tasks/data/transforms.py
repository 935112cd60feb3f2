"""`torchvision.transforms.v2` pipelines that move images, boxes and masks together.

The pipelines work on a uint8 `tv_tensors.Image` plus, for detection, a target dict whose "boxes" are
`tv_tensors.BoundingBoxes` and, for segmentation, a `tv_tensors.Mask` (resized with nearest neighbours, padded
with 255 = ignore). They do not normalise: the datasets scale to [0, 1] and normalise after the transform, and
the detection dataset clamps boxes and drops the ones a crop made degenerate (with their labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torchvision import tv_tensors
from torchvision.transforms import v2

from .common import IGNORE_INDEX

AUGMENTS = ("resized_crop", "scale_jitter")
# Padding: grey images (0 after mean = std = 0.5 normalisation), ignored mask pixels, zeros elsewhere.
PAD_FILL = {tv_tensors.Image: 128, tv_tensors.Mask: IGNORE_INDEX, "others": 0}


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def _range(value: Sequence[float], name: str) -> tuple[float, float]:
    if len(value) != 2 or not 0 < value[0] <= value[1]:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {value!r}")
    return float(value[0]), float(value[1])


def train_transforms(
    image_size: int | Sequence[int],
    *,
    augment: Literal["resized_crop", "scale_jitter"] = "resized_crop",
    scale: Sequence[float] | None = None,
    hflip: float = 0.5,
) -> v2.Compose:
    """Training augmentation to a fixed `image_size`: a random geometric change, then a horizontal flip.

    Args:
        image_size: output size, int (square) or (height, width).
        augment: "resized_crop" (`RandomResizedCrop`: a random part of the image, resized) or "scale_jitter"
            (`ScaleJitter` of the whole image, then `RandomCrop` padded to the size: large-scale jitter).
        scale: crop area fraction for "resized_crop" (default (0.5, 1.0)), or the resize factor range around
            fitting the image into `image_size` for "scale_jitter" (default (0.5, 2.0)).
        hflip: probability of a horizontal flip.
    """
    size = _size(image_size)
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
    if augment == "resized_crop":
        scale = _range(scale or (0.5, 1.0), "scale")
        if scale[1] > 1.0:
            raise ValueError(f"scale for resized_crop is an area fraction in (0, 1], got {scale!r}")
        geometric = [v2.RandomResizedCrop(size, scale=scale, antialias=True)]
    else:
        scale = _range(scale or (0.5, 2.0), "scale")
        geometric = [
            v2.ScaleJitter(size, scale_range=scale, antialias=True),
            v2.RandomCrop(size, pad_if_needed=True, fill=dict(PAD_FILL)),
        ]
    return v2.Compose([*geometric, v2.RandomHorizontalFlip(hflip)])


def eval_transforms(image_size: int | Sequence[int]) -> v2.Compose:
    """Evaluation: resize to exactly `image_size` (int or (height, width)); boxes and masks follow."""
    return v2.Compose([v2.Resize(_size(image_size), antialias=True)])

"""Semantic segmentation head: neck pyramid -> Panoptic-FPN-style semantic branch -> per-pixel logits.

Each pyramid level goes through 3x3 conv + GroupNorm + ReLU stages, upsampling 2x after each stage until it
reaches the finest stride (Kirillov et al., "Panoptic Feature Pyramid Networks", 2019); the levels are summed,
a 1x1 conv gives class logits, and bilinear upsampling brings them to the input resolution (the finest map's
size times its stride). Loss: cross-entropy that skips `ignore_index` pixels, plus an optional multi-class soft
dice term over the same pixels.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

from multitask_peft.config import check_class_names, check_positive_int
from multitask_peft.heads import FeatureInfo, Features, Head, HeadConfig, register_head

from .necks import build_neck, check_strides
from .segmentation_output import check_mask_targets


@register_head("segmentation")
@dataclasses.dataclass
class Segmentation(HeadConfig):
    """Semantic segmentation head config.

    Args:
        num_classes: Number of classes (class ids 0 .. num_classes - 1; 0 is usually the background).
        channels: Width of the neck and of the semantic branch.
        strides: Pyramid strides, increasing powers of two; the finest one sets the decoder resolution. For
            plain ViTs a simple feature pyramid builds them from the patch-stride map (patch 14: resampled to
            16 first); multi-stage backbones must offer every stride between their first and deepest stage
            (finer ones are upsampled, coarser ones max-pooled).
        dice_weight: Weight of the soft dice term added to the cross-entropy (0 = cross-entropy only).
        ignore_index: Target value of pixels that count in neither loss term (nor in mIoU).
        class_names: Optional names of the classes, saved with the task.
    """

    num_classes: int = 2
    channels: int = 64
    strides: tuple[int, ...] = (4, 8, 16, 32)
    dice_weight: float = 0.0
    ignore_index: int = 255
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_positive_int("Segmentation", "num_classes", self.num_classes)
        check_positive_int("Segmentation", "channels", self.channels)
        self.strides = check_strides("Segmentation", self.strides)
        weight = self.dice_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight < math.inf:
            raise ValueError(
                f"Segmentation: `dice_weight` should be a finite number >= 0 but the value passed is {weight!r}"
            )
        ignore = self.ignore_index
        if isinstance(ignore, bool) or not isinstance(ignore, int) or 0 <= ignore < self.num_classes:
            raise ValueError(
                f"Segmentation: `ignore_index` should be an integer outside the class ids [0, {self.num_classes}) "
                f"(e.g. 255) but the value passed is {ignore!r}"
            )
        self.class_names = check_class_names("Segmentation", self.class_names, self.num_classes)

    def build(self, info: FeatureInfo) -> SegmentationHead:
        return SegmentationHead(self, build_neck(info, self.channels, self.strides, owner="Segmentation"))


def _conv_gn_relu(in_channels: int, out_channels: int) -> Conv2dNormActivation:
    norm = partial(nn.GroupNorm, math.gcd(32, max(1, out_channels // 4)))  # >= 4 channels a group, <= 32 groups
    return Conv2dNormActivation(in_channels, out_channels, 3, norm_layer=norm, activation_layer=nn.ReLU)


class _ScaleBranch(nn.Module):
    """One pyramid level of the semantic branch: `max(1, ups)` conv stages, each of the first `ups` followed by
    a 2x bilinear upsampling (the last one lands exactly on the finest map's size)."""

    def __init__(self, channels: int, num_upsamples: int) -> None:
        super().__init__()
        self.num_upsamples = num_upsamples
        self.convs = nn.ModuleList(_conv_gn_relu(channels, channels) for _ in range(max(1, num_upsamples)))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        for k, conv in enumerate(self.convs):
            x = conv(x)  # (N, channels, h, w)
            if k < self.num_upsamples:
                target = size if k == self.num_upsamples - 1 else (2 * x.shape[-2], 2 * x.shape[-1])
                x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        return x  # (N, channels, *size) after the last stage


class SegmentationHead(Head):
    """Neck + semantic branch + classifier; outputs (N, num_classes, H, W) logits at input resolution."""

    def __init__(self, config: Segmentation, neck: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.neck = neck
        finest = config.strides[0]
        self.branches = nn.ModuleList(
            _ScaleBranch(config.channels, int(math.log2(s // finest))) for s in config.strides
        )
        self.classifier = nn.Conv2d(config.channels, config.num_classes, 1)

    def forward(self, features: Features) -> torch.Tensor:
        pyramid = self.neck(features.maps)  # one (N, channels, H / s, W / s) map per stride s
        size = (pyramid[0].shape[-2], pyramid[0].shape[-1])
        fused = sum(branch(x, size) for branch, x in zip(self.branches, pyramid))  # (N, channels, *size)
        logits = self.classifier(fused)  # (N, num_classes, H / s0, W / s0)
        stride = self.config.strides[0]
        return F.interpolate(logits, size=(size[0] * stride, size[1] * stride), mode="bilinear", align_corners=False)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (+ `dice_weight` * soft dice) over pixels whose target is not `ignore_index`.

        Args:
            outputs: (N, C, H, W) logits from `forward`; resized bilinearly if `targets` has another size.
            targets: (N, H', W') int64 class ids, `ignore_index` where unlabelled.
        """
        cfg = self.config
        check_mask_targets(outputs, targets, cfg.num_classes, cfg.ignore_index)
        if outputs.shape[-2:] != targets.shape[-2:]:
            outputs = F.interpolate(outputs, size=targets.shape[-2:], mode="bilinear", align_corners=False)
        valid = targets != cfg.ignore_index  # (N, H, W)
        if not bool(valid.any()):
            return outputs.sum() * 0.0  # nothing labelled: zero loss that still has a graph
        loss = F.cross_entropy(outputs.float(), targets, ignore_index=cfg.ignore_index)
        if cfg.dice_weight > 0:
            loss = loss + cfg.dice_weight * soft_dice_loss(outputs, targets, valid)
        return loss

    def class_logits(self, outputs: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(N, C, H, W) logits at `image_size` (resized bilinearly if needed)."""
        size = (int(image_size[0]), int(image_size[1]))
        if tuple(outputs.shape[-2:]) != size:
            outputs = F.interpolate(outputs.float(), size=size, mode="bilinear", align_corners=False)
        return outputs

    def export_outputs(self, outputs: torch.Tensor, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """{"mask": (N, H, W) int64}: the arg-max class at `image_size` (logits resized bilinearly if needed)."""
        return {"mask": self.class_logits(outputs, image_size).argmax(dim=1)}  # (N, H, W) int64


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - mean soft dice over the classes present in `targets[valid]` (batch-wise per class, as in V-Net / smp).

    Args:
        logits: (N, C, H, W).
        targets: (N, H, W) class ids (any value where `valid` is False).
        valid: (N, H, W) bool, the pixels that count.
    """
    num_classes = logits.shape[1]
    weight = valid.unsqueeze(1).to(logits.dtype)  # (N, 1, H, W)
    probs = logits.float().softmax(dim=1) * weight  # (N, C, H, W)
    onehot = F.one_hot(torch.where(valid, targets, 0), num_classes).permute(0, 3, 1, 2) * weight  # (N, C, H, W)
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)  # (C,)
    cardinality = probs.sum(dims) + onehot.sum(dims)  # (C,)
    dice = (2 * intersection + eps) / (cardinality + eps)
    present = onehot.sum(dims) > 0
    if not bool(present.any()):
        return logits.sum() * 0.0  # no labelled pixel
    return 1.0 - dice[present].mean()

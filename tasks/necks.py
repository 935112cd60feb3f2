"""Necks that turn backbone feature maps into a pyramid at fixed strides (shared by detection and segmentation).

- Plain ViTs offer one map (stride = patch size): a ViTDet-style simple feature pyramid builds every requested
  stride from it (transposed convs up, max-pool down; odd sizes round up, as CNN stages do).
- Hierarchical / CNN backbones offer several stages: torchvision's `FeaturePyramidNetwork` fuses the stages at
  the requested strides; strides beyond the deepest stage come from stride-2 max-pooling of the top level.

A backbone stride that is not a power of two (a patch-14 ViT such as DINOv2 or EVA-02, a stage at reduction 12)
is first resampled (bilinear) to the nearest power of two: a map of h x w cells at stride 14 becomes
round(h * 14 / 16) x round(w * 14 / 16) cells at stride 16, covering the same input pixels, so every pyramid level
keeps its nominal stride and boxes and masks stay in input pixels.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from multitask_peft.heads import FeatureInfo


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with groups of at least 4 channels (one-channel groups fail on 1x1 maps of one image)."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4)), channels)


def nominal_stride(reduction: int) -> int:
    """The power of two nearest to a backbone reduction (14 -> 16, 12 -> 16, 8 -> 8)."""
    return 2 ** round(math.log2(reduction))


def resample_to_stride(x: torch.Tensor, reduction: int, stride: int) -> torch.Tensor:
    """An (N, C, h, w) map at `reduction` resampled to cover the same input pixels at `stride` (bilinear)."""
    if reduction == stride:
        return x
    size = (max(1, round(x.shape[-2] * reduction / stride)), max(1, round(x.shape[-1] * reduction / stride)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SimpleFeaturePyramid(nn.Module):
    """From one (N, C, H, W) map at `in_stride`, maps at every stride of `strides` with `out_channels` channels
    (a stride that is not a power of two is resampled to the nearest one first)."""

    def __init__(self, in_channels: int, in_stride: int, out_channels: int, strides: tuple[int, ...]) -> None:
        super().__init__()
        self.strides = strides
        self.in_stride, self.base_stride = in_stride, nominal_stride(in_stride)
        self.scales = nn.ModuleList()
        for stride in strides:
            layers: list[nn.Module] = []
            channels = in_channels
            steps = math.log2(stride / self.base_stride)
            if steps != int(steps):
                raise ValueError(
                    f"stride {stride} is not the backbone stride {self.base_stride} times a power of two"
                    + (f" (the backbone's {in_stride}, resampled)" if in_stride != self.base_stride else "")
                )
            for _ in range(max(0, -int(steps))):  # upsample by 2 per step
                layers += [nn.ConvTranspose2d(channels, channels // 2, 2, stride=2), _norm(channels // 2), nn.GELU()]
                channels //= 2
            layers += [nn.MaxPool2d(2, ceil_mode=True) for _ in range(max(0, int(steps)))]  # cover odd sizes
            layers += [
                nn.Conv2d(channels, out_channels, 1, bias=False),
                _norm(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                _norm(out_channels),
            ]
            self.scales.append(nn.Sequential(*layers))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        x = resample_to_stride(maps[-1], self.in_stride, self.base_stride)  # (N, C, H, W)
        return [scale(x) for scale in self.scales]


class FPNNeck(nn.Module):
    """torchvision's FPN over the backbone stages at `strides`: strides the backbone offers are FPN levels, coarser
    ones come from max-pooling the top level, finer ones from bilinear upsampling of the finest FPN level (a
    backbone whose first stage is at stride 16, such as LeViT, still feeds a stride-4 head)."""

    def __init__(
        self, levels: tuple[tuple[int, int], ...], out_channels: int, strides: tuple[int, ...], owner: str = "FPNNeck"
    ) -> None:
        super().__init__()
        check_backbone_strides(owner, strides, levels)
        available = {nominal_stride(reduction): k for k, (_, reduction) in enumerate(levels)}
        finest, deepest = min(available), max(available)
        within = [s for s in strides if finest <= s <= deepest]
        self.inputs = [available[s] for s in within]
        self.resample = [(levels[available[s]][1], s) for s in within]  # (reduction, stride) per input
        self.finer = [within[0] // s for s in strides if s < finest]  # upsampling factor of the finest FPN level
        for s, factor in zip(strides, self.finer):
            if within[0] % s or factor & (factor - 1):
                raise ValueError(f"{owner}: stride {s} is not the finest FPN stride {within[0]} over a power of two")
        self.extra = [s for s in strides if s > deepest]
        for k, s in enumerate(self.extra):
            previous = self.extra[k - 1] if k else deepest
            if s != 2 * previous:
                raise ValueError(f"{owner}: extra FPN stride {s} must double the previous one ({previous})")
        self.fpn = FeaturePyramidNetwork([levels[k][0] for k in self.inputs], out_channels)
        self.pool = nn.MaxPool2d(1, stride=2)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        features = self.fpn(
            OrderedDict(
                (str(k), resample_to_stride(maps[k], reduction, stride))
                for k, (reduction, stride) in zip(self.inputs, self.resample)
            )
        )
        outs = list(features.values())
        finer = [
            F.interpolate(outs[0], scale_factor=float(factor), mode="bilinear", align_corners=False)
            for factor in self.finer
        ]
        for _ in self.extra:
            outs.append(self.pool(outs[-1]))
        return finer + outs


def check_strides(owner: str, strides: object, powers_of_two: bool = True) -> tuple[int, ...]:
    """A head config's pyramid strides as a tuple; a ValueError naming `owner` unless they are a non-empty,
    strictly increasing sequence of positive integers (powers of two if `powers_of_two`)."""
    if isinstance(strides, list):
        strides = tuple(strides)
    if (
        not isinstance(strides, tuple)
        or not strides
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in strides)
        or (powers_of_two and any(s & (s - 1) for s in strides))
        or list(strides) != sorted(set(strides))
    ):
        accepted = "powers of two" if powers_of_two else "positive integers"
        raise ValueError(
            f"{owner}: `strides` should be a non-empty tuple of strictly increasing {accepted}, e.g. (8, 16, 32), "
            f"but the value passed is {strides!r}"
        )
    return strides


def check_backbone_strides(owner: str, strides: Sequence[int], levels: Sequence[tuple[int, int]]) -> None:
    """A ValueError naming `owner` unless a multi-stage backbone (`levels`: (channels, reduction) per stage)
    offers a map at every stride between its finest and deepest stage, and at one stride at least (finer ones
    are upsampled, coarser ones pooled)."""
    if len(levels) == 1:
        return  # a plain ViT: the simple feature pyramid builds any power-of-two multiple or fraction
    offered = sorted(nominal_stride(reduction) for _, reduction in levels)
    missing = [s for s in strides if offered[0] <= s <= offered[-1] and s not in offered]
    if missing:
        raise ValueError(
            f"{owner}: `strides` {tuple(strides)!r} include {missing}, but the backbone offers feature maps at "
            f"strides {offered} (finer strides are upsampled, coarser ones pooled); pick strides from those"
        )
    if not any(offered[0] <= s <= offered[-1] for s in strides):
        raise ValueError(
            f"{owner}: `strides` {tuple(strides)!r} include none of the backbone's feature map strides {offered}; "
            "include one of them"
        )


def build_neck(info: FeatureInfo, out_channels: int, strides: tuple[int, ...], owner: str = "neck") -> nn.Module:
    """The neck for a backbone: a simple pyramid for single-map (ViT) backbones, else an FPN over its stages.

    Args:
        info: The backbone's feature maps.
        out_channels: Width of every pyramid level.
        strides: Strides of the pyramid levels, increasing.
        owner: Who asks (a head config's name), for error messages.
    """
    strides = check_strides(owner, strides, powers_of_two=False)
    if len(info.levels) == 1:
        channels, stride = info.levels[0]
        return SimpleFeaturePyramid(channels, stride, out_channels, strides)
    return FPNNeck(info.levels, out_channels, strides, owner)

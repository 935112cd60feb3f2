"""Necks that turn backbone feature maps into a pyramid at fixed strides (shared by detection and segmentation).

- Plain ViTs offer one map (stride = patch size): a ViTDet-style simple feature pyramid builds every requested
  stride from it (transposed convs up, max-pool down; odd sizes round up, as CNN stages do).
- Hierarchical / CNN backbones offer several stages: torchvision's `FeaturePyramidNetwork` fuses the stages at
  the requested strides; strides beyond the deepest stage come from stride-2 max-pooling of the top level.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from multitask_peft.heads import FeatureInfo


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with groups of at least 4 channels (one-channel groups fail on 1x1 maps of one image)."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4)), channels)


class SimpleFeaturePyramid(nn.Module):
    """From one (N, C, H, W) map at `in_stride`, maps at every stride of `strides` with `out_channels` channels."""

    def __init__(self, in_channels: int, in_stride: int, out_channels: int, strides: tuple[int, ...]) -> None:
        super().__init__()
        self.strides = strides
        self.scales = nn.ModuleList()
        for stride in strides:
            layers: list[nn.Module] = []
            channels = in_channels
            steps = math.log2(stride / in_stride)
            if steps != int(steps):
                raise ValueError(f"stride {stride} is not the backbone stride {in_stride} times a power of two")
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
        x = maps[-1]  # (N, C, H, W)
        return [scale(x) for scale in self.scales]


class FPNNeck(nn.Module):
    """torchvision's FPN over the backbone stages at `strides` (extra coarser strides by max-pooling)."""

    def __init__(self, levels: tuple[tuple[int, int], ...], out_channels: int, strides: tuple[int, ...]) -> None:
        super().__init__()
        available = {reduction: k for k, (_, reduction) in enumerate(levels)}
        deepest = max(available)
        missing = [s for s in strides if s <= deepest and s not in available]
        if missing or not any(s <= deepest for s in strides):
            raise ValueError(
                f"the backbone offers feature maps at strides {sorted(available)}; cannot build an FPN at {strides}"
            )
        self.inputs = [available[s] for s in strides if s <= deepest]
        self.extra = [s for s in strides if s > deepest]
        for k, s in enumerate(self.extra):
            previous = self.extra[k - 1] if k else deepest
            if s != 2 * previous:
                raise ValueError(f"extra FPN stride {s} must double the previous one ({previous})")
        self.fpn = FeaturePyramidNetwork([levels[k][0] for k in self.inputs], out_channels)
        self.pool = nn.MaxPool2d(1, stride=2)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        features = self.fpn(OrderedDict((str(k), maps[k]) for k in self.inputs))
        outs = list(features.values())
        for _ in self.extra:
            outs.append(self.pool(outs[-1]))
        return outs


def build_neck(info: FeatureInfo, out_channels: int, strides: tuple[int, ...]) -> nn.Module:
    """The neck for a backbone: a simple pyramid for single-map (ViT) backbones, else an FPN over its stages."""
    if not strides or sorted(strides) != list(strides):
        raise ValueError(f"strides must be increasing, got {strides}")
    if len(info.levels) == 1:
        channels, stride = info.levels[0]
        return SimpleFeaturePyramid(channels, stride, out_channels, strides)
    return FPNNeck(info.levels, out_channels, strides)

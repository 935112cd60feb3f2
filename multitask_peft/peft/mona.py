"""Mona: a multi-cognitive visual adapter (multi-kernel depthwise convolutions on the feature grid)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_positive_int
from .adapters import SequentialBottleneck
from .base import PeftConfig, register_method
from .layer import LayerAdapter

if TYPE_CHECKING:
    from ..backbone import BackboneHost

KERNELS = (3, 5, 7)


@register_method("mona")
@dataclasses.dataclass
class Mona(PeftConfig):
    """Mona (Yin et al., 2025, "5%>100%: Breaking Performance Shackles of Full Fine-Tuning on Visual Recognition
    Tasks"): after each targeted module, `y + up(act(op(down(scaled_norm(y)))))` where `scaled_norm(y) =
    layer_norm(y) * gamma + y * gamma_x` and `op` averages depthwise 3x3, 5x5 and 7x7 convolutions on the feature
    grid (plus the input), then adds a 1x1 convolution of that. Built for dense prediction; on ViTs the patch
    tokens form the grid (square) and prefix tokens see each kernel's centre tap (1x1 maps); on hierarchical
    backbones (Swin, ConvNeXt, CNNs) the maps are the grid. `up` starts at zero: the backbone is unchanged at init.

    Args:
        dim: Bottleneck width (the paper uses 64).
    """

    dim: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "dim", self.dim)

    def supports(self, name: str, module: nn.Module) -> bool:
        return True

    def default_target(self, name: str, module: nn.Module, host: BackboneHost) -> bool:
        """ViT: after each block's attention and MLP; others: after every block (unit)."""
        if host.layout.kind == "vit":
            parts = name.split(".")
            return len(parts) == 3 and parts[0] == "blocks" and parts[2] in ("attn", "mlp")
        return name in {p.name for p in host.layout.parts[1:-1]}

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        shape = host.output_shape(name)
        if len(shape) not in (3, 4):
            raise ValueError(f"mona needs token sequences or feature maps; {name} outputs {tuple(shape)}")
        tokens = len(shape) == 3
        dim = -1 if tokens or host.layout.nhwc else 1
        prefix = host.layout.num_prefix_tokens if tokens else 0
        return MonaAdapter(shape[dim], self.dim, dim, prefix)


class MonaAdapter(SequentialBottleneck):
    """One Mona module; parameters `mona_*`. Tokens (n, T, C), channels-last maps (n, H, W, C) or NCHW maps."""

    def __init__(self, channels: int, dim: int, channel_dim: int, num_prefix_tokens: int) -> None:
        super().__init__("mona", channels, dim, "gelu", 1.0, channel_dim, sequential=True)
        self.num_prefix_tokens = num_prefix_tokens
        self.mona_gamma = nn.Parameter(torch.full((channels,), 1e-6))
        self.mona_gamma_x = nn.Parameter(torch.ones(channels))
        for k in KERNELS:
            weight = nn.Parameter(torch.empty(dim, 1, k, k))
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            self.register_parameter(f"mona_conv{k}", weight)
            self.register_parameter(f"mona_conv{k}_bias", nn.Parameter(torch.zeros(dim)))
        self.mona_proj = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.mona_proj, a=math.sqrt(5))
        self.mona_proj_bias = nn.Parameter(torch.zeros(dim))

    def _multi_kernel(self, grid: torch.Tensor) -> torch.Tensor:
        """(n, dim, h, w) -> the averaged depthwise convolutions plus the input, then plus its 1x1 projection."""
        dim = grid.shape[1]
        mixed = sum(
            F.conv2d(
                grid, getattr(self, f"mona_conv{k}"), getattr(self, f"mona_conv{k}_bias"), padding=k // 2, groups=dim
            )
            for k in KERNELS
        )
        grid = mixed / len(KERNELS) + grid
        return grid + F.conv2d(grid, self.mona_proj[:, :, None, None], self.mona_proj_bias)

    def _centre_taps(self, h: torch.Tensor) -> torch.Tensor:
        """The same op on 1x1 maps (prefix tokens, channels last): each kernel's centre tap."""
        taps = sum(getattr(self, f"mona_conv{k}")[:, 0, k // 2, k // 2] for k in KERNELS)
        biases = sum(getattr(self, f"mona_conv{k}_bias") for k in KERNELS)
        h = (h * taps + biases) / len(KERNELS) + h
        return h + F.linear(h, self.mona_proj, self.mona_proj_bias)

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        down, down_b, up, up_b = self.params()
        last = self.channel_dim == -1
        zc = z if last else z.movedim(1, -1)  # channels last
        zc = F.layer_norm(zc, zc.shape[-1:]) * self.mona_gamma + zc * self.mona_gamma_x
        h = F.linear(zc, down, down_b)  # (..., dim)
        if z.ndim == 4:  # maps: (n, H, W, dim)
            h = self._multi_kernel(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:  # tokens: prefix tokens, then the square grid of patch tokens
            n, t, d = h.shape
            npt = self.num_prefix_tokens
            side = math.isqrt(t - npt)
            if side * side != t - npt:
                raise ValueError(f"mona needs a square patch grid; got {t - npt} patch tokens")
            grid = h[:, npt:].transpose(1, 2).reshape(n, d, side, side)
            grid = self._multi_kernel(grid).flatten(2).transpose(1, 2)
            h = torch.cat([self._centre_taps(h[:, :npt]), grid], dim=1)
        out = F.linear(F.gelu(h), up, up_b)  # (..., C)
        return out if last else out.movedim(-1, 1)

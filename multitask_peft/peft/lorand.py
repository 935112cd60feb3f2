"""LoRand: bottleneck adapters whose projections are sums of low-rank products with a kernel shared by both."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import check_positive_int
from .adapters import SequentialBottleneck, _BottleneckConfig
from .base import register_method
from .layer import LayerAdapter

if TYPE_CHECKING:
    from ..backbone import BackboneHost


@register_method("lorand")
@dataclasses.dataclass
class LoRand(_BottleneckConfig):
    """LoRand (Yin et al., 2023, "1% VS 100%: Parameter-Efficient Low Rank Adapter for Dense Predictions"): a
    bottleneck adapter after each block's attention and MLP (CNN: after every block) whose down and up projections
    are each a sum over `branches` of low-rank products `P_i K_i Q_i`, the small `rank x rank` kernel `K_i` shared
    by the down and the up projection of a branch (transposed in the up one). The up projection's outer factors
    start at zero: the backbone is unchanged at init. Built for dense prediction with few parameters.

    Args:
        dim: Bottleneck width.
        rank: Size of the shared kernels (the paper's alpha).
        branches: Number of low-rank branches (the paper's beta).
    """

    vit_sublayers = ("attn", "mlp")

    dim: int = 64
    rank: int = 8
    branches: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "rank", self.rank)
        check_positive_int(self.method, "branches", self.branches)

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        shape = host.output_shape(name)
        dim = -1 if len(shape) != 4 or host.layout.nhwc else 1
        return LoRandAdapter(shape[dim], self.dim, self.rank, self.branches, self.act, self.scale, dim)


class LoRandAdapter(SequentialBottleneck):
    """A bottleneck (`Bottleneck`) whose `down` / `up` are built from factors: `down = sum_i P_i K_i Q_i` (dim x C),
    `up = sum_i U_i K_i^T V_i` (C x dim); parameters `lorand_*`."""

    def __init__(self, channels: int, dim: int, rank: int, branches: int, act: str, scale: float, cdim: int) -> None:
        super().__init__("lorand", channels, dim, act, scale, cdim, sequential=True)
        del self.lorand_down, self.lorand_up  # (built from the factors below)

        def param(*shape: int, zero: bool = False) -> nn.Parameter:
            p = torch.zeros(*shape) if zero else torch.empty(*shape)
            if not zero:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            return nn.Parameter(p)

        self.lorand_kernel = nn.Parameter(torch.eye(rank).repeat(branches, 1, 1) / branches)  # (kernels start as I)
        self.lorand_down_p = param(branches, dim, rank)
        self.lorand_down_q = param(branches, rank, channels)
        self.lorand_up_u = param(branches, channels, rank, zero=True)
        self.lorand_up_v = param(branches, rank, dim)

    def params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.lorand_kernel  # (b, r, r)
        down = (self.lorand_down_p @ k @ self.lorand_down_q).sum(0)  # (dim, C)
        up = (self.lorand_up_u @ k.transpose(1, 2) @ self.lorand_up_v).sum(0)  # (C, dim)
        return down, self.lorand_down_bias, up, self.lorand_up_bias

    def wise_(self, alpha: float, base: nn.Module) -> None:
        self.lorand_up_u.mul_(alpha)  # the output is linear in the up projection, and that in its outer factor
        self.lorand_up_bias.mul_(alpha)

"""RepAdapter: a linear (activation-free) adapter in front of a linear layer, folded into it after training."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_positive_float, check_positive_int
from .base import PeftConfig, register_method
from .layer import LayerAdapter

if TYPE_CHECKING:
    from ..backbone import BackboneHost


@register_method("repadapter")
@dataclasses.dataclass
class RepAdapter(PeftConfig):
    """RepAdapter (Luo et al., 2023, "Towards Efficient Visual Adaption via Structural Re-parameterization"): a
    linear bottleneck `x + scale * up(down(x))` (no activation) in front of each targeted Linear, so the pair is
    still linear and folds into that layer: `W' = W + scale * W @ up @ down`, `b` unchanged. Zero extra latency
    once merged; identity at init (`up` is zero). The paper's group-wise up projection is dense here.

    Args:
        dim: Bottleneck width.
        scale: Multiplier of the adapter's output (the paper's s; 1 by default, 10 in some of its recipes).
    """

    kinds: ClassVar[tuple[str, ...]] = ("vit",)
    foldable: ClassVar[bool] = True
    weight_update: ClassVar[bool] = True

    dim: int = 8
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "dim", self.dim)
        check_positive_float(self.method, "scale", self.scale)

    def supports(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def default_target(self, name: str, module: nn.Module, host: BackboneHost) -> bool:
        """In front of the attention (`qkv`) and the MLP (`fc1`) of every block, as in the paper."""
        parts = name.split(".")
        return len(parts) == 4 and parts[0] == "blocks" and parts[3] in ("qkv", "fc1") and self.supports(name, module)

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        return RepAdapterIn(module.in_features, self.dim, float(self.scale))


class RepAdapterIn(LayerAdapter):
    """`base(x + scale * up(down(x)))` = `y + scale * W @ up(down(x))` (the base's bias is not repeated)."""

    order: ClassVar[int] = 20

    def __init__(self, channels: int, dim: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.repadapter_down = nn.Parameter(torch.empty(dim, channels))  # (dim, C_in)
        nn.init.kaiming_uniform_(self.repadapter_down, a=math.sqrt(5))
        self.repadapter_up = nn.Parameter(torch.zeros(channels, dim))  # (C_in, dim)

    def adapt(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        delta = F.linear(F.linear(x, self.repadapter_down.to(x.dtype)), self.repadapter_up.to(x.dtype))
        return y + self.scale * F.linear(delta, base.weight.to(x.dtype))

    def fold(self, module: nn.Module) -> None:
        with torch.no_grad():
            w = module.weight
            w.add_(self.scale * (w @ self.repadapter_up) @ self.repadapter_down)

    def wise_(self, alpha: float, base: nn.Module) -> None:
        self.repadapter_up.mul_(alpha)  # the input change is linear in `up`

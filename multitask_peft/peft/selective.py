"""Selective tuning (the PETL study's partial fine-tuning of chosen layers) and DiffFit."""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import PeftConfig, register_method
from .layer import LayerAdapter, channel_dim, conv_like, out_channels, per_channel
from .partial import NormTune, OutputScaleShift, is_norm

if TYPE_CHECKING:
    from ..backbone import BackboneHost

PARTS = ("all", "attention", "mlp")
_BLOCK = re.compile(r"(?:^|.*\.)blocks\.(\d+)\.")


@register_method("selective")
@dataclasses.dataclass
class Selective(PeftConfig):
    """Selective tuning (Mai et al., 2025, the PETL study's partial fine-tuning): each task owns a change of the
    weights and biases of chosen layers, a dense `W + delta_weight` (zero at init), as fine-tuning only those
    layers would give (weight decay pulls toward the frozen weights rather than toward 0). Folds into the weights.

    Args:
        part: Which layers of the chosen blocks: "all" (every Linear / Conv2d), "attention" (`.attn.`) or "mlp"
            (`.mlp.`; ViTs).
        blocks: Indices of `blocks.<i>` to tune (None: every block); e.g. (10, 11) for the last two of a ViT-B.
    """

    foldable: ClassVar[bool] = True
    weight_update: ClassVar[bool] = True

    part: str = "all"
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.part not in PARTS:
            raise ValueError(f"{self.method}: `part` should be one of {PARTS} but the value passed is {self.part!r}")
        if self.blocks is not None:
            ok = isinstance(self.blocks, tuple) and self.blocks
            if not ok or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in self.blocks):
                raise ValueError(
                    f"{self.method}: `blocks` should be a non-empty tuple of block indices >= 0 (or None) but the "
                    f"value passed is {self.blocks!r}"
                )

    def supports(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Conv2d))

    def default_target(self, name: str, module: nn.Module, host: BackboneHost) -> bool:
        match = _BLOCK.match(name)
        if not self.supports(name, module) or match is None:
            return False
        if self.blocks is not None and int(match.group(1)) not in self.blocks:
            return False
        if self.part == "attention":
            return ".attn." in name
        if self.part == "mlp":
            return ".mlp." in name
        return True

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        return DeltaWeight(module)


class DeltaWeight(LayerAdapter):
    """`y + x @ delta_weight.T + delta_bias` (a convolution with `delta_weight` for Conv2d): a dense weight change."""

    order: ClassVar[int] = 20

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.delta_weight = nn.Parameter(torch.zeros_like(base.weight, requires_grad=True))
        self.delta_bias = nn.Parameter(torch.zeros(out_channels(base))) if base.bias is not None else None

    def adapt(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if isinstance(base, nn.Linear):
            return y + F.linear(x, self.delta_weight.to(x.dtype), None if self.delta_bias is None else self.delta_bias)
        y = y + conv_like(base, x, self.delta_weight.to(x.dtype))
        if self.delta_bias is not None:
            y = y + per_channel(self.delta_bias, channel_dim(base), y.ndim)
        return y

    def fold(self, module: nn.Module) -> None:
        with torch.no_grad():
            module.weight.add_(self.delta_weight)
            if self.delta_bias is not None:
                module.bias.add_(self.delta_bias)

    def wise_(self, alpha: float, base: nn.Module) -> None:
        self.delta_weight.mul_(alpha)
        if self.delta_bias is not None:
            self.delta_bias.mul_(alpha)


@register_method("difffit")
@dataclasses.dataclass
class DiffFit(PeftConfig):
    """DiffFit (Xie et al., 2023, "DiffFit: Unlocking Transferability of Large Diffusion Models via Simple
    Parameter-Efficient Fine-Tuning"): the biases of every Linear, the affines of the norm layers, and a learnable
    scale factor gamma (init 1) on the output of each block's attention and MLP branches (`scaled`), before the
    residual sum: `y * gamma + bias change`. Identity at init; folds into the weights.

    Args:
        scaled: Module name suffixes that get a gamma (timm ViT blocks: `attn.proj`, `mlp.fc2`).
    """

    kinds: ClassVar[tuple[str, ...]] = ("vit",)
    foldable: ClassVar[bool] = True

    scaled: tuple[str, ...] = ("attn.proj", "mlp.fc2")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.scaled, tuple) or not all(isinstance(s, str) and s for s in self.scaled):
            raise ValueError(
                f"{self.method}: `scaled` should be a tuple of module name suffixes but the value passed is "
                f"{self.scaled!r}"
            )

    def supports(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_norm(module)

    def default_target(self, name: str, module: nn.Module, host: BackboneHost) -> bool:
        return is_norm(module) or (isinstance(module, nn.Linear) and module.bias is not None)

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        if is_norm(module):
            return NormTune(module)
        scaled = any(name == s or name.endswith("." + s) for s in self.scaled)
        return DiffFitOutput(out_channels(module), scaled)


class DiffFitOutput(OutputScaleShift):
    """A Linear's bias change, and on the scaled branches a scalar gamma: `y * gamma + difffit_bias`."""

    order: ClassVar[int] = 40

    def __init__(self, channels: int, scaled: bool) -> None:
        super().__init__()
        self.channels = channels
        self.difffit_bias = nn.Parameter(torch.zeros(channels))
        self.difffit_gamma = nn.Parameter(torch.ones(1)) if scaled else None

    def scale_shift(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gamma = None if self.difffit_gamma is None else self.difffit_gamma.expand(self.channels)
        return gamma, self.difffit_bias

    def wise_(self, alpha: float, base: nn.Module) -> None:
        """gamma toward 1, the bias change toward 0."""
        if self.difffit_gamma is not None:
            self.difffit_gamma.copy_(1.0 + alpha * (self.difffit_gamma - 1.0))
        self.difffit_bias.mul_(alpha)

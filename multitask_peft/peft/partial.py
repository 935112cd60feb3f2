"""Partial tuning: BitFit, norm-layer affine tuning, SSF (scale and shift of features)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .. import kernels
from ..routing import Segment
from .base import PeftConfig, register_method
from .layer import LayerAdapter, channel_dim, norm_forward, norm_kind, out_channels, per_channel

if TYPE_CHECKING:
    from ..backbone import BackboneHost


def is_norm(module: nn.Module) -> bool:
    """A norm with an affine weight that `norm_forward` can recompute with another one."""
    return norm_kind(module) is not None and getattr(module, "weight", None) is not None


class NormAffine(LayerAdapter):
    """Changes a norm layer's affine weight / bias for one task; the layer is recomputed on that task's rows.

    Several methods of one task (norm tuning, BitFit, SSF) may change the same norm; `update_affine` applies them in
    `compose_order`, and the norm runs once with the result (before any activation fused into the layer).
    """

    order: ClassVar[int] = 0
    compose_order: ClassVar[int] = 0

    @classmethod
    def batch_key(cls) -> type[LayerAdapter]:
        return NormAffine

    def update_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def affine(base: nn.Module, adapters: list[NormAffine]) -> tuple[torch.Tensor, torch.Tensor]:
        weight = base.weight
        bias = base.bias if base.bias is not None else torch.zeros_like(base.weight)
        for adapter in sorted(adapters, key=lambda a: a.compose_order):
            weight, bias = adapter.update_affine(weight, bias)
        return weight, bias

    @classmethod
    def compose(cls, adapters: list[LayerAdapter], x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """All norm changes of one slot combined into one affine; the norm runs once on the segment."""
        weight, bias = cls.affine(base, adapters)
        return norm_forward(base, x, weight, bias)

    def fold(self, module: nn.Module) -> None:
        with torch.no_grad():
            bias = module.bias if module.bias is not None else torch.zeros_like(module.weight)
            weight, bias = self.update_affine(module.weight, bias)
            module.weight.copy_(weight)
            if module.bias is None:
                module.bias = nn.Parameter(bias.clone(), requires_grad=False)
            else:
                module.bias.copy_(bias)


class OutputScaleShift(LayerAdapter):
    """Per-channel `y * scale + shift` on a Linear / Conv2d output (BitFit: shift only; SSF: both)."""

    def scale_shift(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    @classmethod
    def apply_segments(cls, items: list[tuple[Segment, LayerAdapter]], x, y, base, cache=None) -> torch.Tensor:  # noqa: ANN001
        # token / channels-last rows as (rows * tokens, C); NCHW maps as (rows, C, H * W)
        y2 = y.reshape(-1, y.shape[-1]) if channel_dim(base) == -1 else y.reshape(y.shape[0], y.shape[1], -1)
        per_row = y2.shape[0] // y.shape[0]
        segments = [
            kernels.ScaleShiftSegment(seg.start * per_row, seg.end * per_row, *adapter.scale_shift())
            for seg, adapter in items
        ]
        y2 = (
            kernels.scale_shift(y2, segments, cache)
            if torch.is_grad_enabled()
            else kernels.scale_shift_(y2, segments, cache)
        )
        return y2.view(y.shape)

    def adapt(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        scale, shift = self.scale_shift()
        dim = channel_dim(base)
        if scale is not None:
            y = y * per_channel(scale, dim, y.ndim)
        if shift is not None:
            y = y + per_channel(shift, dim, y.ndim)
        return y

    def fold(self, module: nn.Module) -> None:
        scale, shift = self.scale_shift()
        with torch.no_grad():
            if scale is not None:
                module.weight.mul_(scale.view(-1, *([1] * (module.weight.ndim - 1))))
                if module.bias is not None:
                    module.bias.mul_(scale)
            if shift is not None:
                if module.bias is None:
                    module.bias = nn.Parameter(torch.zeros_like(shift), requires_grad=False)
                module.bias.add_(shift)


# --- BitFit ---------------------------------------------------------------------------------------------------


@register_method("bitfit")
@dataclasses.dataclass
class BitFit(PeftConfig):
    """BitFit (Ben Zaken et al., 2022): tune the bias terms only (as a per-task delta `bitfit_bias`)."""

    foldable: ClassVar[bool] = True

    def supports(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Conv2d)) or is_norm(module)

    def default_target(self, name: str, module: nn.Module, host: BackboneHost) -> bool:
        return self.supports(name, module) and getattr(module, "bias", None) is not None

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        return BitFitNorm(module) if is_norm(module) else BitFitBias(module)


class BitFitBias(OutputScaleShift):
    order: ClassVar[int] = 30

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.bitfit_bias = nn.Parameter(torch.zeros(out_channels(base)))

    def scale_shift(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, self.bitfit_bias

    def wise_(self, alpha: float, base: nn.Module) -> None:
        self.bitfit_bias.mul_(alpha)  # a bias delta


class BitFitNorm(NormAffine):
    compose_order: ClassVar[int] = 1

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.bitfit_bias = nn.Parameter(torch.zeros(out_channels(base)))

    def update_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return weight, bias + self.bitfit_bias

    def wise_(self, alpha: float, base: nn.Module) -> None:
        self.bitfit_bias.mul_(alpha)  # a bias delta


# --- norm tuning ----------------------------------------------------------------------------------------------


@register_method("norm")
@dataclasses.dataclass
class NormTuning(PeftConfig):
    """LayerNorm / BatchNorm affine tuning: each task owns the affine weight and bias of the targeted norm layers.

    Normalisation statistics stay frozen (BatchNorm uses its running statistics).
    """

    foldable: ClassVar[bool] = True

    def supports(self, name: str, module: nn.Module) -> bool:
        return is_norm(module)

    def default_target(self, name: str, module: nn.Module, host: BackboneHost) -> bool:
        return is_norm(module)

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        return NormTune(module)


class NormTune(NormAffine):
    compose_order: ClassVar[int] = 0

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.norm_weight = nn.Parameter(base.weight.detach().clone())
        bias = base.bias if base.bias is not None else torch.zeros_like(base.weight)
        self.norm_bias = nn.Parameter(bias.detach().clone())

    def update_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.norm_weight, self.norm_bias

    def wise_(self, alpha: float, base: nn.Module) -> None:
        """The tuned affine moved toward the frozen one (the task owns the whole affine, not a delta)."""
        frozen_bias = base.bias if base.bias is not None else torch.zeros_like(base.weight)
        self.norm_weight.copy_(base.weight + alpha * (self.norm_weight - base.weight))
        self.norm_bias.copy_(frozen_bias + alpha * (self.norm_bias - frozen_bias))


# --- SSF ------------------------------------------------------------------------------------------------------


@register_method("ssf")
@dataclasses.dataclass
class SSF(PeftConfig):
    """Scaling & Shifting your Features (Lian et al., 2022): `y * ssf_scale + ssf_shift` after each targeted op.

    Defaults: every Linear and norm of a ViT; every Conv2d and norm of a CNN. On a norm layer the scale and shift
    act on its affine output, before any activation timm fuses into it. Folds into the weights.

    Args:
        init_std: Init noise of scale (around 1) and shift (around 0); 0 gives an exact identity at init.
    """

    foldable: ClassVar[bool] = True

    init_std: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_std, (int, float)) or self.init_std < 0:
            raise ValueError(f"{self.method}: `init_std` should be >= 0 but the value passed is {self.init_std!r}")

    def supports(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Conv2d)) or is_norm(module)

    def default_target(self, name: str, module: nn.Module, host: BackboneHost) -> bool:
        if host.layout.kind == "vit":
            return isinstance(module, nn.Linear) or is_norm(module)
        return isinstance(module, nn.Conv2d) or is_norm(module)

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        return (SSFNorm if is_norm(module) else SSFOutput)(out_channels(module), self.init_std)


class _SSFParams(nn.Module):
    def _init_ssf(self, channels: int, init_std: float) -> None:
        self.ssf_scale = nn.Parameter(1.0 + init_std * torch.randn(channels))
        self.ssf_shift = nn.Parameter(init_std * torch.randn(channels))

    def wise_(self, alpha: float, base: nn.Module) -> None:
        """Scale toward 1 and shift toward 0 (the identity)."""
        self.ssf_scale.copy_(1.0 + alpha * (self.ssf_scale - 1.0))
        self.ssf_shift.mul_(alpha)


class SSFOutput(OutputScaleShift, _SSFParams):
    order: ClassVar[int] = 40
    wise_ = _SSFParams.wise_

    def __init__(self, channels: int, init_std: float) -> None:
        super().__init__()
        self._init_ssf(channels, init_std)

    def scale_shift(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.ssf_scale, self.ssf_shift


class SSFNorm(NormAffine, _SSFParams):
    compose_order: ClassVar[int] = 2
    wise_ = _SSFParams.wise_

    def __init__(self, channels: int, init_std: float) -> None:
        super().__init__()
        self._init_ssf(channels, init_std)

    def update_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return weight * self.ssf_scale, bias * self.ssf_scale + self.ssf_shift

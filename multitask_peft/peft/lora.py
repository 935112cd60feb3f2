"""LoRA and DoRA: low-rank weight updates on Linear and Conv2d (incl. depthwise / grouped, and q/k/v slices)."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import check_choice, check_positive_int
from ..routing import Segment
from .base import PeftConfig, register_method
from .layer import LayerAdapter, conv_like, per_channel

if TYPE_CHECKING:
    from ..backbone import BackboneHost

_QKV = ("q", "k", "v")


def _is_pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def lowrank_default_target(name: str, module: nn.Module, host: BackboneHost) -> bool:
    """Defaults of the low-rank methods, from module types and shapes (any family): a ViT-like's attention input
    projections (the fused qkv, or q / k / v); a CNN's pointwise convs and linears, except gates on pooled 1x1 maps
    (squeeze-excitation)."""
    if host.layout.kind == "vit":
        return name in host.attention_inputs()
    if len(shape := host.input_shape(name)) == 4 and tuple(shape[2:]) == (1, 1):
        return False
    return _is_pointwise(module) or isinstance(module, nn.Linear)


@register_method("lora")
@dataclasses.dataclass
class LoRA(PeftConfig):
    """Low-rank adaptation (Hu et al., 2021): `W x + (alpha / r) * B A x`.

    Args:
        r: Rank.
        alpha: Scale numerator; None means `alpha = r` (scale 1).
        dropout: Dropout on the LoRA branch input during training.
        init: "kaiming" (A Kaiming-uniform, B zero, as HF PEFT) or "gaussian" (A ~ N(0, 1/r), B zero).
        use_rslora: Scale by `alpha / sqrt(r)` (rank-stabilised LoRA).
        qkv_slices: For timm's fused `qkv` projections: adapt only these slices ("q", "k", "v") with their own
            factors (the original LoRA recipe is ("q", "v")); None adapts the fused matrix as one.
    """

    foldable: ClassVar[bool] = True
    weight_update: ClassVar[bool] = True
    adapter_files: ClassVar[bool] = True

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    init: str = "kaiming"
    use_rslora: bool = False
    qkv_slices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "r", self.r)
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))):
            raise ValueError(
                f"{self.method}: `alpha` should be a number or None but the value passed is {self.alpha!r}"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.method}: `dropout` should be in [0, 1) but the value passed is {self.dropout!r}")
        check_choice(self.method, "init", self.init, ("kaiming", "gaussian"))
        slices = self.qkv_slices
        if slices is not None and (not slices or any(s not in _QKV for s in slices) or len(set(slices)) != len(slices)):
            raise ValueError(f"{self.method}: `qkv_slices` must be distinct entries of {_QKV}, got {slices!r}")

    @property
    def scale(self) -> float:
        alpha = self.r if self.alpha is None else self.alpha
        return alpha / math.sqrt(self.r) if self.use_rslora else alpha / self.r

    def supports(self, name: str, module: nn.Module) -> bool:
        if self.qkv_slices is not None:
            return isinstance(module, nn.Linear) and module.out_features % 3 == 0
        return isinstance(module, (nn.Linear, nn.Conv2d))

    def default_target(self, name: str, module: nn.Module, host: BackboneHost) -> bool:
        return lowrank_default_target(name, module, host)

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        if isinstance(module, nn.Conv2d):
            return LoRAConv2d(module, self)
        if self.qkv_slices is not None:
            return LoRAQKV(module, self)
        return LoRALinear(module, self)


def _init_lora(a: torch.Tensor, b: torch.Tensor, init: str, r: int) -> None:
    if init == "kaiming":
        nn.init.kaiming_uniform_(a.view(-1, a.shape[-1]), a=math.sqrt(5))
    else:
        nn.init.normal_(a, std=1.0 / r)
    nn.init.zeros_(b)


class LoRALinear(LayerAdapter):
    """`y += scale * (x @ lora_a.T) @ lora_b.T` on a Linear."""

    order: ClassVar[int] = 20

    def __init__(self, base: nn.Linear, config: LoRA) -> None:
        super().__init__()
        self.scale = config.scale
        self.dropout = config.dropout
        self.lora_a = nn.Parameter(torch.empty(config.r, base.in_features))  # (r, in)
        self.lora_b = nn.Parameter(torch.empty(base.out_features, config.r))  # (out, r)
        _init_lora(self.lora_a, self.lora_b, config.init, config.r)

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """(lora_a, lora_b, first output column) per independently adapted block of the output."""
        return [(self.lora_a, self.lora_b, 0)]

    @classmethod
    def apply_segments(cls, items: list[tuple[Segment, LayerAdapter]], x, y, base, cache=None) -> torch.Tensor:  # noqa: ANN001
        x2 = x.reshape(-1, x.shape[-1])  # (rows * tokens, in)
        y2 = y.reshape(-1, y.shape[-1])  # (rows * tokens, out)
        tokens = x2.shape[0] // x.shape[0]
        by_dropout: dict[float, list[kernels.LoRASegment]] = defaultdict(list)  # one op per dropout rate
        for seg, adapter in items:
            p = adapter.dropout if adapter.training else 0.0
            start, end = seg.start * tokens, seg.end * tokens
            by_dropout[p] += [
                kernels.LoRASegment(start, end, a, b, adapter.scale, col) for a, b, col in adapter.factors()
            ]
        for p, segments in by_dropout.items():
            xs = F.dropout(x2, p, training=True) if p else x2
            y2 = (
                kernels.lora(y2, xs, segments, cache)
                if torch.is_grad_enabled()
                else kernels.lora_(y2, xs, segments, cache)
            )
        return y2.view(y.shape)

    def adapt(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        xs = F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x
        for a, b, col in self.factors():
            delta = (xs @ a.t()) @ b.t() * self.scale  # (..., out_slice)
            if delta.shape[-1] != y.shape[-1]:  # a q/k/v slice: place it in its columns
                delta = F.pad(delta, (col, y.shape[-1] - col - delta.shape[-1]))
            y = y + delta
        return y

    def fold(self, module: nn.Module) -> None:
        with torch.no_grad():
            for a, b, col in self.factors():
                module.weight[col : col + b.shape[0]] += self.scale * (b @ a)

    def wise_(self, alpha: float, base: nn.Module) -> None:
        self.lora_b.mul_(alpha)  # delta = scale * B A is linear in B (fused qkv: every slice's B)


class LoRAQKV(LoRALinear):
    """Per-slice LoRA on a fused qkv projection: each listed slice of q / k / v gets its own (A, B)."""

    def __init__(self, base: nn.Linear, config: LoRA) -> None:
        LayerAdapter.__init__(self)
        self.scale = config.scale
        self.dropout = config.dropout
        self.slices = tuple(_QKV.index(s) for s in config.qkv_slices)
        dim = base.out_features // 3
        self.lora_a = nn.Parameter(torch.empty(len(self.slices), config.r, base.in_features))  # (k, r, in)
        self.lora_b = nn.Parameter(torch.empty(len(self.slices), dim, config.r))  # (k, dim, r)
        _init_lora(self.lora_a, self.lora_b, config.init, config.r)

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        dim = self.lora_b.shape[1]
        return [(self.lora_a[i], self.lora_b[i], s * dim) for i, s in enumerate(self.slices)]


class LoRAConv2d(LayerAdapter):
    """LoRA on a Conv2d: `delta W = scale * B @ A` viewed as (out, in / groups, kh, kw).

    groups == 1 runs as a rank-r convolution followed by a 1x1 (cheap); grouped / depthwise convolutions apply
    the materialised low-rank weight delta, which is as small as the kernel itself.
    """

    order: ClassVar[int] = 20

    def __init__(self, base: nn.Conv2d, config: LoRA) -> None:
        super().__init__()
        self.scale = config.scale
        self.dropout = config.dropout
        fan_in = base.weight[0].numel()  # in / groups * kh * kw
        self.lora_a = nn.Parameter(torch.empty(config.r, fan_in))  # (r, in/g*kh*kw)
        self.lora_b = nn.Parameter(torch.empty(base.out_channels, config.r))  # (out, r)
        _init_lora(self.lora_a, self.lora_b, config.init, config.r)

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """(lora_a, lora_b, 0): the factors over flattened (C / groups, kh, kw) patches (see `LoRALinear.factors`)."""
        return [(self.lora_a, self.lora_b, 0)]

    def delta(self, x: torch.Tensor, base: nn.Conv2d) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        if base.groups == 1:
            h = conv_like(base, x, self.lora_a.view(-1, *base.weight.shape[1:]))  # (n, r, H', W')
            return F.conv2d(h, self.lora_b[:, :, None, None]) * self.scale
        return conv_like(base, x, (self.lora_b @ self.lora_a).view_as(base.weight) * self.scale)

    def adapt(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return y + self.delta(x, base)

    @classmethod
    def apply_segments(cls, items: list[tuple[Segment, LayerAdapter]], x, y, base, cache=None) -> torch.Tensor:  # noqa: ANN001
        """A patchify convolution (kernel = stride, no padding, one group: a ViT's patch embedding, a CNN's
        pointwise conv) is a linear map of non-overlapping patches, so every segment runs as one batched LoRA op
        over the patch rows; other convolutions apply each segment's delta."""
        if not _is_patchify(base):
            return super().apply_segments(items, x, y, base, cache)
        n, c = x.shape[:2]
        (kh, kw), (oh, ow) = base.kernel_size, y.shape[2:]
        patches = x[:, :, : oh * kh, : ow * kw].reshape(n, c, oh, kh, ow, kw).permute(0, 2, 4, 1, 3, 5)
        rows = patches.reshape(n, oh * ow, c * kh * kw)  # (images, patches, C*kh*kw): lora_a's (C, kh, kw) order
        y_rows = y.permute(0, 2, 3, 1).reshape(n, oh * ow, -1)
        out = LoRALinear.apply_segments(items, rows, y_rows, base, cache).view(n, oh, ow, -1).permute(0, 3, 1, 2)
        if torch.is_grad_enabled():
            return out.contiguous(memory_format=torch.contiguous_format)
        if out.untyped_storage().data_ptr() != y.untyped_storage().data_ptr():  # updated a copy (NCHW `y`)
            y.copy_(out)
        return y

    def fold(self, module: nn.Module) -> None:
        with torch.no_grad():
            module.weight += self.scale * (self.lora_b @ self.lora_a).view_as(module.weight)

    def wise_(self, alpha: float, base: nn.Module) -> None:
        self.lora_b.mul_(alpha)  # delta = scale * B A is linear in B


def _is_patchify(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.groups == 1
        and tuple(conv.kernel_size) == tuple(conv.stride)
        and tuple(conv.padding) == (0, 0)
        and tuple(conv.dilation) == (1, 1)
    )


@register_method("dora")
@dataclasses.dataclass
class DoRA(LoRA):
    """Weight-decomposed low-rank adaptation (Liu et al., 2024): `m * (W + s B A) / ||W + s B A||` per output channel.

    Same options as LoRA (no `qkv_slices`); the magnitude vector `dora_magnitude` starts at the frozen row norms.
    """

    adapter_files: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.qkv_slices is not None:
            raise ValueError(f"{self.method}: `qkv_slices` is not supported; adapt the fused qkv or use lora")

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        return DoRAAdapter(module, self)


class DoRAAdapter(LayerAdapter):
    """Rescales the low-rank-updated output: `y' = (y - b + s delta(x)) * m / ||W + s B A||_row + b`."""

    order: ClassVar[int] = 10

    def __init__(self, base: nn.Linear | nn.Conv2d, config: DoRA) -> None:
        super().__init__()
        self.lowrank = LoRAConv2d(base, config) if isinstance(base, nn.Conv2d) else LoRALinear(base, config)
        with torch.no_grad():
            magnitude = base.weight.detach().flatten(1).norm(dim=1)
        self.dora_magnitude = nn.Parameter(magnitude.clone())  # (out,)

    def updated_weight(self, base: nn.Module) -> torch.Tensor:
        delta = (self.lowrank.lora_b @ self.lowrank.lora_a).view_as(base.weight)
        return base.weight + self.lowrank.scale * delta

    def adapt(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ratio = self.dora_magnitude / self.updated_weight(base).flatten(1).norm(dim=1)  # (out,)
        dim = 1 if isinstance(base, nn.Conv2d) else -1
        bias = per_channel(base.bias, dim, y.ndim) if base.bias is not None else 0.0
        if isinstance(base, nn.Conv2d):
            delta = self.lowrank.delta(x, base)
        else:
            xs = F.dropout(x, self.lowrank.dropout, True) if self.lowrank.dropout and self.training else x
            delta = (xs @ self.lowrank.lora_a.t()) @ self.lowrank.lora_b.t() * self.lowrank.scale
        return (y - bias + delta) * per_channel(ratio, dim, y.ndim) + bias

    def wise_(self, alpha: float, base: nn.Module) -> None:
        """The low-rank update scaled by alpha, the magnitude moved toward the frozen weight's row norms: alpha = 0
        gives back `base` exactly."""
        self.lowrank.wise_(alpha, base)
        frozen = base.weight.detach().flatten(1).norm(dim=1)  # (out,)
        self.dora_magnitude.copy_(frozen + alpha * (self.dora_magnitude - frozen))

    def fold(self, module: nn.Module) -> None:
        with torch.no_grad():
            weight = self.updated_weight(module)
            ratio = self.dora_magnitude / weight.flatten(1).norm(dim=1)
            module.weight.copy_(weight * ratio.view(-1, *([1] * (weight.ndim - 1))))

"""Addition methods with bottleneck modules: Houlsby and Pfeiffer adapters, AdaptFormer, Convpass."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import check_choice, check_positive_int
from ..routing import Segment
from .base import PeftConfig, register_method
from .layer import LayerAdapter

if TYPE_CHECKING:
    from ..backbone import BackboneHost

ACTIVATIONS = {name: fn for name, fn in kernels.ACTIVATIONS.items() if name != "identity"}


def _is_vit_sublayer(name: str, kind: str) -> bool:
    parts = name.split(".")
    return len(parts) == 3 and parts[0] == "blocks" and parts[2] == kind


class Bottleneck(LayerAdapter):
    """`up(act(down(z))) * scale` over the channel dim of z; parameters are named `<prefix>_down`, `<prefix>_up`.

    Args:
        prefix: Method name used as parameter prefix.
        channels: Width of z.
        dim: Bottleneck width.
        act: Activation name.
        scale: Output multiplier.
        channel_dim: -1 for tokens / channels-last, 1 for NCHW maps.
        sequential: True: `y + f(y)` (adapter after the module); False: `y + f(x)` (in parallel to it).
    """

    def __init__(
        self, prefix: str, channels: int, dim: int, act: str, scale: float, channel_dim: int, sequential: bool
    ) -> None:
        super().__init__()
        self.prefix, self.act, self.scale = prefix, act, scale
        self.channel_dim, self.sequential = channel_dim, sequential
        down = nn.Parameter(torch.empty(dim, channels))  # (dim, C)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        self.register_parameter(f"{prefix}_down", down)
        self.register_parameter(f"{prefix}_down_bias", nn.Parameter(torch.zeros(dim)))
        self.register_parameter(f"{prefix}_up", nn.Parameter(torch.zeros(channels, dim)))  # (C, dim)
        self.register_parameter(f"{prefix}_up_bias", nn.Parameter(torch.zeros(channels)))

    def params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.prefix
        return (
            getattr(self, f"{p}_down"),
            getattr(self, f"{p}_down_bias"),
            getattr(self, f"{p}_up"),
            getattr(self, f"{p}_up_bias"),
        )

    def wise_(self, alpha: float, base: nn.Module) -> None:
        _, _, up, up_b = self.params()  # the adapter's output (its delta) is linear in the up projection
        up.mul_(alpha)
        up_b.mul_(alpha)

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        down, down_b, up, up_b = self.params()
        if self.channel_dim == -1:
            h = ACTIVATIONS[self.act](F.linear(z, down, down_b))  # (..., dim)
            return F.linear(h, up, up_b) * self.scale  # (..., C)
        h = ACTIVATIONS[self.act](F.conv2d(z, down[:, :, None, None], down_b))  # (n, dim, H, W)
        return F.conv2d(h, up[:, :, None, None], up_b) * self.scale  # (n, C, H, W)

    def adapt(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return y + self.bottleneck(y if self.sequential else x)

    @classmethod
    def apply_segments(cls, items: list[tuple[Segment, LayerAdapter]], x, y, base, cache=None) -> torch.Tensor:  # noqa: ANN001
        """Token / channels-last rows of plain bottlenecks run as one segmented op; others segment by segment."""
        plain = [(s, a) for s, a in items if a.channel_dim == -1 and type(a).bottleneck is Bottleneck.bottleneck]
        if len(plain) < len(items):
            return super().apply_segments(items, x, y, base, cache)
        z = y if plain[0][1].sequential else x
        z2, y2 = z.reshape(-1, z.shape[-1]), y.reshape(-1, y.shape[-1])  # (rows * tokens, C)
        tokens = y2.shape[0] // y.shape[0]
        segments = [
            kernels.BottleneckSegment(seg.start * tokens, seg.end * tokens, *a.params(), a.act, a.scale)
            for seg, a in plain
        ]
        y2 = (
            kernels.bottleneck(y2, z2, segments, cache)
            if torch.is_grad_enabled()
            else kernels.bottleneck_(y2, z2, segments, cache)
        )
        return y2.view(y.shape)


class ParallelBottleneck(Bottleneck):
    """`y + f(x)`: runs with the other parallel deltas (LoRA, FacT)."""

    order: ClassVar[int] = 20


class SequentialBottleneck(Bottleneck):
    """`y + f(y)`: runs after every other change of the module's output."""

    order: ClassVar[int] = 50


@dataclasses.dataclass
class _BottleneckConfig(PeftConfig):
    dim: int = 8
    act: str = "gelu"
    scale: float = 1.0

    sequential: ClassVar[bool] = True
    vit_sublayers: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "dim", self.dim)
        check_choice(self.method, "act", self.act, ACTIVATIONS)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"{self.method}: `scale` should be a number but the value passed is {self.scale!r}")

    def supports(self, name: str, module: nn.Module) -> bool:
        return True

    def default_target(self, name: str, module: nn.Module, host: BackboneHost) -> bool:
        if host.layout.kind == "vit":
            return any(_is_vit_sublayer(name, s) for s in self.vit_sublayers)
        return name in {p.name for p in host.layout.parts[1:-1]}  # every unit (block) of a CNN

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        shape = host.output_shape(name)
        dim = -1 if len(shape) != 4 or host.layout.nhwc else 1
        if not self.sequential and host.input_shape(name) != shape:
            raise ValueError(
                f"{self.method} runs in parallel to a module and needs equal input and output shapes; "
                f"{name} maps {host.input_shape(name)} to {shape}"
            )
        cls = SequentialBottleneck if self.sequential else ParallelBottleneck
        return cls(self.method, shape[dim], self.dim, self.act, self.scale, dim, self.sequential)


@register_method("houlsby")
@dataclasses.dataclass
class Houlsby(_BottleneckConfig):
    """Houlsby et al. (2019) adapters: a bottleneck after the attention and after the MLP of every block
    (CNN: after every block). Up-projection zero-initialised, so the backbone is unchanged at init."""

    vit_sublayers: ClassVar[tuple[str, ...]] = ("attn", "mlp")


@register_method("pfeiffer")
@dataclasses.dataclass
class Pfeiffer(_BottleneckConfig):
    """Pfeiffer et al. (2021) adapters: one bottleneck after the MLP of every block (CNN: after every block)."""

    vit_sublayers: ClassVar[tuple[str, ...]] = ("mlp",)


@register_method("adaptformer")
@dataclasses.dataclass
class AdaptFormer(_BottleneckConfig):
    """AdaptFormer (Chen et al., 2022): a scaled ReLU bottleneck in parallel to each block's MLP (ViT only)."""

    kinds: ClassVar[tuple[str, ...]] = ("vit",)
    sequential: ClassVar[bool] = False
    vit_sublayers: ClassVar[tuple[str, ...]] = ("mlp",)

    dim: int = 16
    act: str = "relu"
    scale: float = 0.1


@register_method("convpass")
@dataclasses.dataclass
class Convpass(_BottleneckConfig):
    """Convpass (Jie & Deng, 2022): a convolutional bypass (1x1 down, 3x3 conv on the patch grid, 1x1 up) in
    parallel to each block's attention and MLP (ViT only). Prefix tokens pass through the 3x3 conv as 1x1 maps."""

    kinds: ClassVar[tuple[str, ...]] = ("vit",)
    sequential: ClassVar[bool] = False
    vit_sublayers: ClassVar[tuple[str, ...]] = ("attn", "mlp")

    act: str = "quick_gelu"
    scale: float = 0.01

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        channels = host.output_shape(name)[-1]
        return ConvpassAdapter(channels, self.dim, self.act, self.scale, host.layout.num_prefix_tokens)


class ConvpassAdapter(ParallelBottleneck):
    def __init__(self, channels: int, dim: int, act: str, scale: float, num_prefix_tokens: int) -> None:
        super().__init__("convpass", channels, dim, act, scale, -1, sequential=False)
        self.num_prefix_tokens = num_prefix_tokens
        conv = nn.Parameter(torch.empty(dim, dim, 3, 3))
        nn.init.xavier_uniform_(conv)
        self.convpass_conv = conv
        self.convpass_conv_bias = nn.Parameter(torch.zeros(dim))

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        down, down_b, up, up_b = self.params()
        act = ACTIVATIONS[self.act]
        h = act(F.linear(z, down, down_b))  # (n, T, dim)
        n, t, d = h.shape
        npt = self.num_prefix_tokens
        side = math.isqrt(t - npt)
        if side * side != t - npt:
            raise ValueError(f"convpass needs a square patch grid; got {t - npt} patch tokens")
        grid = h[:, npt:].transpose(1, 2).reshape(n, d, side, side)  # (n, dim, h, w)
        grid = F.conv2d(grid, self.convpass_conv, self.convpass_conv_bias, padding=1).flatten(2).transpose(1, 2)
        prefix = F.linear(h[:, :npt], self.convpass_conv[:, :, 1, 1], self.convpass_conv_bias)  # 1x1 maps: centre tap
        h = act(torch.cat([prefix, grid], dim=1))  # (n, T, dim)
        return F.linear(h, up, up_b) * self.scale

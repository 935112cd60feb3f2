"""Prefix tuning: learned key / value prefixes in every targeted attention layer."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn

from ..config import check_positive_int, check_unit_interval
from .base import MethodModule, PeftConfig, attention_log_scale, register_method
from .layer import LayerAdapter, frozen

if TYPE_CHECKING:
    from ..backbone import BackboneHost


@register_method("prefix")
@dataclasses.dataclass
class Prefix(PeftConfig):
    """Prefix tuning (Li & Liang, 2021; for ViTs as in the V-PEFT benchmark): each targeted attention layer attends
    to `num_tokens` learned keys and values in front of its own (`softmax(q [P_k; K]^T) [P_v; V]`). Unlike VPT, the
    sequence keeps its length: prefixes are extra attention inputs of one layer, not tokens that flow through the
    blocks. The layer is recomputed from its frozen `qkv` / `proj` on the task's rows, so no other method of the
    same task may adapt those sub-layers (refused). Plain timm `Attention` layers (ViT, DeiT, ...).

    Args:
        num_tokens: Prefix length per layer.
        prefix_scale: Factor on the attention paid to the prefixes (log(prefix_scale) added to their scores), in
            [0, 1]; WiSE scales it by alpha (0: the frozen layer).
    """

    kinds: ClassVar[tuple[str, ...]] = ("vit",)
    identity_at_init: ClassVar[bool] = False  # (prefixes take attention mass from the first step)
    owns_submodules: ClassVar[bool] = True

    num_tokens: int = 8
    prefix_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "num_tokens", self.num_tokens)
        check_unit_interval(self.method, "prefix_scale", self.prefix_scale)

    def supports(self, name: str, module: nn.Module) -> bool:
        return type(module) is Attention

    def default_target(self, name: str, module: nn.Module, host: BackboneHost) -> bool:
        return self.supports(name, module)

    def method_module(self, adapters: dict[str, LayerAdapter]) -> MethodModule:
        return PrefixModule(self, adapters)

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        return PrefixAttention(self, module.num_heads, module.head_dim)


class PrefixModule(MethodModule):
    @torch.no_grad()
    def wise_(self, alpha: float, host: BackboneHost) -> None:
        """WiSE for prefixes: the attention paid to them is scaled by `alpha` (saved as `prefix_scale`)."""
        self.config = dataclasses.replace(self.config, prefix_scale=self.config.prefix_scale * alpha)
        for adapter in self.adapters().values():
            adapter.config = self.config


class PrefixAttention(LayerAdapter):
    """The attention layer recomputed with this task's key / value prefixes (parameters `prefix_key`,
    `prefix_value`: (num_tokens, heads * head_dim))."""

    order: ClassVar[int] = 5  # (replaces the layer's output: before any change of that output)

    def __init__(self, config: Prefix, heads: int, head_dim: int) -> None:
        super().__init__()
        self.config = config
        self.heads, self.head_dim = heads, head_dim
        bound = 1.0 / math.sqrt(head_dim)
        self.prefix_key = nn.Parameter(torch.empty(config.num_tokens, heads * head_dim).uniform_(-bound, bound))
        self.prefix_value = nn.Parameter(torch.empty(config.num_tokens, heads * head_dim).uniform_(-bound, bound))

    def adapt(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        b, n, _ = x.shape
        h, d, p = self.heads, self.head_dim, self.config.num_tokens
        gate = base.gate(x).sigmoid() if getattr(base, "gate", None) is not None else None
        qkv = frozen(base.qkv)(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (b, h, n, d)
        q, k = frozen(base.q_norm)(q), frozen(base.k_norm)(k)
        pk = self.prefix_key.to(x.dtype).view(p, h, d).transpose(0, 1).expand(b, -1, -1, -1)  # (b, h, p, d)
        pv = self.prefix_value.to(x.dtype).view(p, h, d).transpose(0, 1).expand(b, -1, -1, -1)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        scale = float(self.config.prefix_scale)
        mask = None
        if scale != 1.0:
            mask = x.new_zeros(1, 1, 1, p + n)
            mask[..., :p] = attention_log_scale(scale)
        drop = base.attn_drop.p if base.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        out = out.transpose(1, 2).reshape(b, n, h * d)
        out = frozen(getattr(base, "norm", nn.Identity()))(out)
        if gate is not None:
            out = out * gate
        return base.proj_drop(frozen(base.proj)(out))

    def wise_(self, alpha: float, base: nn.Module) -> None:
        raise ValueError("prefix WiSE scales the method's `prefix_scale` (MethodModule.wise_), not one layer")

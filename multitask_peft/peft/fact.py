"""FacT (Jie & Deng, 2023): factor-tuning, low-rank updates whose factors are shared across layers."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..config import check_choice, check_positive_int
from .base import MethodModule, PeftConfig, register_method, select_targets
from .lora import LoRALinear

if TYPE_CHECKING:
    from ..backbone import BackboneHost


@register_method("fact")
@dataclasses.dataclass
class FacT(PeftConfig):
    """Tensorised low-rank updates `delta W_l = scale * V_out Core_l U_in^T` with U, V shared by every targeted layer
    of the same input / output width (the paper's stacked-weight tensor, grouped by shape so that fused qkv and
    MLP matrices join too).

    Args:
        r: Rank of the shared factors.
        mode: "tt" (a free r x r core per layer) or "tk" (Tucker: a shared r x r x r core mixed by a per-layer
            r-vector).
        scale: Multiplier of the update.
    """

    kinds: ClassVar[tuple[str, ...]] = ("vit",)
    foldable: ClassVar[bool] = True
    weight_update: ClassVar[bool] = True

    r: int = 8
    mode: str = "tt"
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "r", self.r)
        check_choice(self.method, "mode", self.mode, ("tt", "tk"))

    def supports(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def default_target(self, name: str, module: nn.Module, host: BackboneHost) -> bool:
        return isinstance(module, nn.Linear) and name.startswith("blocks.")

    def build(self, host: BackboneHost) -> MethodModule:
        if host.layout.kind not in self.kinds:
            raise ValueError(f"{self.method} applies to vit backbones; {host.arch} is a {host.layout.kind} backbone")
        names = select_targets(self, host)
        shared = FacTShared(
            self, {host.module(n).in_features for n in names}, {host.module(n).out_features for n in names}
        )
        adapters = {n: FacTLayer(host.module(n), self, shared) for n in names}
        return FacTModule(self, adapters, shared)


class FacTShared(nn.Module):
    """Factors shared by all layers of one task: `fact_u.<in>` (in, r), `fact_v.<out>` (out, r), TK core."""

    def __init__(self, config: FacT, in_dims: set[int], out_dims: set[int]) -> None:
        super().__init__()
        r = config.r
        self.fact_u = nn.ParameterDict(
            {str(d): nn.Parameter(nn.init.xavier_uniform_(torch.empty(d, r))) for d in in_dims}
        )
        self.fact_v = nn.ParameterDict(
            {str(d): nn.Parameter(nn.init.xavier_uniform_(torch.empty(d, r))) for d in out_dims}
        )
        if config.mode == "tk":
            self.fact_tucker = nn.Parameter(nn.init.xavier_uniform_(torch.empty(r, r, r)))


class FacTModule(MethodModule):
    def __init__(self, config: FacT, adapters: dict[str, FacTLayer], shared: FacTShared) -> None:
        super().__init__(config, adapters)
        self.shared = shared


class FacTLayer(LoRALinear):
    """One layer's FacT update, run through the segmented LoRA op as A = Core U^T, B = V."""

    def __init__(self, base: nn.Linear, config: FacT, shared: FacTShared) -> None:
        nn.Module.__init__(self)
        self.scale = config.scale
        self.dropout = 0.0
        self.in_key, self.out_key = str(base.in_features), str(base.out_features)
        self._shared = [shared]  # a plain list: the shared factors are registered once, on the method module
        if config.mode == "tt":
            self.fact_core = nn.Parameter(torch.zeros(config.r, config.r))
        else:
            self.fact_mix = nn.Parameter(torch.zeros(config.r))

    def wise_(self, alpha: float, base: nn.Module) -> None:
        """The update is linear in the layer's own core (tt) or mixing weights (tk); the shared factors stay."""
        (self.fact_core if hasattr(self, "fact_core") else self.fact_mix).mul_(alpha)

    def core(self) -> torch.Tensor:
        if hasattr(self, "fact_core"):
            return self.fact_core  # (r, r)
        return torch.einsum("ijk,k->ij", self._shared[0].fact_tucker, self.fact_mix)

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        shared = self._shared[0]
        return [(self.core() @ shared.fact_u[self.in_key].t(), shared.fact_v[self.out_key], 0)]  # (r, in), (out, r)

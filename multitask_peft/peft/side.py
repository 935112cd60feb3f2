"""Side methods: LST (a light network beside the frozen backbone) and VQT (query tokens reading every block).

The backbone runs as it is; the side network reads the outputs of its units (blocks or stages) for the task's rows
and adds its own result to the task's features. Nothing of the backbone needs autograd for such a task, which is
the family's point: training memory and time drop with the backward pass through the backbone.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import nn

from ..config import check_positive_int
from ..heads import Features
from ..layouts import FeatureLevel, Layout
from ..routing import PLAIN_SLOT, StackedRouting
from .base import MethodModule, PeftConfig, SideNetwork, match_targets, register_method
from .layer import frozen

if TYPE_CHECKING:
    from ..backbone import BackboneHost


FEATURES = ("auto", "pooled", "maps", "both")


@register_method("lst")
@dataclasses.dataclass
class LST(PeftConfig):
    """Ladder side-tuning (Sung et al., NeurIPS 2022, "LST: Ladder Side-Tuning for Parameter and Memory Efficient
    Transfer Learning"): a narrow side network next to the frozen backbone, fed through "ladder" connections by the
    outputs of the backbone's units, so that no gradient flows through the backbone.

    Here the side state is a feature map of `width` channels on each unit's grid (a ViT's patch grid, a CNN's or
    Swin's stage map). After unit k: `h = mu_k * down_k(x_k) + (1 - mu_k) * resize(h)` (`down_k` a 1x1
    convolution, `mu_k = sigmoid(gate_k)` learned, 0.5 at init), then a side block (`h + mlp(dwconv3x3(norm(h)))`).
    The paper's side blocks are the backbone's own kind at reduced width (pruned transformer layers); convolutional
    blocks on the grid serve ViTs, CNNs and hierarchical backbones alike and keep the side cheap. The last state,
    averaged over the grid, is projected onto the pooled features and added; each feature map a dense head reads
    gets the side state of its depth, resized and projected (1x1). The projections start at zero: the task's
    features are the frozen backbone's at init.

    Args:
        reduction: The side width is the widest unit output's channels over this (the paper's reduction factor).
        width: The side width itself (overrides `reduction`).
        stride: The side state's grid is at most this much finer than the input: the outputs of earlier, finer
            units (a CNN's first stages) are average-pooled down to it first, which keeps the side's activations
            small (a ViT with 16-px or larger patches keeps its grid).
        features: Which features the side changes: "auto" (those the task's head reads: the pooled vector for
            classification, the maps its neck takes for dense heads; the task's saved config records what that
            resolved to), "pooled", "maps" or "both".
        levels: With "maps" / "both": the feature maps (indices, shallow to deep) it projects onto; None: all.
        targets: The units it reads, by part name (`blocks.3`; a regex or names, as for other methods); default:
            every unit.
    """

    reduction: int = 8
    width: int | None = None
    stride: int = 16
    features: str = "auto"
    levels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "reduction", self.reduction)
        check_positive_int(self.method, "stride", self.stride)
        if self.features not in FEATURES:
            raise ValueError(f"{self.method}: `features` must be one of {', '.join(FEATURES)}, got {self.features!r}")
        if self.levels is not None and (
            not isinstance(self.levels, tuple) or not all(isinstance(k, int) and k >= 0 for k in self.levels)
        ):
            raise ValueError(f"{self.method}: `levels` must be a tuple of feature map indices, got {self.levels!r}")
        if self.width is not None:
            check_positive_int(self.method, "width", self.width)

    def build(self, host: BackboneHost) -> MethodModule:
        layout = host.layout
        units = {p.name: k for k, p in enumerate(layout.parts[1:-1], start=1)}
        if not units:
            raise ValueError(
                f"{self.method}: {host.arch} runs as one part here ({layout.split} layout): there are no units whose "
                "outputs a side network could read"
            )
        positions = sorted(units[n] for n in _select_units(self, list(units)))
        channels = []
        for p in positions:
            name = layout.parts[p].prefixes[-1]
            try:
                shape = host.output_shape(name)
            except KeyError:
                raise ValueError(f"{self.method}: the output of {name} is not one tensor; target other units") from None
            channels.append(shape[-1] if layout.kind == "vit" or layout.nhwc else shape[1])
        width = self.width or max(8, max(channels) // self.reduction)
        bad = [k for k in self.levels or () if k >= len(layout.levels)]
        if bad:
            raise ValueError(
                f"{self.method}: `levels` {bad} out of range: {host.arch} offers {len(layout.levels)} maps"
            )
        return LadderSide(self, layout, tuple(positions), channels, width)


def _select_units(config: PeftConfig, names: list[str]) -> list[str]:
    """The unit (part) names `config.targets` selects (all by default); errors list what the names look like."""
    if config.targets is None:
        return names
    groups = match_targets(config, names)
    for pattern_str, matched in groups.items():
        if not matched:
            raise ValueError(
                f"{config.method}: target pattern {pattern_str!r} matches no unit of the backbone; {config.method} "
                f"reads units (parts), named like: {', '.join(names[:5])}, ..."
            )
    chosen = {n for matched in groups.values() for n in matched}
    return [n for n in names if n in chosen]


class SideBlock(nn.Module):
    """`h + mlp(dwconv3x3(norm(h)))` on an (R, C, H, W) map (a per-sample norm: rows never mix)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.fc1 = nn.Conv2d(width, 2 * width, 1)
        self.fc2 = nn.Conv2d(2 * width, width, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.gelu(self.fc1(self.dw(self.norm(h)))))


def resize(h: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """A map brought to another grid: average pooling where it shrinks by whole factors, else bilinear."""
    height, width = h.shape[-2], h.shape[-1]
    if (height, width) == tuple(size):
        return h
    if height % size[0] == 0 and width % size[1] == 0:
        return F.avg_pool2d(h, (height // size[0], width // size[1]))
    return F.interpolate(h, size=tuple(size), mode="bilinear", align_corners=False)


class LadderSide(MethodModule, SideNetwork):
    """One task's LST side network (see `LST`)."""

    def __init__(
        self, config: LST, layout: Layout, positions: tuple[int, ...], channels: list[int], width: int
    ) -> None:
        super().__init__(config, {})
        self.positions = positions
        self.down = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        # (the first unit starts the state: no gate; none at all when there is one unit)
        self.gates = nn.Parameter(torch.zeros(len(positions) - 1)) if len(positions) > 1 else None
        self.blocks = nn.ModuleList(SideBlock(width) for _ in positions)
        pooled = config.features != "maps"
        self.pool_norm = nn.LayerNorm(width) if pooled else None
        self.up_pooled = nn.Linear(width, layout.pooled_dim) if pooled else None
        # each feature level reads the side state of the last unit at or before it (none before the first)
        self.level_sources: dict[str, int] = {}
        self.up_maps = nn.ModuleDict()
        for k, level in enumerate(layout.levels if config.features != "pooled" else ()):
            before = [j for j, p in enumerate(positions) if p <= level.position]
            if before and (config.levels is None or k in config.levels):
                self.level_sources[str(k)] = before[-1]
                self.up_maps[str(k)] = nn.Conv2d(width, level.channels, 1)
        for up in self._ups():
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def _ups(self) -> list[nn.Module]:
        """The projections onto the features (zero at init; WiSE scales them)."""
        return [up for up in (self.up_pooled, *self.up_maps.values()) if up is not None]

    def side(self) -> SideNetwork:
        return self

    def fit_head(self, pooled: bool, levels: frozenset[int]) -> None:
        """`features="auto"`: keep only the projections onto features the head reads, and record that choice in
        the config (so that the task's files rebuild these tensors whatever head reads them later)."""
        if self.config.features != "auto":
            return
        if not pooled:
            self.pool_norm = self.up_pooled = None
        for key in [k for k in self.up_maps if int(k) not in levels]:
            del self.up_maps[key]
            del self.level_sources[key]
        kept = tuple(sorted(int(k) for k in self.up_maps))
        if not pooled and not kept:
            raise ValueError(
                "lst: the task's head reads none of the features the side can feed (the pooled vector, or maps at "
                "or after the first unit it reads)"
            )
        features = ("both" if kept else "pooled") if pooled else "maps"
        self.config = dataclasses.replace(self.config, features=features, levels=kept or None)

    def side_features(
        self, taps: list[torch.Tensor], features: Features, host: BackboneHost, image_size: tuple[int, int]
    ) -> Features:
        grid = FeatureLevel(0, 0, 1)  # (a unit output read as a map, the way the layout reads its levels)
        h: torch.Tensor | None = None
        states = []
        for k, x in enumerate(taps):
            d = self.down[k](self._coarse(host.layout.to_map(grid, x, image_size), image_size))
            if h is None:
                h = d
            else:
                assert self.gates is not None
                mu = torch.sigmoid(self.gates[k - 1])
                h = mu * d + (1 - mu) * resize(h, d.shape[-2:])
            h = self.blocks[k](h)
            states.append(h)
        assert h is not None
        pooled = features.pooled
        if self.up_pooled is not None and self.pool_norm is not None:
            pooled = pooled + self.up_pooled(self.pool_norm(h.mean(dim=(2, 3))))
        maps = list(features.maps)
        for key, source in self.level_sources.items():
            k = int(key)
            maps[k] = maps[k] + self.up_maps[key](resize(states[source], maps[k].shape[-2:]))
        return Features(maps, pooled)

    def _coarse(self, x: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """A unit's map average-pooled by whole factors until its grid is no finer than `stride` allows."""
        stride = self.config.stride
        fh = max(1, x.shape[-2] // max(1, image_size[0] // stride))
        fw = max(1, x.shape[-1] // max(1, image_size[1] // stride))
        return F.avg_pool2d(x, (fh, fw)) if fh >= 2 or fw >= 2 else x

    @torch.no_grad()
    def wise_(self, alpha: float, host: BackboneHost) -> None:
        """WiSE: the side's contribution to the features scaled by alpha."""
        for up in self._ups():
            up.weight.mul_(alpha)
            up.bias.mul_(alpha)


@register_method("vqt")
@dataclasses.dataclass
class VQT(PeftConfig):
    """Visual query tuning (Tu et al., CVPR 2023, "Visual Query Tuning: Towards Effective Usage of Intermediate
    Representations for Parameter and Memory Efficient Transfer Learning"): `num_tokens` learned query tokens per
    block that read the block's input tokens through its frozen attention and MLP (they attend to the tokens; the
    tokens never attend to them, so the backbone's own forward is unchanged and needs no autograd). Their outputs
    ("summaries" of every layer's features) go to the head with the final features.

    The paper concatenates the summaries with the class token in front of a linear head; here the concatenated
    summaries (each standardised) pass a rank-`rank` projection added to the pooled features (zero at init: the
    task starts as a linear probe), so any head reads them. The queries use the blocks' frozen weights (also when
    another method of the task adapts those blocks). Feeds the pooled features (classification heads); plain timm
    ViT blocks (`Block` with `Attention`).

    Args:
        num_tokens: Query tokens per block.
        rank: Width of the projection of the summaries onto the pooled features.
        targets: The blocks it reads, by part name (`blocks.3`; a regex or names); default: every block.
    """

    kinds: ClassVar[tuple[str, ...]] = ("vit",)

    num_tokens: int = 1
    rank: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "num_tokens", self.num_tokens)
        check_positive_int(self.method, "rank", self.rank)

    def build(self, host: BackboneHost) -> MethodModule:
        layout = host.layout
        if layout.kind not in self.kinds:
            raise ValueError(f"{self.method} applies to vit backbones; {host.arch} is a {layout.kind} backbone")
        blocks = {
            p.name: k
            for k, p in enumerate(layout.parts[1:-1], start=1)
            if type(frozen(host.module(p.name))) is Block and type(frozen(host.module(p.name).attn)) is Attention
        }
        if not blocks:
            raise ValueError(
                f"{self.method}: no default target modules in {host.arch}: its queries run through plain timm ViT "
                "blocks (Block with Attention)"
            )
        names = _select_units(self, list(blocks))
        dim = int(host.output_shape(layout.parts[blocks[names[0]]].prefixes[-1])[-1])
        return QueryTuning(self, names, tuple(blocks[n] - 1 for n in names), dim, layout.pooled_dim)


PLAIN = StackedRouting((PLAIN_SLOT,))  # every row on the frozen modules (any number of rows, also while tracing)


class QueryTuning(MethodModule, SideNetwork):
    """One task's VQT queries and the projection of their summaries (see `VQT`)."""

    def __init__(self, config: VQT, blocks: list[str], positions: tuple[int, ...], dim: int, pooled_dim: int) -> None:
        super().__init__(config, {})
        self.blocks = list(blocks)
        self.positions = positions  # (each block's input: the output of the part before it)
        self.vqt_queries = nn.Parameter(torch.randn(len(blocks), config.num_tokens, dim) * 0.02)
        self.vqt_down = nn.Linear(len(blocks) * config.num_tokens * dim, config.rank, bias=False)
        self.vqt_up = nn.Linear(config.rank, pooled_dim)
        nn.init.zeros_(self.vqt_up.weight)
        nn.init.zeros_(self.vqt_up.bias)

    def side(self) -> SideNetwork:
        return self

    def fit_head(self, pooled: bool, levels: frozenset[int]) -> None:
        if not pooled:
            raise ValueError("vqt feeds the pooled features, which this task's head does not read (use lst, mona, ...)")

    def side_features(
        self, taps: list[torch.Tensor], features: Features, host: BackboneHost, image_size: tuple[int, int]
    ) -> Features:
        summaries = []
        with host.router.use(PLAIN):  # (other tasks' adapters inside the blocks stay out of the queries' way)
            for k, (name, tokens) in enumerate(zip(self.blocks, taps, strict=True)):
                block = frozen(host.module(name))
                q = self.vqt_queries[k].to(tokens.dtype).expand(tokens.shape[0], -1, -1)
                attn = frozen(block.attn)  # (its own wrapper when another task's prefix recomputes it)
                q = q + block.ls1(_query_attention(attn, block.norm1(q), block.norm1(tokens)))
                q = q + block.ls2(block.mlp(block.norm2(q)))
                summaries.append(F.layer_norm(q, q.shape[-1:]))
        summary = torch.cat(summaries, dim=1).flatten(1)  # (R, blocks * tokens * dim)
        return Features(features.maps, features.pooled + self.vqt_up(self.vqt_down(summary)))

    @torch.no_grad()
    def wise_(self, alpha: float, host: BackboneHost) -> None:
        """WiSE: the summaries' contribution to the pooled features scaled by alpha."""
        self.vqt_up.weight.mul_(alpha)
        self.vqt_up.bias.mul_(alpha)


def _query_attention(attn: nn.Module, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A frozen timm `Attention` with the queries asking and the tokens answering: (R, Q, C) -> (R, Q, C)."""
    qkv = frozen(attn.qkv)
    h, d = attn.num_heads, attn.head_dim
    c = h * d  # (timm's attn_dim: the split of qkv's outputs)
    bias = qkv.bias
    q = F.linear(queries, qkv.weight[:c], None if bias is None else bias[:c])
    kv = F.linear(tokens, qkv.weight[c:], None if bias is None else bias[c:])
    r, n = tokens.shape[0], tokens.shape[1]
    q = q.reshape(r, -1, h, d).transpose(1, 2)  # (R, h, Q, d)
    k, v = kv.reshape(r, n, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # (R, h, N, d) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(r, -1, h * d)
    out = getattr(attn, "norm", nn.Identity())(out)
    if getattr(attn, "gate", None) is not None:  # (gated attention: a gate from the layer's input, here the queries')
        out = out * attn.gate(queries).sigmoid()
    return attn.proj(out)

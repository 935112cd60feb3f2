"""How to run a timm backbone piece by piece: stem, units (blocks), final, pool.

`final(units(stem(x)))` equals the timm model's `forward_features(x)`, and `pool` is its
`forward_head(x, pre_logits=True)`. Running the parts ourselves is what lets the executor share a prefix of
the backbone between tasks, fan rows out between units, insert prompt tokens, and collect feature maps.

Three ways to split a model, looked up by timm class (and base classes) in `LAYOUTS`:

- a family split written for the class (ViT, EVA, BEiT, ResNet, EfficientNet, ConvNeXt, Swin): parts down to
  single blocks, prompt tokens where the family allows them;
- the chain split (`chain_layout`), registered for hierarchical families whose `forward_features` is its top-level
  modules in a row (Swin-V2, MaxViT, RegNet, MobileNetV3, FastViT, ...): one part per stage or top-level block,
  checked against `forward_features` on a probe image when the model is hosted;
- any other timm model with the feature API (`forward_intermediates`, `feature_info`) gets the generic layout
  (`generic_layout`): the whole of `forward_features` as one part, its feature maps from
  `forward_intermediates`, so mixed batches, dense heads and every layer-level method work, and prefix sharing
  happens only at the input. It says so once (a log message).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .registry import Registry

logger = logging.getLogger(__name__)

PartFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Part:
    """A piece of the backbone, run as `fn(model, x)`; `prefixes` are the module names it owns. A part with `maps`
    returns `(x, [feature maps])`: maps it takes on the way (the levels that name it by `tap`). In a layout with
    `prompts`, the blocks also take `fn(model, x, attn_mask=...)`: an additive mask on the attention scores."""

    name: str
    prefixes: tuple[str, ...]
    fn: PartFn
    maps: bool = False


@dataclass(frozen=True)
class FeatureLevel:
    """A feature map taken after part `position`: `channels` channels at `reduction` x smaller than the input.
    With `tap`, the map is the part's `tap`-th returned map (already (N, C, H, W)), not its output."""

    position: int
    channels: int
    reduction: int
    tap: int | None = None


@dataclass
class Layout:
    """The parts of a backbone and what comes out of them.

    Attributes:
        kind: "vit" (token sequences) or "cnn" (feature maps, incl. hierarchical transformers such as Swin).
        parts: stem, one part per unit (block), final; positions index this list.
        levels: Feature maps offered to heads, shallow to deep.
        pooled_dim: Width of the pooled feature vector.
        num_prefix_tokens: ViT class/register tokens before the patch tokens.
        patch_size: ViT patch size (reduction of its feature map).
        nhwc: Units output channels-last maps (Swin).
        pool_prefixes: Module names used by the pooling step (e.g. a ViT's `fc_norm`).
        prompts: Prompt tokens may be inserted after the prefix tokens (plain ViTs; not where rotary embeddings or
            relative position biases fix the token count).
        split: How the parts were made: "family", "chain" or "generic" (one part).
    """

    kind: str
    parts: list[Part]
    levels: list[FeatureLevel]
    pooled_dim: int
    num_prefix_tokens: int = 0
    patch_size: int = 1
    nhwc: bool = False
    pool_prefixes: tuple[str, ...] = field(default_factory=tuple)
    prompts: bool = False
    split: str = "family"

    @property
    def num_positions(self) -> int:
        """Parts plus the pooling step (the last position)."""
        return len(self.parts) + 1

    def position_of(self, module_name: str) -> int | None:
        """Position of the part that owns `module_name` (the pool step is `len(parts)`), None if none does."""
        for position, prefixes in enumerate([p.prefixes for p in self.parts] + [self.pool_prefixes]):
            if any(module_name == p or module_name.startswith(p + ".") for p in prefixes):
                return position
        return None

    def pool(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(x, pre_logits=True)  # (N, pooled_dim)

    def to_map(self, level: FeatureLevel, x: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """A captured feature map (a unit / final output, or a tapped map) as an (N, C, H, W) map."""
        if level.tap is not None:
            return x
        if self.kind == "vit":
            h, w = image_size[0] // self.patch_size, image_size[1] // self.patch_size
            tokens = x[:, self.num_prefix_tokens :]  # (N, h*w, C)
            return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        if self.nhwc:
            return x.permute(0, 3, 1, 2)
        return x


LAYOUTS: Registry[Callable[[nn.Module], Layout]] = Registry("backbone family")


def layout_for(model: nn.Module) -> Layout:
    """The layout of a timm model, looked up by its class (and base classes); the generic one for any other model
    with timm's feature API."""
    for cls in type(model).__mro__:
        if cls.__name__ in LAYOUTS:
            return LAYOUTS.get(cls.__name__)(model)
    if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
        raise ValueError(
            f"unsupported backbone {type(model).__name__!r}: it has no split here ({', '.join(LAYOUTS.names())}) "
            "and lacks timm's feature API (forward_intermediates / feature_info) for the generic host"
        )
    return generic_layout(model)


def _seq(*names: str) -> PartFn:
    def fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = model.get_submodule(name)(x)
        return x

    return fn


def _unit(name: str) -> Part:
    return Part(name, (name,), _seq(name))


def _units(model: nn.Module, containers: list[str]) -> list[Part]:
    """One part per child of each container (`blocks.0` -> `blocks.0.0`, `blocks.0.1`, ...)."""
    parts = []
    for container in containers:
        module = model.get_submodule(container)
        if isinstance(module, nn.Identity):
            continue
        if isinstance(module, nn.Sequential):
            parts += [_unit(f"{container}.{child}") for child, _ in module.named_children()]
        else:
            parts.append(_unit(container))
    return parts


def _levels_from_feature_info(model: nn.Module, parts: list[Part]) -> list[FeatureLevel]:
    """timm's `feature_info` levels mapped onto the last unit inside each listed module."""
    levels = []
    for info in model.feature_info:
        inside = [i for i, p in enumerate(parts) if p.name == info["module"] or p.name.startswith(info["module"] + ".")]
        if inside and inside[-1] != 0:  # levels inside the stem are not offered
            levels.append(FeatureLevel(inside[-1], info["num_chs"], info["reduction"]))
    return levels


def _pooled_dim(model: nn.Module) -> int:
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


@LAYOUTS.register("VisionTransformer")
def _vit(model: nn.Module) -> Layout:
    def stem(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)  # (N, T, C)

    def block(i: int) -> PartFn:
        def fn(m: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
            # (an additive mask scales the attention paid to prompt tokens: WiSE for VPT)
            return m.blocks[i](x) if attn_mask is None else m.blocks[i](x, attn_mask=attn_mask)

        return fn

    stem_part = Part("stem", ("patch_embed", "cls_token", "reg_token", "pos_embed", "patch_drop", "norm_pre"), stem)
    return _token_layout(model, stem_part, block, prompts=True)


@LAYOUTS.register("EfficientNet")
def _efficientnet(model: nn.Module) -> Layout:
    units = _units(model, [f"blocks.{i}" for i in range(len(model.blocks))])
    parts = [Part("stem", ("conv_stem", "bn1"), _seq("conv_stem", "bn1")), *units]
    parts.append(Part("final", ("conv_head", "bn2"), _seq("conv_head", "bn2")))
    return Layout(
        "cnn", parts, _levels_from_feature_info(model, parts), _pooled_dim(model), pool_prefixes=("global_pool",)
    )


@LAYOUTS.register("ResNet")
def _resnet(model: nn.Module) -> Layout:
    stem = ("conv1", "bn1", "act1", "maxpool")
    units = _units(model, ["layer1", "layer2", "layer3", "layer4"])
    parts = [Part("stem", stem, _seq(*stem)), *units, Part("final", (), lambda m, x: x)]
    return Layout(
        "cnn", parts, _levels_from_feature_info(model, parts), _pooled_dim(model), pool_prefixes=("global_pool",)
    )


@LAYOUTS.register("ConvNeXt")
def _convnext(model: nn.Module) -> Layout:
    containers = []
    for i in range(len(model.stages)):
        containers += [f"stages.{i}.downsample", f"stages.{i}.blocks"]
    parts = [Part("stem", ("stem",), _seq("stem")), *_units(model, containers)]
    parts.append(Part("final", ("norm_pre",), _seq("norm_pre")))
    return Layout("cnn", parts, _levels_from_feature_info(model, parts), _pooled_dim(model), pool_prefixes=("head",))


@LAYOUTS.register("SwinTransformer")
def _swin(model: nn.Module) -> Layout:
    containers = []
    for i in range(len(model.layers)):
        containers += [f"layers.{i}.downsample", f"layers.{i}.blocks"]
    parts = [Part("stem", ("patch_embed", "absolute_pos_embed"), _seq("patch_embed")), *_units(model, containers)]
    parts.append(Part("final", ("norm",), _seq("norm")))
    levels = _levels_from_feature_info(model, parts)
    return Layout("cnn", parts, levels, _pooled_dim(model), nhwc=True, pool_prefixes=("head",))


def _patch_size(model: nn.Module) -> int:
    patch = model.patch_embed.patch_size
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def _token_layout(model: nn.Module, stem: Part, block: Callable[[int], PartFn], **options: object) -> Layout:
    """A ViT-like layout: stem, one part per block (`block(i)` runs block i), final norm, pooling by the model."""
    parts = [stem, *(Part(f"blocks.{i}", (f"blocks.{i}",), block(i)) for i in range(len(model.blocks)))]
    parts.append(Part("final", ("norm",), _seq("norm")))
    patch = _patch_size(model)
    return Layout(
        kind="vit",
        parts=parts,
        levels=[FeatureLevel(len(parts) - 1, model.embed_dim, patch)],
        pooled_dim=_pooled_dim(model),
        num_prefix_tokens=model.num_prefix_tokens,
        patch_size=patch,
        pool_prefixes=("fc_norm", "attn_pool", "head_drop"),
        **options,
    )


@LAYOUTS.register("Eva")
def _eva(model: nn.Module) -> Layout:
    """EVA / EVA-02: blocks take the rotary embedding of the patch grid (fixed by the model's image size; one per
    block in mixed mode). Prompt tokens would shift the rotary positions: not offered."""
    if model.dynamic_img_size:
        return generic_layout(model, reason="EVA with dynamic_img_size: the rotary embedding depends on each input")

    def stem(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x, _ = m._pos_embed(m.patch_embed(x))
        return m.norm_pre(x)

    def rope(m: nn.Module, i: int) -> torch.Tensor | None:
        if m.rope is None:
            return None
        embed = m.rope.get_embed() if hasattr(m.rope, "feat_shape") else m.rope.get_embed(shape=m.patch_embed.grid_size)
        return embed[i] if getattr(m, "rope_mixed", False) else embed

    def block(i: int) -> PartFn:
        return lambda m, x: m.blocks[i](x, rope=rope(m, i))

    prefixes = ("patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop", "patch_drop", "norm_pre", "rope")
    return _token_layout(model, Part("stem", prefixes, stem), block)


@LAYOUTS.register("Beit")
def _beit(model: nn.Module) -> Layout:
    """BEiT: blocks take the shared relative position bias (if the model has one; else each block's own table, sized
    for the patch grid plus the class token: no prompt tokens)."""

    def stem(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = m.patch_embed(x)
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if m.pos_embed is not None:
            x = x + m.pos_embed
        return m.pos_drop(x)

    def block(i: int) -> PartFn:
        def fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return m.blocks[i](x, shared_rel_pos_bias=m.rel_pos_bias() if m.rel_pos_bias is not None else None)

        return fn

    stem_part = Part("stem", ("patch_embed", "cls_token", "pos_embed", "pos_drop", "rel_pos_bias"), stem)
    return _token_layout(model, stem_part, block)


# --- probing a model: which top-level modules its forward_features / forward_head run, in order -------------------


@dataclass(frozen=True)
class _Probe:
    image: torch.Tensor  # (1, 3, H, W) zeros at the model's default size
    features: list[str]  # modules `forward_features` runs, first-call order (children, or grandchildren of an
    #                      uncalled container, e.g. FastViT's stages)
    head: list[str]  # modules `forward_head(pre_logits=True)` runs
    output: torch.Tensor  # forward_features(image)


def _probe(model: nn.Module) -> _Probe:
    calls: list[str] = []
    candidates = {n: m for n, m in model.named_modules() if n and n.count(".") <= 1}
    handles = [
        m.register_forward_pre_hook(lambda _m, _a, name=n: calls.append(name) if name not in calls else None)
        for n, m in candidates.items()
    ]
    image = torch.zeros(1, 3, *default_image_size(model))
    try:
        with torch.no_grad():
            output = model.forward_features(image)
            in_features = list(calls)
            calls.clear()
            model.forward_head(output, pre_logits=True)
    finally:
        for h in handles:
            h.remove()

    def outermost(names: list[str]) -> list[str]:
        return [n for n in names if "." not in n or n.rpartition(".")[0] not in names]

    return _Probe(image, outermost(in_features), outermost(calls), output)


def _feature_levels(model: nn.Module) -> list[tuple[int, int, int]]:
    """(feature_info index, channels, reduction) of the deepest level of each reduction >= 4, shallow to deep."""
    deepest: dict[int, tuple[int, int, int]] = {}
    for i, info in enumerate(model.feature_info):
        if info["reduction"] >= 4:
            deepest[info["reduction"]] = (i, int(info["num_chs"]), int(info["reduction"]))
    return sorted(deepest.values())


_ANNOUNCED: set[str] = set()  # classes the generic layout has been announced for


def generic_layout(model: nn.Module, reason: str | None = None) -> Layout:
    """Any timm model with the feature API: `forward_features` as one part (through `forward_intermediates`, which
    returns the same output plus the feature maps, (N, C, H, W) at each level's reduction), pooled by the model's
    own `forward_head`. Isotropic token models (one reduction) are "vit", the rest "cnn"."""
    probe = _probe(model)
    levels = _feature_levels(model)
    indices = [i for i, _, _ in levels]

    def body(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        final, maps = m.forward_intermediates(x, indices=indices, norm=True, output_fmt="NCHW")
        return final, list(maps)

    tokens = probe.output.ndim == 3 and len({r for _, _, r in levels}) == 1
    if type(model).__name__ not in _ANNOUNCED:  # once per class and process
        _ANNOUNCED.add(type(model).__name__)
        logger.info(
            "%s has no part-by-part split (%s): hosting it whole through timm's forward_intermediates; mixed "
            "batches, dense heads and layer methods work, prefix sharing only at the input, no prompt tokens",
            type(model).__name__,
            reason or "none registered for its class",
        )
    return Layout(
        kind="vit" if tokens else "cnn",
        parts=[Part("body", tuple(probe.features), body, maps=True)],
        levels=[FeatureLevel(0, c, r, tap=k) for k, (_, c, r) in enumerate(levels)],
        pooled_dim=_pooled_dim(model),
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0) if tokens else 0,
        patch_size=levels[-1][2] if tokens else 1,
        pool_prefixes=tuple(probe.head),
        split="generic",
    )


def chain_layout(model: nn.Module) -> Layout:
    """Hierarchical models whose `forward_features` runs its top-level modules one after the other: a stem (what
    runs before the first stage holding a feature level), one part per stage (a Sequential container of stages is
    opened: `stages.0`, `stages.1`, ...), a final part (what runs after the last level's stage). Checked against
    `forward_features` on a probe image; a model that is not such a chain gets the generic layout."""
    probe = _probe(model)
    homes = [info["module"] for info in model.feature_info if info["reduction"] >= 4]

    def holds_level(name: str) -> bool:
        return any(h == name or h.startswith(name + ".") for h in homes)

    staged = [i for i, n in enumerate(probe.features) if holds_level(n)]
    if not staged:
        return generic_layout(model, reason="no feature level in its top-level modules")
    first, last = staged[0], staged[-1]
    stem_names, final_names = probe.features[:first], probe.features[last + 1 :]
    units: list[Part] = []
    for name in probe.features[first : last + 1]:
        module = model.get_submodule(name)
        if isinstance(module, nn.Sequential) and not any(h == name for h in homes):
            units += [_unit(f"{name}.{child}") for child, _ in module.named_children()]
        else:
            units.append(_unit(name))
    parts = [Part("stem", tuple(stem_names), _seq(*stem_names)), *units]
    parts.append(Part("final", tuple(final_names), _seq(*final_names)))
    with torch.no_grad():
        x = probe.image
        for part in parts:
            x = part.fn(model, x)
    if x.shape != probe.output.shape or not torch.allclose(x, probe.output, rtol=1e-4, atol=1e-5):
        return generic_layout(model, reason="its forward_features is not its top-level modules in a row")
    out = probe.output
    nhwc = out.ndim == 4 and out.shape[-1] == model.num_features and out.shape[1] != model.num_features
    return Layout(
        "cnn",
        parts,
        _levels_from_feature_info(model, parts),
        _pooled_dim(model),
        nhwc=nhwc,
        pool_prefixes=tuple(probe.head),
        split="chain",
    )


#: Hierarchical families split by `chain_layout` (each checked in the tests at reduced size).
CHAIN_FAMILIES = (
    "SwinTransformerV2",  # swinv2_*
    "MaxxVit",  # maxvit_*, coatnet_*
    "RegNet",  # regnet*
    "MobileNetV3",  # mobilenetv3_*, tf_mobilenetv3_*
    "FastVit",  # fastvit_*
    "EfficientVit",  # efficientvit_b*
    "MetaFormer",  # caformer_*, convformer_*, poolformer*
    "ByobNet",  # mobilevitv2_*, gernet, repvgg, ...
    "HighPerfGpuNet",  # hgnetv2_*
)
for _name in CHAIN_FAMILIES:
    LAYOUTS.register(_name)(chain_layout)


def default_image_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) of a timm model's native input: the patch embedding's size (ViTs, Swin), the model's own `img_size`
    (MaxViT), else its pretrained config's."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None and isinstance(getattr(model, "img_size", None), (int, tuple, list)):
        img_size = model.img_size
    if img_size is None:
        img_size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    return int(img_size[0]), int(img_size[1])

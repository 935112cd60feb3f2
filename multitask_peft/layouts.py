"""How to run a timm backbone piece by piece: stem, units (blocks), final, pool.

`final(units(stem(x)))` equals the timm model's `forward_features(x)`, and `pool` is its
`forward_head(x, pre_logits=True)`. Running the parts ourselves is what lets the executor share a prefix of
the backbone between tasks, fan rows out between units, insert prompt tokens, and collect feature maps.
Supported families are found through a registry keyed by timm class name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .registry import Registry

PartFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Part:
    """A piece of the backbone, run as `fn(model, x)`; `prefixes` are the module names it owns."""

    name: str
    prefixes: tuple[str, ...]
    fn: PartFn


@dataclass(frozen=True)
class FeatureLevel:
    """A feature map taken after part `position`: `channels` channels at `reduction` x smaller than the input."""

    position: int
    channels: int
    reduction: int


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
    """

    kind: str
    parts: list[Part]
    levels: list[FeatureLevel]
    pooled_dim: int
    num_prefix_tokens: int = 0
    patch_size: int = 1
    nhwc: bool = False
    pool_prefixes: tuple[str, ...] = field(default_factory=tuple)

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

    def to_map(self, x: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """A unit / final output as an (N, C, H, W) map."""
        if self.kind == "vit":
            h, w = image_size[0] // self.patch_size, image_size[1] // self.patch_size
            tokens = x[:, self.num_prefix_tokens :]  # (N, h*w, C)
            return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        if self.nhwc:
            return x.permute(0, 3, 1, 2)
        return x


LAYOUTS: Registry[Callable[[nn.Module], Layout]] = Registry("backbone family")


def layout_for(model: nn.Module) -> Layout:
    """The layout of a timm model, looked up by its class (and base classes)."""
    for cls in type(model).__mro__:
        if cls.__name__ in LAYOUTS:
            return LAYOUTS.get(cls.__name__)(model)
    raise ValueError(
        f"unsupported backbone family {type(model).__name__!r}; supported timm classes: {', '.join(LAYOUTS.names())}"
    )


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

    stem_part = Part("stem", ("patch_embed", "cls_token", "reg_token", "pos_embed", "patch_drop", "norm_pre"), stem)
    parts = [stem_part, *_units(model, ["blocks"]), Part("final", ("norm",), _seq("norm"))]
    patch = model.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    return Layout(
        kind="vit",
        parts=parts,
        levels=[FeatureLevel(len(parts) - 1, model.embed_dim, patch)],
        pooled_dim=_pooled_dim(model),
        num_prefix_tokens=model.num_prefix_tokens,
        patch_size=patch,
        pool_prefixes=("fc_norm", "attn_pool", "head_drop"),
    )


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

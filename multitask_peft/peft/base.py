"""PEFT method configs, their registry, target selection and the per-task method module."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..config import ConfigBase
from ..heads import Features
from ..registry import Registry
from .layer import LayerAdapter

if TYPE_CHECKING:
    from ..backbone import BackboneHost

METHODS: Registry[type[PeftConfig]] = Registry("PEFT method")


def register_method(name: str) -> Callable[[type[PeftConfig]], type[PeftConfig]]:
    """Class decorator: register a PEFT config dataclass under `name`."""

    def decorator(cls: type[PeftConfig]) -> type[PeftConfig]:
        cls.method = name
        return METHODS.register(name)(cls)

    return decorator


@dataclasses.dataclass
class PeftConfig(ConfigBase):
    """Base of every PEFT method config.

    `targets` selects backbone modules by name, as in HF PEFT: a string is a regular expression that must match a
    whole module name; a tuple lists exact names or name suffixes (`"qkv"` matches `blocks.0.attn.qkv`). None
    picks the method's default modules for the backbone's family. Every pattern must match at least one module.
    """

    method: ClassVar[str] = ""
    #: Which backbone kinds the method applies to ("vit": token sequences, "cnn": feature maps).
    kinds: ClassVar[tuple[str, ...]] = ("vit", "cnn")
    #: Default init leaves the backbone's output unchanged.
    identity_at_init: ClassVar[bool] = True
    #: merged_backbone() can fold it into plain weights.
    foldable: ClassVar[bool] = False
    #: Whether the multi-task ONNX graph can hold the method (`mtp.export_onnx`).
    onnx: ClassVar[bool] = True
    #: An update of the adapted modules' weights (low-rank): one such method per module per task.
    weight_update: ClassVar[bool] = False
    #: The task trains its own backbone copy (its rows run through it): no other method in the same task.
    owns_backbone: ClassVar[bool] = False
    #: Tasks using only this method (same options, same head) can share one ONNX graph whose factors ONNX Runtime
    #: swaps per run from `.onnx_adapter` files (`export_onnx(..., merge=True)` with several tasks).
    adapter_files: ClassVar[bool] = False
    #: The method recomputes its modules from their frozen sub-layers (prefix tuning: the attention from `qkv` and
    #: `proj`), so no other method of the task may adapt those sub-layers.
    owns_submodules: ClassVar[bool] = False
    #: WiSE (`MultiTaskModel.wise_task`): whether scaling the method's change by alpha is defined; if not, why.
    wise: ClassVar[bool] = True
    wise_refusal: ClassVar[str] = ""

    targets: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.targets is not None and not isinstance(self.targets, (str, tuple)):
            raise TypeError(
                f"{self.method}: `targets` must be a regex string, a tuple of names or None, got {self.targets!r}"
            )
        if isinstance(self.targets, tuple) and (not self.targets or not all(isinstance(t, str) for t in self.targets)):
            raise ValueError(f"{self.method}: `targets` must be a non-empty tuple of strings, got {self.targets!r}")

    # --- what each method defines ---------------------------------------------------------------------------
    def supports(self, name: str, module: nn.Module) -> bool:
        """Whether the method can adapt this module type."""
        raise NotImplementedError

    def default_target(self, name: str, module: nn.Module, host: BackboneHost) -> bool:
        """Whether `targets=None` selects this module."""
        raise NotImplementedError

    def make_adapter(self, name: str, module: nn.Module, host: BackboneHost) -> LayerAdapter:
        """The layer adapter for one targeted module."""
        raise NotImplementedError

    def build(self, host: BackboneHost) -> MethodModule:
        """Resolve targets and create the (trainable) parameters of one task's use of this method."""
        if host.layout.kind not in self.kinds:
            raise ValueError(
                f"{self.method} applies to {'/'.join(self.kinds)} backbones; "
                f"{host.arch} is a {host.layout.kind} backbone"
            )
        names = select_targets(self, host)
        return self.method_module({n: self.make_adapter(n, host.module(n), host) for n in names})

    def method_module(self, adapters: dict[str, LayerAdapter]) -> MethodModule:
        """The task's module of this method over its layer adapters (a method with state of its own subclasses it)."""
        return MethodModule(self, adapters)


class MethodModule(nn.Module):
    """One task's parameters for one method: a layer adapter per targeted module, plus any shared tensors."""

    def __init__(self, config: PeftConfig, adapters: dict[str, LayerAdapter]) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({name.replace(".", "-"): a for name, a in adapters.items()})

    def adapters(self) -> dict[str, LayerAdapter]:
        """Original module name -> its adapter."""
        return {key.replace("-", "."): a for key, a in self.layers.items()}

    # Hooks for methods that act on the executor rather than on layers (prompts, a private backbone).
    def prompts(self) -> PromptTokens | None:
        return None

    def private_backbone(self) -> nn.Module | None:
        return None

    def side(self) -> SideNetwork | None:
        return None

    def fit_head(self, pooled: bool, levels: frozenset[int]) -> None:
        """Told, once the task's head is built, which features it reads (the pooled vector, which maps)."""

    def first_position(self, host: BackboneHost) -> int:
        """First backbone position whose output this method changes (`host.layout.num_positions` if none)."""
        positions = [host.position_of(name) for name in self.adapters()]
        return min(positions, default=host.layout.num_positions)

    @torch.no_grad()
    def wise_(self, alpha: float, host: BackboneHost) -> None:
        """WiSE: scale this method's change of the backbone by `alpha` in [0, 1], in place (0: the frozen
        backbone, 1: unchanged); see `LayerAdapter.wise_`. Methods without a WiSE form raise a ValueError."""
        if not self.config.wise:
            raise ValueError(f"{self.config.method} has no WiSE form: {self.config.wise_refusal}")
        for name, adapter in self.adapters().items():
            adapter.wise_(alpha, host.module(name))


def attention_log_scale(scale: float) -> float:
    """The score bias that multiplies the attention paid to some keys by `scale` in [0, 1] before the softmax
    renormalises: log(scale), -inf at 0 (prompts and prefixes under WiSE)."""
    return math.log(scale) if scale else -math.inf


class PromptTokens(nn.Module):
    """Interface of prompt methods (VPT): extra tokens inserted after a ViT's prefix tokens before the first block.

    `tokens(unit)` gives the (num_tokens, dim) prompts entering unit `unit` (0-based), or None to keep the
    tokens that come out of the previous unit (VPT-shallow after unit 0). `attention_scale()` is the factor on the
    attention the blocks pay to the prompt tokens (1: plain attention; the executor adds log(scale) to the prompt
    keys' scores).
    """

    num_tokens: int

    def tokens(self, unit: int) -> torch.Tensor | None:
        raise NotImplementedError

    def attention_scale(self) -> float:
        return 1.0


class SideNetwork(nn.Module):
    """Interface of side methods (LST, VQT): they read what some backbone parts output for the task's rows and
    change the task's features from that; they change nothing inside the backbone (so where nothing else of the
    task adapts it, training runs the backbone without autograd).

    `positions` are the parts whose outputs `side_features` gets, in that order (each as the part returns it: (R, T,
    C) tokens, (R, C, H, W) or channels-last maps), with the task rows' backbone features and the host (whose frozen
    modules a side may call); it returns the task's features (same shapes).
    """

    positions: tuple[int, ...]

    def side_features(
        self, taps: list[torch.Tensor], features: Features, host: BackboneHost, image_size: tuple[int, int]
    ) -> Features:
        raise NotImplementedError


def match_targets(
    config: PeftConfig, names: list[str], eligible: Callable[[str], bool] = lambda name: True
) -> dict[str, list[str]]:
    """{pattern: the names it selects} for `config.targets` (not None) over `names`: a regex matches whole names
    (only eligible ones), a tuple lists exact names or name suffixes."""
    assert config.targets is not None
    if isinstance(config.targets, str):
        try:
            pattern = re.compile(config.targets)
        except re.error as e:
            raise ValueError(
                f"{config.method}: `targets` {config.targets!r} is not a valid regular expression: {e}"
            ) from e
        return {config.targets: [n for n in names if pattern.fullmatch(n) and eligible(n)]}
    return {p: [n for n in names if n == p or n.endswith("." + p)] for p in config.targets}


def select_targets(config: PeftConfig, host: BackboneHost) -> list[str]:
    """Module names selected by `config.targets` (or the method's defaults); errors name the pattern and the fix."""
    candidates = host.named_targetable()
    method = config.method
    if config.targets is None:
        names = [n for n, m in candidates.items() if config.default_target(n, m, host)]
        if not names:
            raise ValueError(f"{method}: no default target modules in {host.arch}; pass `targets=` explicitly")
        return names
    # A regex selects the modules it matches that the method can adapt (HF PEFT's string form).
    groups = match_targets(config, list(candidates), lambda n: config.supports(n, candidates[n]))
    example = ", ".join(list(candidates)[1:6])
    for pattern_str, matched in groups.items():
        if not matched:
            raise ValueError(
                f"{method}: target pattern {pattern_str!r} matches no module of {host.arch} that {method} can adapt; "
                f"module names look like: {example}, ..."
            )
    names = list(dict.fromkeys(n for matched in groups.values() for n in matched))
    bad = [f"{n} ({type(candidates[n]).__name__})" for n in names if not config.supports(n, candidates[n])]
    if bad:
        raise ValueError(f"{method} cannot adapt {', '.join(bad[:5])}; narrow `targets` to supported modules")
    return names

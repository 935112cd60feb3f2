"""Comparison baselines: linear probe (head only) and full fine-tuning (a task-private backbone copy)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .base import MethodModule, PeftConfig, register_method

if TYPE_CHECKING:
    from ..backbone import BackboneHost


@register_method("linear_probe")
@dataclasses.dataclass
class LinearProbe(PeftConfig):
    """Train the head only; the task shares the whole frozen backbone pass with every other task."""

    foldable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets is not None:
            raise ValueError(f"{self.method}: adapts no module; `targets` must be None, got {self.targets!r}")

    def build(self, host: BackboneHost) -> MethodModule:
        return MethodModule(self, {})


@register_method("full")
@dataclasses.dataclass
class FullFineTune(PeftConfig):
    """Full fine-tuning baseline: the task trains its own copy of the whole backbone (BatchNorm statistics
    included). Its rows run through that copy; it cannot be combined with other methods in one task."""

    onnx: ClassVar[bool] = False  # its own backbone copy: export it as a merged single-task graph
    owns_backbone: ClassVar[bool] = True
    foldable: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("vit", "cnn")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets is not None:
            raise ValueError(f"{self.method}: trains the whole backbone; `targets` must be None, got {self.targets!r}")

    def build(self, host: BackboneHost) -> MethodModule:
        return FullBackboneModule(self, host.plain_copy())


class FullBackboneModule(MethodModule):
    def __init__(self, config: FullFineTune, backbone: nn.Module) -> None:
        super().__init__(config, {})
        self.full_backbone = backbone.requires_grad_(True)

    def private_backbone(self) -> nn.Module:
        return self.full_backbone

    def first_position(self, host: BackboneHost) -> int:
        return 0

    @torch.no_grad()
    def wise_(self, alpha: float, host: BackboneHost) -> None:
        """WiSE-FT (Wortsman et al., 2022): every weight and float buffer (BatchNorm statistics included) of the
        fine-tuned copy moved toward the frozen backbone's, `w0 + alpha (w - w0)`."""
        for name, module in self.full_backbone.named_modules():
            frozen = host.module(name)
            state = dict(frozen.named_parameters(recurse=False)) | dict(frozen.named_buffers(recurse=False))
            for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor.is_floating_point():
                    tensor.copy_(state[key] + alpha * (tensor - state[key]))

"""The head interface: a config dataclass that builds a module from the backbone's feature description.

Concrete heads live in `multitask_peft.tasks`; the model core only knows this interface.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import ConfigBase
from .registry import Registry

HEADS: Registry[type[HeadConfig]] = Registry("head")


@dataclass
class Features:
    """Backbone outputs for a batch of rows.

    Attributes:
        maps: One (R, C_l, H_l, W_l) map per feature level of the layout, shallow to deep.
        pooled: (R, D) the backbone's own pooled features (class token, average pool, ...).
    """

    maps: list[torch.Tensor]
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def select(self, index: torch.Tensor | Sequence[int]) -> Features:
        index = torch.as_tensor(index, dtype=torch.long, device=self.pooled.device)
        return Features([m.index_select(0, index) for m in self.maps], self.pooled.index_select(0, index))


def register_head(name: str) -> Callable[[type[HeadConfig]], type[HeadConfig]]:
    """Class decorator: register a head config dataclass under `name`."""

    def decorator(cls: type[HeadConfig]) -> type[HeadConfig]:
        cls.head_type = name
        if "output_kind" not in cls.__dict__:
            cls.output_kind = name
        return HEADS.register(name)(cls)

    return decorator


def head_from_dict(data: object) -> HeadConfig:
    """A head config from `{"type": name, ...options}` (strict: unknown options are errors); what task files and
    run configs hold."""
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError(f"a head entry needs a 'type' key (one of {HEADS.names()}), got {data!r}")
    options = {k: v for k, v in data.items() if k != "type"}
    return HEADS.get(data["type"]).from_dict(options)


def head_to_dict(head: HeadConfig) -> dict[str, Any]:
    """`{"type": name, ...options}`: the inverse of `head_from_dict`."""
    return {"type": head.head_type, **head.to_dict()}


@dataclass(frozen=True)
class FeatureInfo:
    """What a backbone offers to heads.

    Attributes:
        levels: (channels, reduction) of each feature map, shallow to deep.
        pooled_dim: Width of the pooled feature vector.
        kind: "vit" or "cnn".
    """

    levels: tuple[tuple[int, int], ...]
    pooled_dim: int
    kind: str


@dataclasses.dataclass
class HeadConfig(ConfigBase):
    """Base of head configs; `build` makes the trainable head (and its neck)."""

    head_type: ClassVar[str] = ""
    # The kind of results the head makes, whatever module makes them: "classification", "detection",
    # "segmentation" or "embedding", a name in `multitask_peft.outputs.OUTPUT_KINDS`. The kind decodes the head's
    # tensor form into result dicts and owns their JSON form and metric, so a head that wraps another library's
    # module (mmdet, mmseg) but makes the same tensor form is predicted, served and measured like ours.
    output_kind: ClassVar[str] = ""

    def build(self, info: FeatureInfo) -> Head:
        raise NotImplementedError


class Head(nn.Module):
    """A task head.

    `forward(features) -> raw outputs` and `loss(raw, targets)` for training; `export_outputs(raw, image_size)`
    gives the tensor form of the head's output kind (batched, fixed-shape, traceable), which the kind decodes into
    per-image results (`multitask_peft.outputs.decode_outputs`) and an ONNX graph returns as it is.
    """

    def forward(self, features: Features) -> Any:
        raise NotImplementedError

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        raise NotImplementedError

    def export_outputs(self, outputs: Any, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The tensor form of the head's output kind: {field: (N, ...) tensor}, fields as its `tensor_spec`.

        Args:
            outputs: `forward`'s outputs for N images.
            image_size: (H, W) of the input images.
        """
        raise NotImplementedError(f"{type(self).__name__} has no tensor form (export_outputs)")

    def class_logits(self, outputs: Any, image_size: tuple[int, int]) -> torch.Tensor:
        """Per-class scores before the decision, class dimension 1, at the resolution of the results: (N, C) for
        classification, (N, C, H, W) at `image_size` for segmentation. What ensembles combine
        (`multitask_peft.ensemble`); the output kind's `from_class_logits` turns them into the tensor form. Heads
        whose results are not one class decision per image or pixel (detection) have none."""
        raise NotImplementedError(f"{type(self).__name__} has no class logits (ensembles cannot combine it)")

    def tensor_outputs(self, outputs: Any, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The tensor form in eager mode (what `predict` decodes); the same fields as `export_outputs`, which it is
        unless a head has a faster or more general eager path (e.g. a wrapped library's own post-processing).
        Exported graphs and their parity checks always use `export_outputs`."""
        return self.export_outputs(outputs, image_size)

    def onnx_translations(self) -> dict[Any, Callable[..., Any]]:
        """ONNX forms of the custom torch ops `export_outputs` uses: {op overload: onnxscript function}."""
        return {}


def features_read(head: nn.Module, info: FeatureInfo, image_size: tuple[int, int]) -> tuple[bool, frozenset[int]]:
    """Which features a head reads: (the pooled vector?, the indices of the maps). Probed without autograd (also
    under inference mode): the head runs in eval mode on two dummy images, once on zeros and once per feature with
    that feature replaced by noise; a feature is read when the outputs change. A head the probe cannot run is taken
    to read everything."""
    h, w = image_size
    everything = True, frozenset(range(len(info.levels)))
    ref = next(head.parameters(), None)
    like = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, info.pooled_dim)] + [(2, c, max(1, h // r), max(1, w // r)) for c, r in info.levels]
    zeros = [torch.zeros(s, **like) for s in shapes]

    def run(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t for t in _tensors(head(Features(tensors[1:], tensors[0]))) if t.is_floating_point()]

    was_training = head.training
    head.eval()
    try:
        with torch.no_grad():
            base = run(zeros)
            read = []
            for k, shape in enumerate(shapes):
                noise = torch.randn(shape, generator=gen).to(**like)
                out = run([noise if j == k else z for j, z in enumerate(zeros)])
                read.append(any(not torch.equal(a, b) for a, b in zip(base, out, strict=True)))
    except Exception:  # (a head that needs more than features: everything it could read)
        return everything
    finally:
        head.train(was_training)
    return read[0], frozenset(k for k, r in enumerate(read[1:]) if r)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []

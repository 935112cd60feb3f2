"""Multi-adapter layers: one wrapper per adapted backbone module, holding every task's adaptation of it.

The wrapper computes the frozen module once for the whole batch, then applies each slot's adapters to that
slot's contiguous segment of rows. Adapter classes run in a fixed phase order (`LayerAdapter.order`):
norm-affine overrides, DoRA rescaling, parallel low-rank / bottleneck deltas, bias and scale-shift, sequential
bottleneck adapters. A task may combine methods on one module; they compose in that order.

Two forms of every adapter: `adapt` (one segment, out of place: the spec; what autograd sees when training on the
torch path, and what a traced ONNX graph holds; the wrapper joins the segments with one `cat`) and `apply_segments`
(the batched form over every segment of the batch, through the ops of `multitask_peft.kernels`: in place on the
frozen output without autograd, out of place and differentiable when training with the Triton kernels). Which one
runs is decided per call from the routing (`Routing.batched`), autograd and the kernel backend; the segments come
from the routing either way.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import ClassVar

import timm.layers
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, pad_same
from torch import nn

from .. import kernels
from ..routing import RoutingContext, Segment

# How `norm_forward` recomputes a norm, keyed by the forward its class runs (a subclass that only changes
# `__init__`, like MetaFormer's LayerNorm2dNoBias, runs its parent's): "last" = layer norm over the last dim,
# "first" = layer norm over dim 1 of NCHW maps, "batch", "group". Norms running any other forward (RmsNorm,
# EvoNorm, a subclass with its own forward) are not adapted: recomputing them with another affine could be wrong.
_NORM_FORWARDS = {
    nn.LayerNorm.forward: "last",
    timm.layers.LayerNorm.forward: "last",
    timm.layers.LayerNormAct.forward: "last",
    timm.layers.LayerNorm2d.forward: "first",
    timm.layers.LayerNormAct2d.forward: "first",
    nn.BatchNorm2d.forward: "batch",
    timm.layers.BatchNormAct2d.forward: "batch",
    nn.GroupNorm.forward: "group",
    timm.layers.GroupNorm1.forward: "group",
    timm.layers.GroupNormAct.forward: "group",
}


_NORM_BASES = {"last": nn.LayerNorm, "first": nn.LayerNorm, "batch": nn.BatchNorm2d, "group": nn.GroupNorm}


def norm_kind(module: nn.Module) -> str | None:
    """The kind ("last", "first", "batch", "group") of a norm `norm_forward` can recompute, else None. (The base
    class is checked too: BatchNorm1d runs the same `_BatchNorm.forward` as BatchNorm2d, on other shapes.)"""
    kind = _NORM_FORWARDS.get(type(module).forward)
    return kind if kind is not None and isinstance(module, _NORM_BASES[kind]) else None


class LayerAdapter(nn.Module):
    """One task's adaptation of one backbone module (owned by the task, referenced by the wrapper).

    `order` fixes the composition on one module: norm affine (0), DoRA (10), parallel deltas (20), bias (30),
    scale-shift (40), sequential adapters (50)."""

    order: ClassVar[int] = 100
    #: Order among adapters of one `batch_key` on one module (norm affine changes: norm tuning, BitFit, SSF).
    compose_order: ClassVar[int] = 0

    @classmethod
    def batch_key(cls) -> type[LayerAdapter]:
        """Adapters with the same key are applied together by that class's `apply_segments` / `compose`."""
        return cls

    @classmethod
    def compose(cls, adapters: list[LayerAdapter], x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """Apply several adapters of one batch key (one slot, one segment) in order, out of place."""
        for adapter in adapters:
            y = adapter.adapt(x, y, base)
        return y

    @classmethod
    def apply_segments(
        cls,
        items: list[tuple[Segment, LayerAdapter]],
        x: torch.Tensor,  # (rows, ...) input of the module
        y: torch.Tensor,  # (rows, ...) output so far, writable in place
        base: nn.Module,
        cache: kernels.PackCache | None = None,
    ) -> torch.Tensor:
        """Batched form: apply every (segment, adapter) pair (in place without autograd). Default: `compose` per
        segment. `cache` is the layer's store of stacked kernel weights."""
        by_segment: dict[int, tuple[Segment, list[LayerAdapter]]] = {}
        for seg, adapter in items:
            by_segment.setdefault(id(seg), (seg, []))[1].append(adapter)
        outputs = [
            (seg, cls.compose(adapters, x[seg.start : seg.end], y[seg.start : seg.end], base))
            for seg, adapters in by_segment.values()
        ]
        return write_segments(y, outputs)

    def adapt(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """Output of the adapted module on rows of this task, given the frozen output `y` of those rows."""
        raise NotImplementedError

    def fold(self, module: nn.Module) -> None:
        """Fold this adaptation into `module`'s weights (a plain copy of the base module), in place."""
        raise ValueError(f"{type(self).__name__} cannot be folded into the backbone weights")

    def wise_(self, alpha: float, base: nn.Module) -> None:
        """WiSE: change this adapter's parameters in place so that its effect is scaled by `alpha` in [0, 1]
        (0: the frozen `base` module as it is, 1: unchanged). Reparameterisations and adapters scale their delta;
        scale / shift / bias / affine changes move toward identity."""
        raise ValueError(f"{type(self).__name__} has no WiSE form (scaling its change by alpha is not defined)")


class MultiAdapterLayer(nn.Module):
    """Wraps a frozen backbone module; applies each routed slot's adapters to that slot's rows.

    Adapters are kept in a plain dict (not registered submodules): their parameters belong to the task, so the
    backbone's own parameters and state dict never change when tasks come and go. `packs` keeps the stacked kernel
    weights built from the adapters (the model's cache, shared by its layers: one memory budget per model), dropped
    whenever a task attaches or detaches.
    """

    def __init__(self, base: nn.Module, router: RoutingContext, packs: kernels.PackCache) -> None:
        super().__init__()
        self.base = base
        self._router = router
        self._adapters: dict[int, list[LayerAdapter]] = {}
        self.packs = packs

    def attach(self, slot: int, adapter: LayerAdapter) -> None:
        self._adapters.setdefault(slot, []).append(adapter)
        self.packs.clear()

    def detach(self, slot: int) -> None:
        self._adapters.pop(slot, None)
        self.packs.clear()

    def adapters(self, slot: int) -> list[LayerAdapter]:
        return list(self._adapters.get(slot, ()))

    @property
    def is_empty(self) -> bool:
        return not self._adapters

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        routing = self._router.current
        segments = [s for s in routing.segments_for(x) if s.slot in self._adapters]
        if not segments:
            return y
        if routing.batched and (not torch.is_grad_enabled() or kernels.batched_training(y)):
            # batched forms: in place on the frozen output at inference, one differentiable op per class with Triton
            groups: dict[type[LayerAdapter], list[tuple[Segment, LayerAdapter]]] = defaultdict(list)
            for seg in segments:
                for adapter in self._adapters[seg.slot]:
                    groups[adapter.batch_key()].append((seg, adapter))
            for cls in sorted(groups, key=lambda c: c.order):
                y = cls.apply_segments(groups[cls], x, y, self.base, self.packs)
            return y
        # training on the torch path, or a traced graph: each segment out of place, joined by one cat (no
        # full-size slice gradients; symbolic segment bounds are never compared)
        outputs = []
        for seg in segments:
            xs, ys = x[seg.start : seg.end], y[seg.start : seg.end]
            ordered = sorted(self._adapters[seg.slot], key=lambda a: a.order)
            for key, group in itertools.groupby(ordered, key=lambda a: a.batch_key()):
                ys = key.compose(list(group), xs, ys, self.base)
            outputs.append((seg, ys))
        return kernels.segmented.join_rows(y, [((seg.start, seg.end), rows) for seg, rows in outputs])

    def extra_repr(self) -> str:
        return f"slots={sorted(self._adapters)}"


def frozen(module: nn.Module) -> nn.Module:
    """The frozen module under a multi-adapter wrapper (the module itself if it has none): what a method that
    recomputes a layer from its frozen sub-layers calls, so that no other task's adapters apply."""
    return module.base if isinstance(module, MultiAdapterLayer) else module


def write_segments(y: torch.Tensor, outputs: list[tuple[Segment, torch.Tensor]]) -> torch.Tensor:
    """`y` with the rows of each segment (in row order) replaced: in place without autograd, else out of place (rows
    of `y` may be saved for the backward pass of the adapters that produced `outputs`)."""
    if not torch.is_grad_enabled():
        for seg, rows in outputs:
            y[seg.start : seg.end] = rows
        return y
    return kernels.segmented.join_rows(y, [((seg.start, seg.end), rows) for seg, rows in outputs])


def channel_dim(module: nn.Module) -> int:
    """The channel dim of a module's output: -1 for token layouts, 1 for NCHW maps."""
    if isinstance(module, nn.Conv2d) or norm_kind(module) in ("first", "batch", "group"):
        return 1
    return -1


def out_channels(module: nn.Module) -> int:
    """Width of a module's output channels."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    raise ValueError(f"cannot tell the output channels of {type(module).__name__}")


def per_channel(v: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """Reshape a (C,) vector to broadcast along `dim` of an `ndim`-D tensor."""
    if dim == -1 or dim == ndim - 1:
        return v
    shape = [1] * ndim
    shape[dim] = -1
    return v.view(shape)


def conv_like(base: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, groups: int | None = None) -> torch.Tensor:
    """`base`'s convolution (stride, padding incl. timm's dynamic 'same', dilation) with another weight."""
    groups = base.groups if groups is None else groups
    if isinstance(base, Conv2dSame):
        x = pad_same(x, base.kernel_size, base.stride, base.dilation)
        return F.conv2d(x, weight, None, base.stride, 0, base.dilation, groups)
    if base.padding_mode != "zeros":
        raise ValueError(f"padding_mode {base.padding_mode!r} is not supported for adapted convolutions")
    return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation, groups)


def norm_forward(base: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`base`'s normalisation (frozen statistics) with another affine weight / bias, incl. timm's fused act."""
    kind = norm_kind(base)
    if kind == "batch":
        y = F.batch_norm(x, base.running_mean, base.running_var, weight, bias, False, 0.0, base.eps)
    elif kind == "group":
        y = F.group_norm(x, base.num_groups, weight, bias, base.eps)
    elif kind == "first":
        y = F.layer_norm(x.permute(0, 2, 3, 1), base.normalized_shape, weight, bias, base.eps).permute(0, 3, 1, 2)
    elif kind == "last":
        y = F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)
    else:
        raise ValueError(f"unsupported norm layer {type(base).__name__}")
    if hasattr(base, "act"):  # timm BatchNormAct2d / LayerNormAct
        y = base.act(base.drop(y))
    return y

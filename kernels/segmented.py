"""Segmented torch path: one matmul (or one elementwise op) per segment of a slot-sorted batch (used on CPU).

Every op comes in two forms: `op_(y, ...)` updates `y` in place (inference, no autograd) and `op(y, ...)` returns a
new tensor built from per-segment pieces joined by one `cat` (differentiable, cheap backward).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf)
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@dataclass(frozen=True)
class LoRASegment:
    """Rows `start:end` get `scale * (x @ lora_a.T) @ lora_b.T` added to output columns `col:col + out`.

    Attributes:
        start: First row (of the 2-D `x` / `y`).
        end: One past the last row.
        lora_a: (rank, in_features)
        lora_b: (out, rank)
        scale: Multiplier of the update.
        col: First output column written (non-zero for a q/k/v slice of a fused qkv projection).
    """

    start: int
    end: int
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    col: int = 0


@dataclass(frozen=True)
class ScaleShiftSegment:
    """Rows `start:end` become `y * scale + shift`, per channel; either may be None."""

    start: int
    end: int
    scale: torch.Tensor | None  # (channels,)
    shift: torch.Tensor | None  # (channels,)


@dataclass(frozen=True)
class BottleneckSegment:
    """Rows `start:end` get `scale * (act(z @ down.T + down_bias) @ up.T + up_bias)` added.

    Attributes:
        down: (dim, channels)
        down_bias: (dim,)
        up: (channels, dim)
        up_bias: (channels,)
        act: A key of `ACTIVATIONS`.
    """

    start: int
    end: int
    down: torch.Tensor
    down_bias: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor
    act: str
    scale: float


def lora_(y: torch.Tensor, x: torch.Tensor, segments: Sequence[LoRASegment]) -> torch.Tensor:
    """Segmented low-rank update, in place.

    Args:
        y: (rows, out_total) output to update; rows of no segment are untouched.
        x: (rows, in_features) input of the adapted layer.
        segments: Row ranges with their own low-rank factors (segments over the same rows must write disjoint
            column ranges, like the q / k / v slices of one adapter).

    Returns:
        `y`, updated.
    """
    for seg in segments:
        if seg.end == seg.start:
            continue
        h = x[seg.start : seg.end] @ seg.lora_a.t()  # (n, rank)
        out = y[seg.start : seg.end, seg.col : seg.col + seg.lora_b.shape[0]]  # (n, out)
        out.addmm_(h, seg.lora_b.t(), alpha=seg.scale)
    return y


def lora(y: torch.Tensor, x: torch.Tensor, segments: Sequence[LoRASegment]) -> torch.Tensor:
    """Out-of-place, differentiable `lora_`."""
    updates: dict[tuple[int, int], torch.Tensor] = {}
    for seg in segments:
        rows = updates.get((seg.start, seg.end), y[seg.start : seg.end])
        delta = (x[seg.start : seg.end] @ seg.lora_a.t()) @ seg.lora_b.t() * seg.scale
        if delta.shape[-1] != y.shape[-1]:
            delta = F.pad(delta, (seg.col, y.shape[-1] - seg.col - delta.shape[-1]))
        updates[(seg.start, seg.end)] = rows + delta
    return join_rows(y, updates)


def scale_shift_(y: torch.Tensor, segments: Sequence[ScaleShiftSegment]) -> torch.Tensor:
    """Segmented per-channel affine, in place.

    Args:
        y: (rows, channels) or (rows, channels, inner) (an NCHW map viewed with inner = H * W).
        segments: Disjoint row ranges with their own scale and shift.

    Returns:
        `y`, updated.
    """
    for seg in segments:
        rows = y[seg.start : seg.end]
        if seg.scale is not None:
            rows.mul_(_channels(seg.scale, y))
        if seg.shift is not None:
            rows.add_(_channels(seg.shift, y))
    return y


def scale_shift(y: torch.Tensor, segments: Sequence[ScaleShiftSegment]) -> torch.Tensor:
    """Out-of-place, differentiable `scale_shift_`."""
    updates: dict[tuple[int, int], torch.Tensor] = {}
    for seg in segments:
        rows = updates.get((seg.start, seg.end), y[seg.start : seg.end])
        if seg.scale is not None:
            rows = rows * _channels(seg.scale, y)
        if seg.shift is not None:
            rows = rows + _channels(seg.shift, y)
        updates[(seg.start, seg.end)] = rows
    return join_rows(y, updates)


def bottleneck_(y: torch.Tensor, z: torch.Tensor, segments: Sequence[BottleneckSegment]) -> torch.Tensor:
    """Segmented bottleneck adapter, in place: `y[rows] += scale * (act(z @ down.T + db) @ up.T + ub)`.

    Args:
        y: (rows, channels) output to update.
        z: (rows, channels) adapter input (`y` itself for a sequential adapter: each segment reads its rows before
            writing them).
        segments: Disjoint row ranges with their own bottleneck.
    """
    for seg in segments:
        if seg.end > seg.start:
            y[seg.start : seg.end] += _bottleneck(z[seg.start : seg.end], seg)
    return y


def bottleneck(y: torch.Tensor, z: torch.Tensor, segments: Sequence[BottleneckSegment]) -> torch.Tensor:
    """Out-of-place, differentiable `bottleneck_`."""
    sequential = z.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    updates: dict[tuple[int, int], torch.Tensor] = {}
    for seg in segments:
        rows = updates.get((seg.start, seg.end), y[seg.start : seg.end])
        updates[(seg.start, seg.end)] = rows + _bottleneck(rows if sequential else z[seg.start : seg.end], seg)
    return join_rows(y, updates)


def _bottleneck(z: torch.Tensor, seg: BottleneckSegment) -> torch.Tensor:
    h = ACTIVATIONS[seg.act](F.linear(z, seg.down, seg.down_bias))
    return F.linear(h, seg.up, seg.up_bias) * seg.scale


def _channels(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return v[:, None] if y.ndim == 3 else v


def join_rows(
    y: torch.Tensor, updates: Mapping[tuple[int, int], torch.Tensor] | Sequence[tuple[tuple[int, int], torch.Tensor]]
) -> torch.Tensor:
    """`y` with rows `start:end` replaced by each update (disjoint ranges), built with one `cat`.

    `updates` maps ranges to rows, or lists (range, rows) pairs already in row order (what a traced graph with
    symbolic bounds passes: they are never compared).
    """
    if not updates:
        return y
    pieces, pos = [], 0
    for (start, end), rows in sorted(updates.items()) if isinstance(updates, Mapping) else updates:
        pieces += [y[pos:start], rows]
        pos = end
    pieces.append(y[pos:])
    return torch.cat(pieces)

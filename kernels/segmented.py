"""Segmented torch path: one matmul (or one elementwise op) per segment of a slot-sorted batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
    """Rows `start:end` become `y * scale + shift`, per channel (last dim); either may be None."""

    start: int
    end: int
    scale: torch.Tensor | None  # (channels,)
    shift: torch.Tensor | None  # (channels,)


def lora_(y: torch.Tensor, x: torch.Tensor, segments: Sequence[LoRASegment]) -> torch.Tensor:
    """Segmented low-rank update, in place.

    Args:
        y: (rows, out_total) output to update; rows of no segment are untouched.
        x: (rows, in_features) input of the adapted layer.
        segments: Disjoint row ranges with their own low-rank factors.

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


def scale_shift_(y: torch.Tensor, segments: Sequence[ScaleShiftSegment]) -> torch.Tensor:
    """Segmented per-channel affine, in place.

    Args:
        y: (rows, channels)
        segments: Disjoint row ranges with their own scale and shift.

    Returns:
        `y`, updated.
    """
    for seg in segments:
        rows = y[seg.start : seg.end]
        if seg.scale is not None:
            rows.mul_(seg.scale)
        if seg.shift is not None:
            rows.add_(seg.shift)
    return y

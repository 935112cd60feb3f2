"""Reference semantics of the batched multi-adapter ops: plain loops over rows. Slow; the spec and the test oracle.

Each op updates `y` in place (autograd records it when `y` is a non-leaf tensor, which is how the tests take
reference gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .segmented import ACTIVATIONS, BottleneckSegment, LoRASegment, ScaleShiftSegment


def lora_(y: torch.Tensor, x: torch.Tensor, segments: Sequence[LoRASegment]) -> torch.Tensor:
    """For each segment s and each row i in s.start:s.end:
    y[i, s.col : s.col + out] += s.scale * (x[i] @ s.lora_a.T) @ s.lora_b.T
    Rows outside every segment (slot -1) are untouched."""
    for seg in segments:
        for i in range(seg.start, seg.end):
            update = seg.scale * ((x[i] @ seg.lora_a.t()) @ seg.lora_b.t())
            y[i, seg.col : seg.col + seg.lora_b.shape[0]] += update
    return y


def scale_shift_(y: torch.Tensor, segments: Sequence[ScaleShiftSegment]) -> torch.Tensor:
    """For each segment s and each row i in s.start:s.end: y[i] = y[i] * s.scale + s.shift, per channel (dim 1 of
    y; y may have a trailing `inner` dim that shares the channel's value). A None is skipped."""
    for seg in segments:
        for i in range(seg.start, seg.end):
            row = y[i].clone()  # (a view would be overwritten below while autograd still needs it)
            if seg.scale is not None:
                row = row * (seg.scale[:, None] if y.ndim == 3 else seg.scale)
            if seg.shift is not None:
                row = row + (seg.shift[:, None] if y.ndim == 3 else seg.shift)
            y[i] = row
    return y


def bottleneck_(y: torch.Tensor, z: torch.Tensor, segments: Sequence[BottleneckSegment]) -> torch.Tensor:
    """For each segment s and each row i in s.start:s.end (z read before y is written):
    y[i] += s.scale * (act(z[i] @ s.down.T + s.down_bias) @ s.up.T + s.up_bias)"""
    for seg in segments:
        updates = [
            seg.scale * (ACTIVATIONS[seg.act](z[i].clone() @ seg.down.t() + seg.down_bias) @ seg.up.t() + seg.up_bias)
            for i in range(seg.start, seg.end)
        ]
        for i, update in zip(range(seg.start, seg.end), updates, strict=True):
            y[i] += update
    return y


def lora(y: torch.Tensor, x: torch.Tensor, segments: Sequence[LoRASegment]) -> torch.Tensor:
    """Out of place (differentiable through autograd's record of the loops)."""
    return lora_(y.clone(), x, segments)


def scale_shift(y: torch.Tensor, segments: Sequence[ScaleShiftSegment]) -> torch.Tensor:
    return scale_shift_(y.clone(), segments)


def bottleneck(y: torch.Tensor, z: torch.Tensor, segments: Sequence[BottleneckSegment]) -> torch.Tensor:
    """Out of place; a sequential adapter (`z` is `y`) reads the rows as the earlier segments left them."""
    out = y.clone()
    return bottleneck_(out, out if z.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() else z, segments)

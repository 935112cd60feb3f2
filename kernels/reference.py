"""Reference semantics of the batched multi-adapter ops: plain loops over rows. Slow; the spec and the test oracle."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .segmented import LoRASegment, ScaleShiftSegment


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
    """For each segment s and each row i in s.start:s.end: y[i] = y[i] * s.scale + s.shift (a None is skipped)."""
    for seg in segments:
        for i in range(seg.start, seg.end):
            row = y[i]
            if seg.scale is not None:
                row = row * seg.scale
            if seg.shift is not None:
                row = row + seg.shift
            y[i] = row
    return y

"""Batched multi-adapter ops (a leaf package: tensors in, tensors out).

Every op has a pure-torch reference (`reference.py`, the spec, a plain loop over rows) and a fast segmented
torch path (`segmented.py`, one matmul per segment, used on CPU). `MULTITASK_PEFT_KERNELS=reference|torch`
forces one of them; the default is `torch`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import reference, segmented
from .segmented import LoRASegment, ScaleShiftSegment

__all__ = ["LoRASegment", "ScaleShiftSegment", "lora_", "scale_shift_", "backend", "reference", "segmented"]

_BACKENDS = ("reference", "torch")


def backend() -> str:
    """The kernel backend in force (`MULTITASK_PEFT_KERNELS`, default `torch`)."""
    name = os.environ.get("MULTITASK_PEFT_KERNELS", "torch")
    if name not in _BACKENDS:
        raise ValueError(f"MULTITASK_PEFT_KERNELS must be one of {_BACKENDS} but is {name!r}")
    return name


def lora_(y: torch.Tensor, x: torch.Tensor, segments: Sequence[LoRASegment]) -> torch.Tensor:
    return (reference.lora_ if backend() == "reference" else segmented.lora_)(y, x, segments)


def scale_shift_(y: torch.Tensor, segments: Sequence[ScaleShiftSegment]) -> torch.Tensor:
    return (reference.scale_shift_ if backend() == "reference" else segmented.scale_shift_)(y, segments)


lora_.__doc__ = segmented.lora_.__doc__
scale_shift_.__doc__ = segmented.scale_shift_.__doc__

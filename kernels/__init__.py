"""Batched multi-adapter ops (a leaf package: tensors in, tensors out).

Three implementations of every op, same semantics:

- `reference` (`reference.py`): plain loops over rows; the spec and the test oracle.
- `torch` (`segmented.py`): one matmul / elementwise op per segment; the fast path on CPU.
- `triton` (`triton_ops.py` over `triton_kernels.py`): segments packed into stacked weights and row tiles, one
  launch per op for the whole batch; torch custom ops with autograd. The fast path on CUDA.

Each op has an in-place form `op_` (inference) and a differentiable out-of-place form `op` (training).
`MULTITASK_PEFT_KERNELS=auto|reference|torch|triton` picks the implementation; `auto` (default) takes Triton for
fp16 / bf16 / fp32 CUDA tensors and the torch path otherwise (Triton compiles no fp64 dot with an fp32
accumulator). Forcing `triton` on CPU tensors needs `TRITON_INTERPRET=1` set before the first launch (that is how
the kernel tests run without a GPU).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Sequence

import torch

from . import reference, segmented
from .packing import PackCache
from .segmented import ACTIVATIONS, BottleneckSegment, LoRASegment, ScaleShiftSegment

__all__ = [
    "ACTIVATIONS",
    "BottleneckSegment",
    "LoRASegment",
    "PackCache",
    "ScaleShiftSegment",
    "backend",
    "bottleneck",
    "bottleneck_",
    "lora",
    "lora_",
    "scale_shift",
    "scale_shift_",
    "use_backend",
]

BACKENDS = ("auto", "reference", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernels compile for on a GPU


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend(tensor: torch.Tensor | None = None) -> str:
    """The implementation used for `tensor`: `MULTITASK_PEFT_KERNELS` resolved (`auto` -> triton for CUDA tensors of
    TRITON_DTYPES)."""
    name = os.environ.get("MULTITASK_PEFT_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"MULTITASK_PEFT_KERNELS must be one of {BACKENDS} but is {name!r}")
    if name == "auto":
        cuda = tensor is not None and tensor.is_cuda and tensor.dtype in TRITON_DTYPES
        return "triton" if cuda and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("MULTITASK_PEFT_KERNELS=triton but triton is not installed (pip install triton)")
        if tensor is not None and not tensor.is_cuda and not _interpreting():
            raise RuntimeError(
                "MULTITASK_PEFT_KERNELS=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before the first launch, or use MULTITASK_PEFT_KERNELS=torch"
            )
        if tensor is not None and tensor.is_cuda and tensor.dtype not in TRITON_DTYPES:
            raise RuntimeError(
                f"MULTITASK_PEFT_KERNELS=triton on {tensor.dtype} CUDA tensors: the kernels compile for fp16, bf16 "
                "and fp32 only; use MULTITASK_PEFT_KERNELS=torch (or auto, which picks it) for other dtypes"
            )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """`MULTITASK_PEFT_KERNELS=name` while inside (read at every dispatch; benchmarks and checks compare paths)."""
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    saved = os.environ.get("MULTITASK_PEFT_KERNELS")
    os.environ["MULTITASK_PEFT_KERNELS"] = name
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MULTITASK_PEFT_KERNELS"]
        else:
            os.environ["MULTITASK_PEFT_KERNELS"] = saved


def batched_training(tensor: torch.Tensor) -> bool:
    """True when training should use the batched differentiable ops (Triton), not per-segment composition."""
    return backend(tensor) == "triton"


def _call(op: str, y: torch.Tensor, *args: object, cache: PackCache | None) -> torch.Tensor:
    """`op` of the implementation chosen for `y`; only the Triton path packs weights (and so uses `cache`)."""
    name = backend(y)
    if name == "triton":
        from . import triton_ops

        return getattr(triton_ops, op)(y, *args, cache=cache)
    return getattr(reference if name == "reference" else segmented, op)(y, *args)


def lora_(
    y: torch.Tensor, x: torch.Tensor, segments: Sequence[LoRASegment], cache: PackCache | None = None
) -> torch.Tensor:
    """In place, for each segment s: `y[s rows, s.col : s.col + out] += s.scale * (x[s rows] @ A.T) @ B.T`.

    `cache` keeps the stacked weights of the Triton path between calls (the caller owns it; None: no reuse)."""
    return _call("lora_", y, x, segments, cache=cache)


def lora(
    y: torch.Tensor, x: torch.Tensor, segments: Sequence[LoRASegment], cache: PackCache | None = None
) -> torch.Tensor:
    """Differentiable `lora_`, out of place."""
    return _call("lora", y, x, segments, cache=cache)


def scale_shift_(
    y: torch.Tensor, segments: Sequence[ScaleShiftSegment], cache: PackCache | None = None
) -> torch.Tensor:
    """In place, per segment: `y[s rows] = y[s rows] * scale + shift` over channels (dim 1 of a 2-D or 3-D y)."""
    return _call("scale_shift_", y, segments, cache=cache)


def scale_shift(y: torch.Tensor, segments: Sequence[ScaleShiftSegment], cache: PackCache | None = None) -> torch.Tensor:
    """Differentiable `scale_shift_`, out of place."""
    return _call("scale_shift", y, segments, cache=cache)


def bottleneck_(
    y: torch.Tensor, z: torch.Tensor, segments: Sequence[BottleneckSegment], cache: PackCache | None = None
) -> torch.Tensor:
    """In place, per segment: `y[s rows] += scale * (act(z @ down.T + db) @ up.T + ub)` (z may be y)."""
    return _call("bottleneck_", y, z, segments, cache=cache)


def bottleneck(
    y: torch.Tensor, z: torch.Tensor, segments: Sequence[BottleneckSegment], cache: PackCache | None = None
) -> torch.Tensor:
    """Differentiable `bottleneck_`, out of place."""
    return _call("bottleneck", y, z, segments, cache=cache)

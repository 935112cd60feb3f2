"""Checks of an exported graph: ONNX Runtime against PyTorch on example images."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .graph import MultiTaskGraph, device_of


def example_images(n: int, image_size: tuple[int, int]) -> torch.Tensor:
    return torch.randn(n, 3, *image_size, generator=torch.Generator().manual_seed(n))


def example_runs(
    graph: MultiTaskGraph, path: Path, dynamic_batch: bool
) -> Iterator[tuple[int, list[Any], tuple[torch.Tensor, ...]]]:
    """(batch size, ORT outputs, PyTorch outputs) on random example images: batches of 1 and 3 when the batch
    is dynamic, else 1."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3) if dynamic_batch else (1,):
        images = example_images(n, graph.image_size)
        got = session.run(graph.output_names, {"images": images.numpy()})
        with torch.no_grad():
            expected = graph(images.to(device_of(graph.model)))
        yield n, got, expected


def parity(graph: MultiTaskGraph, path: Path, atol: float, dynamic_batch: bool) -> None:
    """ORT vs PyTorch on the example images."""
    for n, got, expected in example_runs(graph, path, dynamic_batch):
        compare(graph.output_names, got, expected, atol, f"batch {n}")


def compare(names: Sequence[str], got: Sequence[Any], expected: Sequence[torch.Tensor], atol: float, what: str) -> None:
    """ONNX Runtime outputs against PyTorch: floats within `atol` of their scale, masks >= 99.9 % equal, other
    integer outputs equal."""
    for name, a, b in zip(names, got, expected, strict=True):
        a, b = torch.from_numpy(a), b.detach().cpu()
        if a.shape != b.shape:
            raise RuntimeError(
                f"ONNX export check ({what}): {name} has shape {tuple(a.shape)}, PyTorch {tuple(b.shape)}"
            )
        if b.is_floating_point():
            err = (a.float() - b.float()).abs().max().item() if b.numel() else 0.0
            if err > atol * max(1.0, b.abs().max().item()):
                raise RuntimeError(f"ONNX export check ({what}): {name} differs from PyTorch by {err:.3g}")
        elif name.endswith(".mask"):
            agree = (a == b).float().mean().item() if b.numel() else 1.0
            if agree < 0.999:
                raise RuntimeError(f"ONNX export check ({what}): {name} agrees with PyTorch on {agree:.2%} of pixels")
        elif not torch.equal(a.to(b.dtype), b):
            raise RuntimeError(f"ONNX export check ({what}): {name} differs from PyTorch")

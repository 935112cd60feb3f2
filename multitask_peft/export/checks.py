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


DETECTION_FIELDS = ("boxes", "scores", "labels", "num_detections")
#: Detections of one side allowed without a partner on the other (NMS and top-k near score ties).
UNMATCHED_DETECTIONS = 0.1


def compare(names: Sequence[str], got: Sequence[Any], expected: Sequence[torch.Tensor], atol: float, what: str) -> None:
    """ONNX Runtime outputs against PyTorch: floats within `atol` of their scale, masks >= 99.9 % equal, other
    integer outputs equal; a detection task's outputs are compared as detections (`compare_detections`)."""
    pairs = {name: (torch.from_numpy(a), b.detach().cpu()) for name, a, b in zip(names, got, expected, strict=True)}
    for name, (a, b) in pairs.items():
        if a.shape != b.shape and name.rpartition(".")[2] not in DETECTION_FIELDS:
            raise RuntimeError(
                f"ONNX export check ({what}): {name} has shape {tuple(a.shape)}, PyTorch {tuple(b.shape)}"
            )
    detection_tasks = {
        name.rpartition(".")[0]
        for name in pairs
        if all(f"{name.rpartition('.')[0]}.{f}" in pairs for f in DETECTION_FIELDS)
    }
    for task in sorted(detection_tasks):
        compare_detections(
            {f: pairs[f"{task}.{f}"][0] for f in DETECTION_FIELDS},
            {f: pairs[f"{task}.{f}"][1] for f in DETECTION_FIELDS},
            atol,
            f"{what}, {task}",
        )
    for name, (a, b) in pairs.items():
        if name.rpartition(".")[0] in detection_tasks and name.rpartition(".")[2] in DETECTION_FIELDS:
            continue
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


def compare_detections(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float, what: str) -> None:
    """Post-NMS detections (`boxes` (N, K, 4), `scores` (N, K), `labels` (N, K), `num_detections` (N,)) of ONNX
    Runtime against PyTorch, as sets per image: a detection's partner has its label, a score within `atol` and a
    box within `atol` of the box scale. Candidates whose scores (nearly) tie may swap across NMS or the top-k cut
    under float rounding, so up to `UNMATCHED_DETECTIONS` of the detections may lack a partner; every matched pair
    must agree."""
    n = expected["num_detections"].shape[0]
    if got["num_detections"].shape[0] != n:
        raise RuntimeError(f"ONNX export check ({what}): {got['num_detections'].shape[0]} images, PyTorch {n}")
    scale = max(1.0, expected["boxes"].abs().max().item()) if expected["boxes"].numel() else 1.0
    unmatched = total = 0
    for i in range(n):
        k_got, k_exp = int(got["num_detections"][i]), int(expected["num_detections"][i])
        ours = [
            (got["boxes"][i, j].float(), float(got["scores"][i, j]), int(got["labels"][i, j])) for j in range(k_got)
        ]
        free = list(range(len(ours)))
        for j in range(k_exp):
            box, score, label = (
                expected["boxes"][i, j].float(),
                float(expected["scores"][i, j]),
                int(expected["labels"][i, j]),
            )
            match = next(
                (
                    m
                    for m in free
                    if ours[m][2] == label
                    and abs(ours[m][1] - score) <= atol
                    and (ours[m][0] - box).abs().max().item() <= atol * scale
                ),
                None,
            )
            if match is None:
                unmatched += 1
            else:
                free.remove(match)
        unmatched += len(free)
        total += k_got + k_exp
    if total and unmatched > UNMATCHED_DETECTIONS * total:
        raise RuntimeError(
            f"ONNX export check ({what}): {unmatched} of {total} detections have no partner (same label, score and "
            f"box within {atol:g}) on the other side (PyTorch vs ONNX Runtime)"
        )

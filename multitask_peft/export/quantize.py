"""Dynamic int8 quantisation of an exported graph's weight matmuls, with its drift from PyTorch bounded and recorded."""

from __future__ import annotations

from pathlib import Path

import torch

from .checks import example_runs
from .graph import MultiTaskGraph, save_onnx

INT8_BOUNDS = {"float": 0.25, "mask": 0.95}
"""Largest int8 drift accepted at export: float outputs other than detections (logits) within 25 % of their scale,
segmentation masks >= 95 % equal pixels. Detection outputs are recorded (fraction of equal counts and labels), not
bounded: a small score change moves a box across the score threshold or through NMS."""


def quantize_int8(path: Path) -> None:
    """Dynamic int8 quantisation of the weight matmuls of the graph at `path`, in place."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = path.with_name(path.stem + ".fp32.onnx")
    model = onnx.load(str(path))
    # the quantiser re-infers shapes; the exporter's annotations make its inference fail on some graphs
    del model.graph.value_info[:]
    save_onnx(model, fp32)
    weights = {i.name for i in model.graph.initializer}
    # activation x activation matmuls (attention) stay fp32: quantising both sides per batch costs accuracy
    skip = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    quantize_dynamic(
        fp32,
        path,
        op_types_to_quantize=["MatMul"],
        weight_type=QuantType.QInt8,
        nodes_to_exclude=skip,
        use_external_data_format=model.ByteSize() > 1_800_000_000,
    )
    fp32.unlink()
    for leftover in path.parent.glob(fp32.name + "*"):  # the fp32 copy's external weights, if any
        leftover.unlink()


def int8_drift(graph: MultiTaskGraph, path: Path, dynamic_batch: bool) -> dict[str, float]:
    """Drift of the int8 graph from PyTorch (fp32) per output on the example images; raises past `INT8_BOUNDS`.

    Floats: max |int8 - fp32| over max(1, max |fp32|); masks and integer outputs: fraction of equal entries.
    Detection boxes and scores are left out (the kept set may differ; counts and labels show it).
    """
    drift: dict[str, float] = {}
    for _, got, expected in example_runs(graph, path, dynamic_batch):
        for name, a, b in zip(graph.output_names, got, expected, strict=True):
            a, b = torch.from_numpy(a), b.detach().cpu()
            if a.shape != b.shape:
                raise RuntimeError(f"int8 export check: {name} has shape {tuple(a.shape)}, PyTorch {tuple(b.shape)}")
            if name.endswith((".boxes", ".scores")):
                continue
            if b.is_floating_point():
                value = (a - b).abs().max().item() / max(1.0, b.abs().max().item()) if b.numel() else 0.0
                drift[name] = max(drift.get(name, 0.0), value)
                if value > INT8_BOUNDS["float"]:
                    raise RuntimeError(f"int8 export check: {name} drifts {value:.3g} of its scale from fp32")
            else:
                value = (a.to(b.dtype) == b).float().mean().item() if b.numel() else 1.0
                drift[name] = min(drift.get(name, 1.0), value)
                if name.endswith(".mask") and value < INT8_BOUNDS["mask"]:
                    raise RuntimeError(f"int8 export check: {name} agrees with fp32 on {value:.2%} of pixels")
    return {k: round(v, 6) for k, v in drift.items()}

"""ONNX export: one graph that runs several tasks on every image, with the tasks' adapters kept unmerged.

- `graph`: the traceable multi-task forward (`MultiTaskGraph`) and its conversion to ONNX;
- `adapters`: LoRA adapter graphs and their `.onnx_adapter` files;
- `quantize`: dynamic int8 weight matmuls and their drift bound;
- `checks`: ONNX Runtime against PyTorch;
- `sidecar`: the JSON file that describes a graph (`<name>.json`; `OnnxRunner` reads both);
- `metadata`: the same description inside the graph (`metadata_props`, keys `mtpeft.*`);
- `triton`: a Triton Inference Server model repository for a graph (`write_triton_repo`).

Outputs are named `<task>.<field>` (classification `logits`; detection `boxes`, `scores`, `labels`,
`num_detections`, padded to a fixed K; segmentation `mask`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .adapters import check_adapter_tasks, check_adapters, make_overridable, write_adapter
from .checks import parity
from .graph import MultiTaskGraph, save_onnx, to_onnx
from .metadata import METADATA_PREFIX, read_metadata, sidecar_from_metadata, write_metadata
from .quantize import INT8_BOUNDS, int8_drift, quantize_int8
from .sidecar import SIDECAR_FORMAT, SIDECAR_VERSION, build_sidecar, sidecar_path
from .triton import write_triton_repo

__all__ = [
    "INT8_BOUNDS",
    "METADATA_PREFIX",
    "SIDECAR_FORMAT",
    "SIDECAR_VERSION",
    "MultiTaskGraph",
    "export_onnx",
    "read_metadata",
    "sidecar_from_metadata",
    "sidecar_path",
    "write_triton_repo",
]


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    image_size: tuple[int, int] | int | None = None,
    dynamic_batch: bool = True,
    opset: int | None = None,
    fp16: bool = False,
    merge: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    check: bool = True,
    atol: float = 1e-4,
    optimize: bool = True,
    quantize: str | None = None,
) -> Path:
    """Export `tasks` of a `MultiTaskModel` as one ONNX graph plus its JSON sidecar; the graph carries the sidecar's
    information in its `metadata_props` too (`mtpeft.*` keys, `multitask_peft.export.metadata`).

    Three forms:

    - default: one graph that runs every listed task on every image (unmerged adapters, shared prefix);
    - `merge=True` with one task: that task alone, its PEFT folded into the backbone weights (any foldable method,
      full fine-tuning included) - the smallest, fastest graph for edge use;
    - `merge=True` with several LoRA tasks of one shape (same LoRA options and head config): the first task's
      graph with its LoRA factors and head weights as overridable initializers, plus one `<name>.<task>.onnx_adapter`
      file per task, so ONNX Runtime's multi-LoRA API (`LoraAdapter`, `RunOptions.add_active_adapter`) switches
      tasks per run without a re-export (`OnnxRunner.predict(images, tasks=[...])` does it for you).

    Ensembles listed among the tasks are outputs computed in the graph from their members' outputs (the members run
    once; they are outputs too when listed). The sidecar gives each ensemble's members and mode.

    Args:
        model: The multi-task model (left unchanged; exported in eval mode).
        path: Output `.onnx` file; the sidecar is written next to it (`sidecar_path`).
        tasks: Tasks and ensembles to include (default: all), in output order.
        image_size: (H, W) or a side; default: the backbone's input size.
        dynamic_batch: Symbolic batch dimension; else the graph is fixed to batch 1.
        opset: ONNX opset (default: the exporter's; at least 18).
        fp16: Export half-precision weights and activations (inputs and float outputs stay float32 at the graph
            boundary); parity is then checked with a looser tolerance.
        merge: See above.
        mean, std: Input normalisation recorded in the sidecar (default: `model.data_config`, what the weights expect).
        check: Run `onnx.checker` (full check) and a parity run against PyTorch on random example inputs.
        atol: Largest allowed difference of float outputs in the parity run (fp32), relative to their scale.
        optimize: Run the exporter's graph optimiser (onnxscript; most of the export time on small models; off for
            adapter graphs, whose overridable weights must not be folded). ONNX Runtime optimises again on load.
        quantize: `"int8"`: dynamic int8 quantisation of the weight matmuls (ONNX Runtime's `quantize_dynamic`:
            int8 weights, uint8 activations quantised per batch, `MatMulInteger`) for CPUs with VNNI / AVX-512 or
            ARM dot-product units: about 2x ORT's fp32 throughput on ViTs, little on convolutional backbones.
            Results change: the fp32 graph passes the usual parity check first, then the int8 graph's drift from
            PyTorch on the same example images is bounded (`INT8_BOUNDS`) and recorded in the sidecar
            (`quantization.drift`); validate accuracy on your own data before deploying.

    Returns:
        The path of the graph. Nothing is written unless every check passed.
    """
    import onnx  # fails early without the `onnx` extra

    path = Path(path)
    if isinstance(tasks, str):
        tasks = [tasks]
    names = [*model.tasks, *model.ensembles] if tasks is None else list(dict.fromkeys(tasks))
    if not names:
        raise ValueError(f"tasks must name at least one task; the model has {model.tasks}")
    for name in names:
        model.head_config(name)  # raises with the known tasks and ensembles
    if image_size is None:
        image_size = model.backbone.image_size
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    image_size = (int(image_size[0]), int(image_size[1]))
    if opset is not None and opset < 18:
        raise ValueError(f"opset must be >= 18 (the dynamo exporter's minimum), got {opset}")
    if path.suffix == ".json":
        raise ValueError(f"path must not end in .json (that is the sidecar's name): {path}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize and fp16:
        raise ValueError("quantize='int8' and fp16=True exclude each other (int8 graphs keep fp32 activations)")
    listed = [n for n in names if n in model.ensembles]
    if merge and listed:
        raise ValueError(
            f"{listed} are ensembles: merge=True folds tasks into the weights; export ensembles in the multi-task "
            "graph (merge=False)"
        )
    adapters = merge and len(names) > 1
    if adapters and quantize:
        raise ValueError("quantize='int8' is not supported for LoRA adapter graphs (their weights must stay fp32)")
    if adapters:
        if fp16:
            raise ValueError("fp16 adapter graphs are not supported: export LoRA adapter files in fp32")
        check_adapter_tasks(model, names)

    was_training = model.training
    model.eval()
    try:
        if adapters:
            graph = MultiTaskGraph(model, names[:1], image_size, output_prefixes=["task"])
        else:
            graph = MultiTaskGraph(model, names, image_size, merged=merge)
        start = time.perf_counter()
        onnx_model = to_onnx(graph, image_size, dynamic_batch, opset, fp16, optimize and not adapters)
        overridable = make_overridable(onnx_model, f"model.task_modules.{names[0]}.") if adapters else {}
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecar = build_sidecar(model, graph, names, image_size, dynamic_batch, fp16, merge, mean, std, seconds)
        if quantize:
            sidecar["precision"] = "int8"
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            staged = Path(tmp) / path.name
            save_onnx(onnx_model, staged)
            files = {staged: path}
            weights = Path(tmp) / (path.name + ".data")  # large graphs keep their weights beside them
            if weights.exists():
                files[weights] = path.parent / weights.name
            if adapters:
                sidecar["adapters"] = {}
                for name in names:
                    adapter = Path(tmp) / f"{path.stem}.{name}.onnx_adapter"
                    write_adapter(model, name, names[0], overridable, adapter)
                    sidecar["adapters"][name] = adapter.name
                    files[adapter] = path.parent / adapter.name
            sidecar_file = Path(tmp) / sidecar_path(path).name
            sidecar_file.write_text(json.dumps(sidecar, indent=2))
            files[sidecar_file] = sidecar_path(path)
            if check:
                onnx.checker.check_model(str(staged), full_check=True)
                parity(graph, staged, atol if not fp16 else max(atol, 5e-2), dynamic_batch)
                if adapters:
                    check_adapters(model, names, staged, sidecar, Path(tmp), image_size, atol)
            if quantize:
                quantize_int8(staged)
                sidecar["quantization"] = {"method": "dynamic-int8", "ops": ["MatMul"]}
                if check:
                    onnx.checker.check_model(str(staged), full_check=True)
                    sidecar["quantization"]["drift"] = int8_drift(graph, staged, dynamic_batch)
                sidecar_file.write_text(json.dumps(sidecar, indent=2))
            write_metadata(staged, sidecar)  # the graph describes itself too (`metadata_props`)
            for src, dst in files.items():
                os.replace(src, dst)
    finally:
        model.train(was_training)
    return path

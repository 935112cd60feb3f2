"""ONNX export: one graph that runs several tasks on every image, with the tasks' adapters kept unmerged.

The graph takes `images` (N, 3, H, W), normalised, and returns every listed task's outputs for every image,
named `<task>.<field>` (classification `logits`; detection `boxes`, `scores`, `labels`, `num_detections`, padded
to a fixed K; segmentation `mask`). The backbone parts before the first part any listed task changes run once per
image; there the batch fans out task-major (N rows per task) and each adapted layer applies every task's
adapters to its block of rows (`StackedRouting`: symbolic block sizes, so the batch dimension stays dynamic).

A JSON sidecar next to the graph (`<name>.json`) describes the tasks, their classes and outputs, and the
preprocessing; `OnnxRunner` reads both.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .heads import Features, Head
from .routing import PLAIN_SLOT, StackedRouting

SIDECAR_FORMAT = "multitask-peft-onnx"
SIDECAR_VERSION = 1


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the JSON sidecar of an exported graph lives: the graph's path with the suffix `.json`."""
    return Path(path).with_suffix(".json")


class MultiTaskGraph(nn.Module):
    """The traceable multi-task forward of `model` for `tasks` at a fixed image size (what gets exported).

    Calling it in PyTorch gives the graph's outputs: a tuple in the order of `output_names`.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[str],
        image_size: tuple[int, int],
        merged: bool = False,
        output_prefixes: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.task_names = list(tasks)
        self.output_prefixes = list(output_prefixes) if output_prefixes is not None else list(self.task_names)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.slots = tuple(model.slot(t) for t in self.task_names)
        self.plain: nn.Module | None = None  # merged: the task's backbone with its PEFT folded in
        for name in self.task_names:
            if type(model.task(name).head).export_outputs is Head.export_outputs:
                raise ValueError(f"task {name!r}: head {type(model.task(name).head).__name__} has no ONNX form")
        if merged:
            if len(self.task_names) != 1:
                raise ValueError(f"a merged graph holds one task, got {self.task_names}")
            self.plain = model.merged_backbone(self.task_names[0])  # raises for methods that cannot be folded
            self.branch_at = 0
        else:
            plans = [model._plans[s] for s in self.slots]
            for name, plan in zip(self.task_names, plans, strict=True):
                unsupported = [c.method for c in model.task(name).peft_configs if not c.onnx]
                if unsupported or plan.prompts is not None or plan.backbone is not None:
                    raise ValueError(
                        f"task {name!r} cannot be exported to ONNX: method {', '.join(unsupported) or '?'} has no "
                        "ONNX form in the multi-task graph (prompt tokens / a private backbone); export the other "
                        "tasks, or this one alone with merge=True"
                    )
            self.branch_at = min(p.first_position for p in plans)
        self.eval()
        self.output_names = self._trace_names()

    def _trace_names(self) -> list[str]:
        names = []
        with torch.no_grad():
            images = torch.zeros(1, 3, *self.image_size, device=_device(self.model))
            for prefix, fields in zip(self.output_prefixes, self._forward(images), strict=True):
                names += [f"{prefix}.{field}" for field in fields]
        return names

    def _forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        host = self.model.backbone
        layout = host.layout
        module = self.plain if self.plain is not None else host.model
        num_tasks = len(self.slots)
        level_at = {lvl.position: k for k, lvl in enumerate(layout.levels)}
        captures: list[torch.Tensor | None] = [None] * len(layout.levels)
        x = images
        fanned = False
        for p in range(len(layout.parts) + 1):
            if p == self.branch_at and not fanned:
                x = torch.cat([x] * num_tasks)
                captures = [c if c is None else torch.cat([c] * num_tasks) for c in captures]
                fanned = True
            routing = StackedRouting(self.slots if fanned else (PLAIN_SLOT,))
            with host.router.use(routing):  # (the merged backbone has no adapted layers to read it)
                if p == len(layout.parts):
                    pooled = layout.pool(module, x)
                    break
                x = layout.parts[p].fn(module, x)
            if p in level_at:
                captures[level_at[p]] = x
        if not fanned:  # no task changes the backbone
            pooled = torch.cat([pooled] * num_tasks)
            captures = [torch.cat([c] * num_tasks) for c in captures]
        maps = [layout.to_map(c, self.image_size) for c in captures]
        results = []
        for k, name in enumerate(self.task_names):
            feats = Features(
                [m.unflatten(0, (num_tasks, -1))[k] for m in maps], pooled.unflatten(0, (num_tasks, -1))[k]
            )
            head = self.model.task(name).head
            results.append(head.export_outputs(head(feats), self.image_size))
        return results

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for fields in self._forward(images) for t in fields.values())


def _device(model: nn.Module) -> torch.device:
    return next(model.backbone.model.parameters()).device


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
    """Export `tasks` of a `MultiTaskModel` as one ONNX graph plus its JSON sidecar.

    Three forms:

    - default: one graph that runs every listed task on every image (unmerged adapters, shared prefix);
    - `merge=True` with one task: that task alone, its PEFT folded into the backbone weights (any foldable method,
      full fine-tuning included) - the smallest, fastest graph for edge use;
    - `merge=True` with several LoRA tasks of one shape (same LoRA options and head config): the first task's
      graph with its LoRA factors and head weights as overridable initializers, plus one `<name>.<task>.onnx_adapter`
      file per task, so ONNX Runtime's multi-LoRA API (`LoraAdapter`, `RunOptions.add_active_adapter`) switches
      tasks per run without a re-export (`OnnxRunner.predict(images, tasks=[...])` does it for you).

    Args:
        model: The multi-task model (left unchanged; exported in eval mode).
        path: Output `.onnx` file; the sidecar is written next to it (`sidecar_path`).
        tasks: Tasks to include (default: all), in output order.
        image_size: (H, W) or a side; default: the backbone's input size.
        dynamic_batch: Symbolic batch dimension; else the graph is fixed to batch 1.
        opset: ONNX opset (default: the exporter's; at least 18).
        fp16: Export half-precision weights and activations (inputs and float outputs stay float32 at the graph
            boundary); parity is then checked with a looser tolerance.
        merge: See above.
        mean, std: Input normalisation recorded in the sidecar (default: the timm backbone's pretrained config).
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
    names = list(model.tasks) if tasks is None else list(dict.fromkeys(tasks))
    if not names:
        raise ValueError(f"tasks must name at least one task; the model has {model.tasks}")
    for name in names:
        model.task(name)  # raises with the known tasks
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
    adapters = merge and len(names) > 1
    if adapters and quantize:
        raise ValueError("quantize='int8' is not supported for LoRA adapter graphs (their weights must stay fp32)")
    if adapters:
        if fp16:
            raise ValueError("fp16 adapter graphs are not supported: export LoRA adapter files in fp32")
        _check_adapter_tasks(model, names)

    was_training = model.training
    model.eval()
    try:
        if adapters:
            graph = MultiTaskGraph(model, names[:1], image_size, output_prefixes=["task"])
        else:
            graph = MultiTaskGraph(model, names, image_size, merged=merge)
        start = time.perf_counter()
        onnx_model = _export(graph, image_size, dynamic_batch, opset, fp16, optimize and not adapters)
        overridable = _make_overridable(onnx_model, f"model.task_modules.{names[0]}.") if adapters else {}
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecar = _sidecar(model, graph, names, image_size, dynamic_batch, fp16, merge, mean, std, seconds)
        if quantize:
            sidecar["precision"] = "int8"
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            staged = Path(tmp) / path.name
            _save_onnx(onnx_model, staged)
            files = {staged: path}
            weights = Path(tmp) / (path.name + ".data")  # large graphs keep their weights beside them
            if weights.exists():
                files[weights] = path.parent / weights.name
            if adapters:
                sidecar["adapters"] = {}
                for name in names:
                    adapter = Path(tmp) / f"{path.stem}.{name}.onnx_adapter"
                    _write_adapter(model, name, names[0], overridable, adapter)
                    sidecar["adapters"][name] = adapter.name
                    files[adapter] = path.parent / adapter.name
            sidecar_file = Path(tmp) / sidecar_path(path).name
            sidecar_file.write_text(json.dumps(sidecar, indent=2))
            files[sidecar_file] = sidecar_path(path)
            if check:
                onnx.checker.check_model(str(staged), full_check=True)
                _parity(graph, staged, atol if not fp16 else max(atol, 5e-2), dynamic_batch)
                if adapters:
                    _check_adapters(model, names, staged, sidecar, Path(tmp), image_size, atol)
            if quantize:
                _quantize_int8(staged)
                sidecar["quantization"] = {"method": "dynamic-int8", "ops": ["MatMul"]}
                if check:
                    onnx.checker.check_model(str(staged), full_check=True)
                    sidecar["quantization"]["drift"] = _int8_drift(graph, staged, dynamic_batch)
                sidecar_file.write_text(json.dumps(sidecar, indent=2))
            for src, dst in files.items():
                os.replace(src, dst)
    finally:
        model.train(was_training)
    return path


def _export(
    graph: MultiTaskGraph,
    image_size: tuple[int, int],
    dynamic_batch: bool,
    opset: int | None,
    fp16: bool,
    optimize: bool,
) -> Any:
    example = torch.zeros(2 if dynamic_batch else 1, 3, *image_size, device=_device(graph.model))
    module: nn.Module = graph if not fp16 else _Fp16Wrapper(graph)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            input_names=["images"],
            output_names=graph.output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            optimize=optimize,
            verbose=False,
            custom_translation_table=_onnx_translations(graph),
        )
    return program.model_proto


def _onnx_translations(graph: MultiTaskGraph) -> dict[Any, Any]:
    """ONNX forms (onnxscript functions) of the custom ops the graph's heads use (`Head.onnx_translations`)."""
    table = {}
    for name in graph.task_names:
        table.update(graph.model.task(name).head.onnx_translations())
    return table


def _save_onnx(onnx_model: Any, path: Path) -> None:
    import onnx

    large = onnx_model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: weights go to a side file
    onnx.save_model(onnx_model, str(path), save_as_external_data=large, location=path.name + ".data")


def _check_adapter_tasks(model: nn.Module, names: list[str]) -> None:
    """Tasks that share one adapter graph: LoRA only, same LoRA options, same head config."""
    first = model.task(names[0])
    for name in names:
        task = model.task(name)
        methods = [c.method for c in task.peft_configs]
        if methods != ["lora"]:
            raise ValueError(
                f"merge=True with several tasks exports LoRA adapter files; task {name!r} uses {methods} "
                "(export it alone with merge=True, or in the multi-task graph)"
            )
        lora, ref = task.peft_configs[0].to_dict(), first.peft_configs[0].to_dict()
        if lora != ref or task.head_config.to_dict() != first.head_config.to_dict():
            raise ValueError(
                f"task {name!r} differs from {names[0]!r} in its LoRA options or head config; adapter files need "
                f"one graph shape (LoRA {lora} vs {ref})"
            )


def _make_overridable(onnx_model: Any, prefix: str) -> dict[str, str]:
    """List the initializers under `prefix` (the first task's parameters) as graph inputs, so that ONNX Runtime
    adapters can replace them per run. Returns {initializer name: parameter name relative to the task}."""
    from onnx import helper

    names = {}
    for init in onnx_model.graph.initializer:
        if init.name.startswith(prefix):
            names[init.name] = init.name[len(prefix) :]
            onnx_model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    if not names:
        raise RuntimeError(f"no initializer named {prefix}*: the exporter renamed the task parameters")
    return names


def _write_adapter(model: nn.Module, task: str, first: str, overridable: dict[str, str], path: Path) -> None:
    """`task`'s tensors under the first task's initializer names, as an `.onnx_adapter` file."""
    import onnxruntime as ort

    params = dict(model.task(task).named_parameters())
    params.update(dict(model.task(task).named_buffers()))
    values = {}
    for init_name, rel in overridable.items():
        if rel not in params:
            raise RuntimeError(f"task {task!r} has no parameter {rel!r} (needed for the adapter of {init_name})")
        array = params[rel].detach().float().cpu().numpy()
        values[init_name] = ort.OrtValue.ortvalue_from_numpy(array)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(values)
    fmt.export_adapter(str(path))


def _check_adapters(
    model: nn.Module,
    names: list[str],
    graph_path: Path,
    sidecar: dict[str, Any],
    folder: Path,
    image_size: tuple[int, int],
    atol: float,
) -> None:
    """Each task's adapter file makes the graph compute that task (against the PyTorch model)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    images = _example_images(1, image_size)
    outputs = [o.name for o in session.get_outputs()]
    for name in names:
        adapter = ort.LoraAdapter()
        adapter.Load(str(folder / sidecar["adapters"][name]))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        got = session.run(outputs, {"images": images.numpy()}, options)
        with torch.no_grad():
            expected = MultiTaskGraph(model, [name], image_size, output_prefixes=["task"])(images)
        _compare(outputs, got, expected, atol, f"adapter of task {name!r}")


INT8_BOUNDS = {"float": 0.25, "mask": 0.95}
"""Largest int8 drift accepted at export: float outputs other than detections (logits) within 25 % of their scale,
segmentation masks >= 95 % equal pixels. Detection outputs are recorded (fraction of equal counts and labels), not
bounded: a small score change moves a box across the score threshold or through NMS."""


def _quantize_int8(path: Path) -> None:
    """Dynamic int8 quantisation of the weight matmuls of the graph at `path`, in place."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = path.with_name(path.stem + ".fp32.onnx")
    model = onnx.load(str(path))
    # the quantiser re-infers shapes; the exporter's annotations make its inference fail on some graphs
    del model.graph.value_info[:]
    _save_onnx(model, fp32)
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


def _int8_drift(graph: MultiTaskGraph, path: Path, dynamic_batch: bool) -> dict[str, float]:
    """Drift of the int8 graph from PyTorch (fp32) per output on the example images; raises past `INT8_BOUNDS`.

    Floats: max |int8 - fp32| over max(1, max |fp32|); masks and integer outputs: fraction of equal entries.
    Detection boxes and scores are left out (the kept set may differ; counts and labels show it).
    """
    drift: dict[str, float] = {}
    for _, got, expected in _example_runs(graph, path, dynamic_batch):
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


def _example_images(n: int, image_size: tuple[int, int]) -> torch.Tensor:
    return torch.randn(n, 3, *image_size, generator=torch.Generator().manual_seed(n))


class _Fp16Wrapper(nn.Module):
    """Half-precision copy of the graph with float32 inputs and float outputs at the boundary."""

    def __init__(self, graph: MultiTaskGraph) -> None:
        super().__init__()
        import copy

        self.inner = copy.deepcopy(graph).half()  # (not `graph`: that name is taken in the traced module)
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.inner(images.half())
        return tuple(o.float() if o.is_floating_point() else o for o in outs)


def _sidecar(
    model: nn.Module,
    graph: MultiTaskGraph,
    names: list[str],
    image_size: tuple[int, int],
    dynamic_batch: bool,
    fp16: bool,
    merge: bool,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    seconds: float,
) -> dict[str, Any]:
    cfg = getattr(model.backbone.model, "pretrained_cfg", {}) or {}
    prefixes = graph.output_prefixes if len(graph.output_prefixes) == len(names) else graph.output_prefixes * len(names)
    tasks = {}
    for name, prefix in zip(names, prefixes, strict=True):
        fields = [o.split(".", 1)[1] for o in graph.output_names if o.split(".", 1)[0] == prefix]
        tasks[name] = {
            "head": model.task(name).head_config.head_type,
            "output": model.task(name).head_config.output_kind,
            "head_config": model.task(name).head_config.to_dict(),
            "outputs": {field: f"{prefix}.{field}" for field in fields},
            "peft": [c.to_dict() for c in model.task(name).peft_configs],
        }
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "backbone": model.backbone.arch,
        "form": "adapters" if merge and len(names) > 1 else "merged" if merge else "multitask",
        "input": {
            "name": "images",
            "layout": "NCHW",
            "size": list(image_size),
            "dynamic_batch": dynamic_batch,
            "mean": list(mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406))),
            "std": list(std if std is not None else cfg.get("std", (0.229, 0.224, 0.225))),
            "dtype": "float32",
        },
        "precision": "fp16" if fp16 else "fp32",
        "tasks": tasks,
        "export_seconds": round(seconds, 2),
    }


def _example_runs(
    graph: MultiTaskGraph, path: Path, dynamic_batch: bool
) -> Iterator[tuple[int, list[Any], tuple[torch.Tensor, ...]]]:
    """(batch size, ORT outputs, PyTorch outputs) on random example images: batches of 1 and 3 when the batch
    is dynamic, else 1."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3) if dynamic_batch else (1,):
        images = _example_images(n, graph.image_size)
        got = session.run(graph.output_names, {"images": images.numpy()})
        with torch.no_grad():
            expected = graph(images.to(_device(graph.model)))
        yield n, got, expected


def _parity(graph: MultiTaskGraph, path: Path, atol: float, dynamic_batch: bool) -> None:
    """ORT vs PyTorch on the example images."""
    for n, got, expected in _example_runs(graph, path, dynamic_batch):
        _compare(graph.output_names, got, expected, atol, f"batch {n}")


def _compare(
    names: Sequence[str], got: Sequence[Any], expected: Sequence[torch.Tensor], atol: float, what: str
) -> None:
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

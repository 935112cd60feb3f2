"""LoRA adapter graphs: one graph whose adapter factors and head weights are overridable initializers, plus one
`.onnx_adapter` file per task that ONNX Runtime's multi-LoRA API (`LoraAdapter`, `RunOptions.add_active_adapter`)
activates per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..peft import METHODS
from .checks import compare, example_images
from .graph import MultiTaskGraph


def check_adapter_tasks(model: nn.Module, names: list[str]) -> None:
    """Tasks that share one adapter graph: LoRA only, same LoRA options, same head config."""
    first = model.task(names[0])
    for name in names:
        task = model.task(name)
        methods = [c.method for c in task.peft_configs]
        if len(task.peft_configs) != 1 or not task.peft_configs[0].adapter_files:
            supported = [m for m in METHODS if METHODS.get(m).adapter_files]
            raise ValueError(
                f"merge=True with several tasks exports adapter files ({', '.join(supported)}, one method per task); "
                f"task {name!r} uses {methods} (export it alone with merge=True, or in the multi-task graph)"
            )
        lora, ref = task.peft_configs[0].to_dict(), first.peft_configs[0].to_dict()
        if lora != ref or task.head_config.to_dict() != first.head_config.to_dict():
            raise ValueError(
                f"task {name!r} differs from {names[0]!r} in its LoRA options or head config; adapter files need "
                f"one graph shape (LoRA {lora} vs {ref})"
            )


def make_overridable(onnx_model: Any, prefix: str) -> dict[str, str]:
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


def write_adapter(model: nn.Module, task: str, first: str, overridable: dict[str, str], path: Path) -> None:
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


def check_adapters(
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
    images = example_images(1, image_size)
    outputs = [o.name for o in session.get_outputs()]
    for name in names:
        adapter = ort.LoraAdapter()
        adapter.Load(str(folder / sidecar["adapters"][name]))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        got = session.run(outputs, {"images": images.numpy()}, options)
        with torch.no_grad():
            expected = MultiTaskGraph(model, [name], image_size, output_prefixes=["task"])(images)
        compare(outputs, got, expected, atol, f"adapter of task {name!r}")

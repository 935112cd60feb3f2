"""Backends: what runs a batch. `run(images, tasks)` is called on the engine's worker thread only.

- `TorchBackend`: a `MultiTaskModel` (CPU or CUDA; the kernels dispatch on the device) with an `AdapterStore`;
  each image runs only the tasks it asked for, images asking for several tasks share their backbone prefix.
- `OnnxBackend`: an exported multi-task graph on ONNX Runtime (`OnnxRunner`); the graph computes every task it
  holds for every image, the engine keeps the requested ones. Its tasks are fixed (re-export to change them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .images import Preprocess
from .store import AdapterStore


class TorchBackend:
    """A `MultiTaskModel` and the store of its tasks.

    Args:
        model: The model; moved to `device` and put in eval mode.
        store: The adapter store managing `model`'s tasks.
        preprocess: Input size and normalisation of the served model.
        device: "cpu", "cuda", ... (default: CUDA if available).
    """

    name = "torch"

    def __init__(self, model: Any, store: AdapterStore, preprocess: Preprocess, device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.store = store
        self.preprocess = preprocess

    def run(self, images: torch.Tensor, tasks: list[list[str]]) -> list[dict[str, dict[str, Any]]]:
        with torch.inference_mode():
            results = self.model.predict_each(images.to(self.device, non_blocking=True), tasks)
        return [{t: _to_cpu(r) for t, r in per_image.items()} for per_image in results]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": str(self.device), "backbone": self.model.backbone.arch}


class OnnxBackend:
    """An exported multi-task graph (`mtp.export_onnx`) on ONNX Runtime.

    Args:
        path: The `.onnx` file (its sidecar next to it).
        providers: ONNX Runtime providers (default: CUDA if available, then CPU).
        session_options: Optional `onnxruntime.SessionOptions`.
    """

    name = "onnx"

    def __init__(self, path: str | Path, providers: list[str] | None = None, session_options: Any = None) -> None:
        from multitask_peft.onnx_runner import OnnxRunner, output_kind

        self.runner = OnnxRunner(path, providers, session_options)
        if self.runner.meta.get("adapters"):
            raise ValueError(f"{path} is an adapter graph (one task per run); serve a multi-task export instead")
        inp = self.runner.meta["input"]
        self.preprocess = Preprocess(tuple(inp["size"]), tuple(inp["mean"]), tuple(inp["std"]))
        self.tasks = {
            name: (output_kind(spec), spec["head_config"].get("class_names"))
            for name, spec in self.runner.meta["tasks"].items()
        }

    def run(self, images: torch.Tensor, tasks: list[list[str]]) -> list[dict[str, dict[str, Any]]]:
        raw = self.runner.run(images)
        wanted = dict.fromkeys(t for names in tasks for t in names)
        decoded = {name: self.runner.decode(name, raw) for name in wanted}
        return [{t: decoded[t][i] for t in names} for i, names in enumerate(tasks)]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "providers": self.runner.session.get_providers(), "graph": str(self.runner.path)}


def _to_cpu(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in result.items()}

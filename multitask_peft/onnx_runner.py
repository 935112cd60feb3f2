"""Run an exported multi-task graph with ONNX Runtime; results in the structure of `MultiTaskModel.predict` (decoded
by the same output kinds, `multitask_peft.outputs`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .export.metadata import sidecar_from_metadata
from .export.sidecar import SIDECAR_FORMAT, SIDECAR_VERSION, sidecar_path
from .outputs import OUTPUT_KINDS, Result


def sidecar_kind(spec: dict[str, Any]) -> str:
    """The output kind of a sidecar task entry (`HeadConfig.output_kind`; older sidecars: the head type)."""
    return spec.get("output", spec["head"])


def default_providers() -> list[str]:
    """CUDA when onnxruntime-gpu offers it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRunner:
    """An exported multi-task graph (`export_onnx`) on ONNX Runtime.

    Args:
        path: The `.onnx` file. Its description comes from its sidecar (`<name>.json`) when one sits next to it, else
            from the graph's own `metadata_props` (`mtpeft.*`; graphs exported before those need the sidecar).
        providers: ONNX Runtime execution providers (default: CUDA if available, then CPU).
        session_options: Optional `onnxruntime.SessionOptions` (threads, graph optimisation level, ...).

    Example:
        runner = mtp.OnnxRunner("out/model.onnx")
        out = runner.predict(images, tasks=["cls", "masks"])   # same structure as model.predict
    """

    def __init__(
        self, path: str | os.PathLike, providers: Sequence[str] | None = None, session_options: Any = None
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        meta_path = sidecar_path(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX graph at {self.path}")
        self.providers = list(providers) if providers is not None else default_providers()
        self.session = ort.InferenceSession(str(self.path), session_options, providers=self.providers)
        if meta_path.is_file():
            self.meta = json.loads(meta_path.read_text())
        else:  # the graph alone: its metadata_props hold the sidecar
            meta = sidecar_from_metadata(self.session.get_modelmeta().custom_metadata_map)
            if meta is None:
                raise FileNotFoundError(
                    f"no sidecar {meta_path} next to {self.path} and no mtpeft.* metadata_props in it; export with "
                    "mtp.export_onnx"
                )
            self.meta, meta_path = meta, self.path
        if self.meta.get("format") != SIDECAR_FORMAT or self.meta.get("version") != SIDECAR_VERSION:
            raise ValueError(
                f"{meta_path} is not a {SIDECAR_FORMAT} v{SIDECAR_VERSION} sidecar "
                f"(format={self.meta.get('format')!r}, version={self.meta.get('version')!r})"
            )
        self.input_name = self.meta["input"]["name"]
        self.image_size = tuple(self.meta["input"]["size"])
        self.dynamic_batch = bool(self.meta["input"]["dynamic_batch"])
        self._adapters: dict[str, Any] = {}  # task -> loaded ort.LoraAdapter (adapter graphs)

    @property
    def tasks(self) -> list[str]:
        return list(self.meta["tasks"])

    def _run_options(self, task: str | None) -> Any:
        """RunOptions activating `task`'s `.onnx_adapter` (adapter graphs), else None."""
        adapters = self.meta.get("adapters")
        if not adapters:
            return None
        if task is None:
            raise ValueError(f"{self.path} switches tasks with adapter files: name one of {self.tasks}")
        import onnxruntime as ort

        if task not in self._adapters:
            adapter = ort.LoraAdapter()
            adapter.Load(str(self.path.parent / adapters[task]))
            self._adapters[task] = adapter
        options = ort.RunOptions()
        options.add_active_adapter(self._adapters[task])
        return options

    def run(self, images: torch.Tensor | np.ndarray, task: str | None = None) -> dict[str, np.ndarray]:
        """Raw graph outputs {output name: array} for normalised images (N, 3, H, W). `task` picks the adapter file
        to activate in an adapter graph (`export_onnx(..., merge=True)` with several LoRA tasks)."""
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        array = np.ascontiguousarray(array, dtype=np.float32)
        expected = (3, *self.image_size)
        if array.ndim != 4 or array.shape[1:] != expected:
            raise ValueError(f"images must have shape (N, {', '.join(map(str, expected))}), got {array.shape}")
        names = [o.name for o in self.session.get_outputs()]
        options = self._run_options(task)
        if self.dynamic_batch or array.shape[0] == 1:
            return dict(zip(names, self.session.run(names, {self.input_name: array}, options), strict=True))
        parts = [self.session.run(names, {self.input_name: array[i : i + 1]}, options) for i in range(len(array))]
        return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}

    def predict(self, images: torch.Tensor | np.ndarray, tasks: Sequence[str] | str | None = None) -> dict[str, list]:
        """Per task, one result dict per image, as `MultiTaskModel.predict` returns them."""
        names = self.tasks if tasks is None else [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))
        unknown = [t for t in names if t not in self.meta["tasks"]]
        if unknown or not names:
            raise ValueError(f"tasks {unknown or names} not in the graph; it serves {self.tasks}")
        shared = None if self.meta.get("adapters") else self.run(images)  # one run serves every task
        out = {}
        for name in names:
            out[name] = self.decode(name, shared if shared is not None else self.run(images, task=name))
        return out

    def decode(self, task: str, raw: Mapping[str, np.ndarray]) -> list[Result]:
        """One task's per-image result dicts from raw graph outputs (`run`), decoded by the task's output kind
        (the sidecar's "output", looked up in `OUTPUT_KINDS`)."""
        spec = self.meta["tasks"][task]
        tensors = {field: torch.from_numpy(raw[output]) for field, output in spec["outputs"].items()}
        return OUTPUT_KINDS.get(sidecar_kind(spec)).decode(tensors)

"""The JSON sidecar of an exported graph: what it holds (tasks, their heads, classes and outputs, PEFT recipes;
ensembles with their members and mode; preprocessing) and where it lives (`<graph>.json`). `OnnxRunner` reads it.
The graph carries the same information in its `metadata_props` (`metadata`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .graph import MultiTaskGraph

SIDECAR_FORMAT = "multitask-peft-onnx"
SIDECAR_VERSION = 1

#: How an image becomes a row of the graph's input, besides its size and mean / std: the evaluation transform of the
#: datasets (`tasks.data.transforms.eval_transforms`) and the server's decoder (`serving.images.Preprocess`). RGB,
#: the whole image resized to `size` (bilinear, antialiased; aspect ratio not kept, no crop), scaled to [0, 1]
#: (uint8 / 255), then (x - mean) / std per channel.
PREPROCESSING = {
    "color": "RGB",
    "resize": "bilinear",
    "antialias": True,
    "keep_aspect_ratio": False,
    "crop": None,
    "pixel_range": [0, 1],
}


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the JSON sidecar of an exported graph lives: the graph's path with the suffix `.json`."""
    return Path(path).with_suffix(".json")


def build_sidecar(
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
    prefixes = graph.output_prefixes if len(graph.output_prefixes) == len(names) else graph.output_prefixes * len(names)
    tasks = {}
    for name, prefix in zip(names, prefixes, strict=True):
        fields = [o.split(".", 1)[1] for o in graph.output_names if o.split(".", 1)[0] == prefix]
        head = model.head_config(name)  # an ensemble's: its label space
        tasks[name] = {
            "head": head.head_type,
            "output": head.output_kind,
            "head_config": head.to_dict(),
            "outputs": {field: f"{prefix}.{field}" for field in fields},
        }
        if name in graph.ensembles:  # computed in the graph from its members' outputs; no PEFT of its own
            ens = graph.ensembles[name]
            tasks[name]["ensemble"] = {"members": list(ens.members), "mode": ens.mode}
        else:
            tasks[name]["peft"] = [c.to_dict() for c in model.task(name).peft_configs]
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
            "mean": list(mean if mean is not None else model.data_config.mean),
            "std": list(std if std is not None else model.data_config.std),
            "dtype": "float32",
            **PREPROCESSING,
        },
        "precision": "fp16" if fp16 else "fp32",
        "tasks": tasks,
        "export_seconds": round(seconds, 2),
    }

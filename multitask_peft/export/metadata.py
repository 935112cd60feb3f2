"""The graph describes itself: the sidecar's information as ONNX `metadata_props`, so that a plain ONNX Runtime user
(`InferenceSession(path).get_modelmeta().custom_metadata_map`) needs nothing but the `.onnx` file.

Every key starts with `mtpeft.`; values are strings: names as they are, everything else JSON.

- The sidecar, one key per top-level entry: `mtpeft.format`, `mtpeft.version`, `mtpeft.backbone`, `mtpeft.form`,
  `mtpeft.precision`, `mtpeft.preprocessing` (the sidecar's `input`), `mtpeft.tasks`, `mtpeft.export_seconds`, and
  where the sidecar has them `mtpeft.adapters` and `mtpeft.quantization`. `sidecar_from_metadata` rebuilds the
  sidecar from them exactly.
- Three keys derived from it, for readers that want one thing: `mtpeft.outputs` (the output layout: per graph output,
  in graph order, its task, field, output kind, dtype, shape and what it holds), `mtpeft.class_names` (task -> class
  names or null) and `mtpeft.ensembles` (ensemble -> members and mode).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

METADATA_PREFIX = "mtpeft."
#: Sidecar entries stored under another name.
RENAMED = {"input": "preprocessing"}
#: Sidecar entries whose (string) values are stored as they are; every other entry is stored as JSON.
STRING_ENTRIES = frozenset({"format", "backbone", "form", "precision"})
#: Keys derived from the sidecar (not sidecar entries).
DERIVED = ("outputs", "class_names", "ensembles")

#: What each field of an output kind holds (`mtpeft.outputs`); N is the batch.
FIELD_MEANINGS = {
    "classification.logits": "class scores before softmax, (N, C)",
    "detection.boxes": "boxes x1, y1, x2, y2 in input pixels, best first; rows past num_detections are padding",
    "detection.scores": "detection scores, best first; padded like boxes",
    "detection.labels": "class ids of the detections; -1 where padded",
    "detection.num_detections": "number of valid detections per image",
    "segmentation.mask": "class id per input pixel, (N, H, W)",
    "embedding.embedding": "pooled backbone features, (N, D)",
}


def metadata_props(sidecar: Mapping[str, Any], graph_outputs: Mapping[str, tuple[str, list[int | str]]]) -> dict:
    """The `metadata_props` of a graph described by `sidecar`.

    Args:
        sidecar: The sidecar (`build_sidecar`, as written next to the graph).
        graph_outputs: Output name -> (dtype name, shape with symbolic dims as names), in graph order.

    Returns:
        {key: string value}.
    """
    clash = [k for k in sidecar if RENAMED.get(k, k) in DERIVED or k in RENAMED.values()]
    if clash:
        raise ValueError(f"sidecar entries {clash} clash with metadata keys of other entries: rename them")
    props = {}
    for key, value in sidecar.items():
        as_string = key in STRING_ENTRIES and isinstance(value, str)
        props[METADATA_PREFIX + RENAMED.get(key, key)] = value if as_string else json.dumps(value)
    tasks = sidecar["tasks"]
    owners = {output: (task, field) for task, spec in tasks.items() for field, output in spec["outputs"].items()}
    layout = []
    for name, (dtype, shape) in graph_outputs.items():
        task, field = owners.get(name, (None, None))
        kind = tasks[task].get("output", tasks[task]["head"]) if task is not None else None
        entry = {"name": name, "task": task, "field": field, "kind": kind, "dtype": dtype, "shape": shape}
        layout.append({**entry, "holds": FIELD_MEANINGS.get(f"{kind}.{field}")})
    props[METADATA_PREFIX + "outputs"] = json.dumps(layout)
    names = {task: spec["head_config"].get("class_names") for task, spec in tasks.items()}
    props[METADATA_PREFIX + "class_names"] = json.dumps(names)
    ensembles = {task: spec["ensemble"] for task, spec in tasks.items() if "ensemble" in spec}
    props[METADATA_PREFIX + "ensembles"] = json.dumps(ensembles)
    return props


def sidecar_from_metadata(props: Mapping[str, str]) -> dict[str, Any] | None:
    """The sidecar a graph's `metadata_props` hold (the inverse of `metadata_props`), or None when the graph has
    none (exported by an older version, or by another tool)."""
    if METADATA_PREFIX + "format" not in props:
        return None
    back = {v: k for k, v in RENAMED.items()}
    sidecar = {}
    for key, value in props.items():
        if not key.startswith(METADATA_PREFIX) or key[len(METADATA_PREFIX) :] in DERIVED:
            continue
        entry = back.get(key[len(METADATA_PREFIX) :], key[len(METADATA_PREFIX) :])
        sidecar[entry] = value if entry in STRING_ENTRIES else json.loads(value)
    return sidecar


def graph_outputs(onnx_model: Any) -> dict[str, tuple[str, list[int | str]]]:
    """Output name -> (dtype name, shape) of an ONNX model proto; symbolic dims by name, unknown ones as "?"."""
    import onnx

    outputs = {}
    for value in onnx_model.graph.output:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
        outputs[value.name] = (dtype, shape)
    return outputs


def write_metadata(path: str | os.PathLike, sidecar: Mapping[str, Any]) -> None:
    """Set the `mtpeft.*` `metadata_props` of the graph at `path` from `sidecar` (other keys are kept; external
    weights are left where they are)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = metadata_props(sidecar, graph_outputs(model))
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        model.metadata_props.add(key=key, value=value)
    onnx.save_model(model, str(path))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `metadata_props` of the graph at `path` ({key: value}; its weights are not read)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}

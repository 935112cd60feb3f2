"""A Triton Inference Server model repository for an exported graph, served by Triton's ONNX Runtime backend.

```
REPO/<model>/config.pbtxt          backend "onnxruntime"; inputs and outputs as the graph declares them
REPO/<model>/<task>_labels.txt     one class name a line, per classification output (`label_filename`)
REPO/<model>/1/model.onnx          the graph (with its `mtpeft.*` metadata_props), external weights beside it
```

Batching: when every input and output of the graph has the same symbolic first dimension (`export_onnx`'s default,
`dynamic_batch=True`), the config has `max_batch_size` > 0, `dynamic_batching {}` and dims without that first
dimension (a tensor of shape (batch,), such as `<task>.num_detections`, becomes `dims: [ 1 ]` with
`reshape { shape: [ ] }`). Otherwise (`dynamic_batch=False`) `max_batch_size` is 0 and the dims are the graph's full
shapes. The model's `parameters` repeat the graph's `metadata_props` (preprocessing, tasks, class names, output
layout), so a Triton client reads them from the model config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metadata import METADATA_PREFIX, graph_outputs, metadata_props, sidecar_from_metadata
from .sidecar import SIDECAR_FORMAT, SIDECAR_VERSION, sidecar_path

#: Triton's data types of the ONNX tensor element types (`onnx.TensorProto.DataType` names).
TRITON_DATATYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FLOAT16": "TYPE_FP16",
    "FLOAT": "TYPE_FP32",
    "DOUBLE": "TYPE_FP64",
    "BFLOAT16": "TYPE_BF16",
    "STRING": "TYPE_STRING",
}
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MODEL_VERSION = "1"


@dataclass(frozen=True)
class GraphTensor:
    """An input or output of an ONNX graph as Triton sees it.

    Attributes:
        name: The tensor's name in the graph.
        datatype: Triton's data type ("TYPE_FP32", ...).
        shape: The graph's dims: an int where fixed, a name where symbolic ("batch"), None where unknown.
    """

    name: str
    datatype: str
    shape: tuple[int | str | None, ...]

    def dims(self, batched: bool) -> list[int]:
        """Triton's `dims`: -1 where not fixed; without the first (batch) dimension when `batched`."""
        return [d if isinstance(d, int) else -1 for d in self.shape[1 if batched else 0 :]]


def graph_tensors(onnx_model: Any) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """The (inputs, outputs) of an ONNX model proto; initializers listed as inputs are left out."""
    import onnx

    def tensor(value: Any) -> GraphTensor:
        kind = value.type.tensor_type
        type_name = onnx.TensorProto.DataType.Name(kind.elem_type)
        if type_name not in TRITON_DATATYPES:
            raise ValueError(f"graph tensor {value.name!r} has type {type_name}, which Triton has no data type for")
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
            for d in kind.shape.dim
        )
        return GraphTensor(value.name, TRITON_DATATYPES[type_name], shape)

    weights = {t.name for t in onnx_model.graph.initializer}
    inputs = [tensor(v) for v in onnx_model.graph.input if v.name not in weights]
    return inputs, [tensor(v) for v in onnx_model.graph.output]


def batch_major(tensors: Sequence[GraphTensor]) -> bool:
    """Whether every tensor's first dimension is one and the same symbolic (dynamic) dimension: the batch Triton
    may form (its ONNX Runtime backend needs a dynamic first dimension on every input and output to batch)."""
    firsts = {t.shape[0] if t.shape else 0 for t in tensors}
    return len(firsts) == 1 and isinstance(next(iter(firsts)), str)


def pbtxt_string(value: str) -> str:
    """`value` as a protobuf text-format string literal (C escapes; bytes outside printable ASCII in octal)."""
    escapes = {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", ord('"'): '\\"', ord("'"): "\\'"}
    escapes[ord("\\")] = "\\\\"
    out = []
    for byte in value.encode("utf-8"):
        out.append(escapes.get(byte) or (chr(byte) if 0x20 <= byte < 0x7F else f"\\{byte:03o}"))
    return '"' + "".join(out) + '"'


def model_config(
    name: str,
    inputs: Sequence[GraphTensor],
    outputs: Sequence[GraphTensor],
    max_batch_size: int,
    labels: Mapping[str, str] | None = None,
    parameters: Mapping[str, str] | None = None,
) -> str:
    """A `config.pbtxt` (Triton's `ModelConfig` in protobuf text format) for the ONNX Runtime backend.

    Args:
        name: The model's name (its folder in the repository).
        inputs, outputs: The graph's tensors (`graph_tensors`).
        max_batch_size: 0: no batching by Triton, dims are the full shapes; > 0: the first dimension of every
            tensor is the batch (`batch_major`), left out of the dims, and requests are batched dynamically.
        labels: Output name -> labels file (relative to the model folder), for classification outputs.
        parameters: Free-form model parameters {key: string value}.
    """
    batched = max_batch_size > 0
    lines = [f"name: {pbtxt_string(name)}", 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size}"]
    if batched:
        lines.append("dynamic_batching {}")
    for section, tensors in (("input", inputs), ("output", outputs)):
        lines.append(f"{section} [")
        for k, tensor in enumerate(tensors):
            dims = tensor.dims(batched)
            fields = [f"name: {pbtxt_string(tensor.name)}", f"data_type: {tensor.datatype}"]
            fields.append(f"dims: [ {', '.join(map(str, dims or [1]))} ]")
            if not dims:  # only the batch dimension: Triton needs non-empty dims, the graph a 1-D tensor
                fields.append("reshape { shape: [ ] }")
            if tensor.name in (labels or {}):
                fields.append(f"label_filename: {pbtxt_string(labels[tensor.name])}")
            body = "\n".join(f"    {f}" for f in fields)
            lines.append(f"  {{\n{body}\n  }}{',' if k < len(tensors) - 1 else ''}")
        lines.append("]")
    for key, value in (parameters or {}).items():
        value_field = f"value {{ string_value: {pbtxt_string(value)} }}"
        lines.append(f"parameters {{\n  key: {pbtxt_string(key)}\n  {value_field}\n}}")
    return "\n".join(lines) + "\n"


def write_triton_repo(
    onnx_path: str | os.PathLike,
    repo_dir: str | os.PathLike,
    model_name: str | None = None,
    max_batch_size: int = 32,
    force: bool = False,
) -> Path:
    """Write an exported graph (`export_onnx`) into a Triton Inference Server model repository.

    Writes `repo_dir/<model_name>/config.pbtxt`, `<model_name>/1/model.onnx` (a copy of the graph, with its external
    weights file if it has one) and `<model_name>/<task>_labels.txt` per classification output whose task has class
    names. Other models in `repo_dir` are left alone; the model folder is written beside its place and renamed into
    it, so a polling server never sees half of it.

    Args:
        onnx_path: The exported graph; its description comes from its `metadata_props`, else from its sidecar.
        repo_dir: The model repository (created if missing): what `tritonserver --model-repository` takes.
        model_name: The model's folder and name (default: the graph's file name without `.onnx`).
        max_batch_size: Most images Triton batches into one run when the graph's batch is dynamic; 0 turns Triton's
            batching off. A graph with a fixed batch always gets 0 (full shapes).
        force: Replace an existing, non-empty `repo_dir/<model_name>`.

    Returns:
        The model folder.

    Raises:
        ValueError: A bad model name or batch size, an existing model folder without `force`, a graph that is not
            an export of this project, or an adapter graph (Triton cannot switch its `.onnx_adapter` files).
        FileNotFoundError: No graph at `onnx_path`.
    """
    import onnx

    onnx_path, repo_dir = Path(onnx_path), Path(repo_dir)
    model_name = onnx_path.stem if model_name is None else model_name
    model_dir = check_repo_target(repo_dir, model_name, max_batch_size, force)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {onnx_path}; export one with mtp.export_onnx / mtpeft export")
    graph = onnx.load(str(onnx_path), load_external_data=False)
    sidecar = _description(graph, onnx_path)
    if sidecar.get("adapters"):
        raise ValueError(
            f"{onnx_path} is an adapter graph (tasks {list(sidecar['adapters'])} switched by .onnx_adapter files), "
            "which Triton's ONNX Runtime backend cannot activate: export the tasks as one multi-task graph "
            "(without --merge), or one task merged"
        )
    inputs, outputs = graph_tensors(graph)
    if not batch_major([*inputs, *outputs]):
        max_batch_size = 0
    props = {p.key: p.value for p in graph.metadata_props}
    if not any(key.startswith(METADATA_PREFIX) for key in props):  # exported before metadata_props: add them
        props.update(metadata_props(sidecar, graph_outputs(graph)))
    labels = _labels(sidecar)
    config = model_config(
        model_name,
        inputs,
        outputs,
        max_batch_size,
        {output: f"{task}_labels.txt" for task, (output, _) in labels.items()},
        {k: v for k, v in props.items() if k.startswith(METADATA_PREFIX)},
    )
    repo_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=repo_dir, prefix=f".{model_name}."))
    try:
        version = staging / MODEL_VERSION
        version.mkdir()
        _copy_graph(graph, props, onnx_path, version)
        for task, (_, names) in labels.items():
            (staging / f"{task}_labels.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        (staging / "config.pbtxt").write_text(config)
        _move_into_place(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def _move_into_place(staging: Path, model_dir: Path) -> None:
    """Rename `staging` to `model_dir`; an existing `model_dir` is moved aside first and deleted after (restored if
    the rename fails)."""
    if not model_dir.exists():
        os.replace(staging, model_dir)
        return
    aside = Path(tempfile.mkdtemp(dir=model_dir.parent, prefix=f".{model_dir.name}.old."))
    os.replace(model_dir, aside / model_dir.name)
    try:
        os.replace(staging, model_dir)
    except OSError:
        os.replace(aside / model_dir.name, model_dir)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def check_repo_target(repo_dir: Path, model_name: str, max_batch_size: int, force: bool) -> Path:
    """Check the arguments of `write_triton_repo` that do not need the graph; returns the model folder.

    Raises:
        ValueError: `model_name` is not one plain folder name, `max_batch_size` is not an integer >= 0, or the model
            folder exists, is not empty, and `force` is off.
    """
    if not isinstance(model_name, str) or not MODEL_NAME_RE.fullmatch(model_name):
        raise ValueError(
            f"model_name must be one folder name of letters, digits, '_', '.' and '-' (not starting with '.' or "
            f"'-'; the model goes to {repo_dir}/<model_name>/), got {model_name!r}"
        )
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ValueError(f"max_batch_size must be an integer >= 0 (0: no batching by Triton), got {max_batch_size!r}")
    model_dir = repo_dir / model_name
    if model_dir.exists() and not force and (not model_dir.is_dir() or any(model_dir.iterdir())):
        raise ValueError(
            f"{model_dir} exists and is not empty: pass force=True (mtpeft export --force) to replace it, or choose "
            "another model name"
        )
    return model_dir


def _description(graph: Any, onnx_path: Path) -> dict[str, Any]:
    """The sidecar of `graph`: from its `metadata_props`, else from the sidecar file next to it."""
    sidecar = sidecar_from_metadata({p.key: p.value for p in graph.metadata_props})
    if sidecar is None and sidecar_path(onnx_path).is_file():
        sidecar = json.loads(sidecar_path(onnx_path).read_text())
    if sidecar is None or sidecar.get("format") != SIDECAR_FORMAT or sidecar.get("version") != SIDECAR_VERSION:
        raise ValueError(
            f"{onnx_path} is not a {SIDECAR_FORMAT} v{SIDECAR_VERSION} export (no mtpeft.* metadata_props and no "
            f"sidecar {sidecar_path(onnx_path).name} beside it); export it with mtp.export_onnx / mtpeft export"
        )
    return sidecar


def _labels(sidecar: Mapping[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """Task -> (its logits output, its class names), for the classification tasks (and ensembles) with names."""
    labels = {}
    for task, spec in sidecar["tasks"].items():
        names = spec["head_config"].get("class_names")
        if spec.get("output", spec["head"]) != "classification" or not names or "logits" not in spec["outputs"]:
            continue
        bad = [n for n in names if "\n" in n or "\r" in n]
        if bad:
            raise ValueError(f"task {task!r}: class names {bad} hold line breaks, which a Triton labels file cannot")
        labels[task] = (spec["outputs"]["logits"], list(names))
    return labels


def _copy_graph(graph: Any, props: Mapping[str, str], onnx_path: Path, version: Path) -> None:
    """`version/model.onnx`: the graph with `props` as its metadata_props, its external weight files beside it."""
    import onnx

    if {p.key: p.value for p in graph.metadata_props} == dict(props):
        shutil.copyfile(onnx_path, version / "model.onnx")
    else:
        del graph.metadata_props[:]
        for key, value in props.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save_model(graph, str(version / "model.onnx"))
    locations = {
        entry.value
        for tensor in graph.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    for location in sorted(locations):
        shutil.copyfile(onnx_path.parent / location, version / location)

"""The Open Inference Protocol v2 (KServe, NVIDIA Triton) on the serving engine, shared by REST and gRPC.

Models: every served task under its own name, plus `ALL` (upper case, so never a task's name): the whole task
set, for several tasks on one image in one request (the tasks share the backbone prefix as in `/v1/predict`).

- Inputs (send exactly one): `image`, UINT8 `[N, H, W, 3]` RGB pixels (or `[H, W, 3]` for one image); or
  `image_bytes`, BYTES `[N]`: encoded image files (PNG, JPEG, ...; in JSON as base64 strings).
- Outputs: `<task>.<field>`, batch first, in the pixels of the images sent (`OutputKind.oip_fields`):
  classification `logits` FP32 [N, C], `label` INT64 [N], `score` FP32 [N]; detection `boxes` FP32 [N, K, 4],
  `scores` FP32 [N, K], `labels` INT64 [N, K] (padded with score 0, label -1), `num_detections` INT64 [N];
  segmentation `mask` INT64 [N, H, W]; embedding `embedding` FP32 [N, D]. Without requested outputs, all of the
  model's. For `ALL`, the tasks run are the `tasks` parameter (comma-separated), else those of the requested
  outputs, else every served task.
- Parameters: `score_threshold`, `max_detections`, `timeout_s`, `alpha`, `wise_reference` (as in `/v1/predict`),
  `tasks` (model `ALL`); the protocol's own (`binary_data_output`, `priority`, `timeout`) are accepted. Others
  are refused by name.

Every image of a request is one engine request: they join the same cross-request batches as `/v1/predict`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from multitask_peft import __version__
from multitask_peft.outputs import OUTPUT_KINDS

from .engine import Engine
from .errors import BadRequest, NotFound
from .images import PredictOptions

ALL = "ALL"
SERVER_NAME = "multitask-peft"
IMAGE, IMAGE_BYTES = "image", "image_bytes"
#: Request parameters of the protocol (and tritonclient) that change nothing here.
PROTOCOL_PARAMETERS = ("binary_data_output", "priority", "timeout")
OPTION_PARAMETERS = ("score_threshold", "max_detections", "timeout_s", "alpha", "wise_reference")
NUMPY_TYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
#: Padding of ragged fields when images of one request give different sizes (detections per image).
PAD = {"labels": -1}


@dataclass
class InferRequest:
    """A decoded infer request (REST or gRPC).

    Attributes:
        images: Per image, its encoded file (bytes) or its RGB pixels ((H, W, 3) uint8).
        outputs: Requested output names (None: all of the model's).
        parameters: Request parameters (plain values).
        id: The request id, echoed.
        binary: Per requested output, whether to send it as binary data (REST).
    """

    images: list[bytes | np.ndarray]
    outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    binary: dict[str, bool] = field(default_factory=dict)


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str | None
    outputs: list[tuple[str, str, np.ndarray]]  # (name, datatype, array)


def datatype_of(array: np.ndarray) -> str:
    for name, kind in NUMPY_TYPES.items():
        if array.dtype == kind:
            return name
    raise TypeError(f"no OIP datatype for {array.dtype}")


# --- metadata ------------------------------------------------------------------------------------------------------


def _served(engine: Engine) -> dict[str, dict[str, Any]]:
    return engine.backend.served_tasks()


def check_model(engine: Engine, model: str, version: str | None = None) -> list[str]:
    """The tasks model `model` stands for; 404 for an unknown model or a version not served."""
    served = _served(engine)
    if model == ALL:
        tasks, current = list(served), "1"
    elif model in served:
        tasks, current = [model], str(served[model]["version"])
    else:
        raise NotFound(f"unknown model {model!r}; models: {[ALL, *served]} (the served tasks, and {ALL} for all)")
    if version not in (None, "", current):
        raise NotFound(f"model {model!r} has version {current}, not {version!r}")
    return tasks


def model_version(engine: Engine, model: str) -> str:
    return "1" if model == ALL else str(_served(engine)[model]["version"])


def task_outputs(info: Mapping[str, Any]) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of one task's outputs."""
    names = info.get("class_names")
    fields = OUTPUT_KINDS.get(info["head"]).oip_fields(info.get("num_classes") or (len(names) if names else None))
    return [(f"{info['name']}.{f.name}", f.datatype, list(f.shape)) for f in fields]


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": ["binary_tensor_data"]}


def model_metadata(engine: Engine, model: str, version: str | None = None) -> dict[str, Any]:
    """What `infer` on `model` accepts and answers."""
    tasks = check_model(engine, model, version)
    served = _served(engine)
    outputs = [o for t in tasks for o in task_outputs(served[t])]
    return {
        "name": model,
        "versions": [model_version(engine, model)],
        "platform": f"multitask-peft-{engine.backend.name}",
        "inputs": [
            {"name": IMAGE, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
            {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs],
    }


# --- infer ---------------------------------------------------------------------------------------------------------


def images_from_tensor(name: str, datatype: str, shape: Sequence[int], values: Any) -> list[bytes | np.ndarray]:
    """The images of an input tensor: `values` is a flat numpy array (UINT8) or a list of bytes (BYTES)."""
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise BadRequest(f"input {name!r}: shape must be non-negative integers, got {list(shape)}")
    count = math.prod(shape)
    if name == IMAGE:
        if datatype != "UINT8":
            raise BadRequest(f"input {IMAGE!r} must be UINT8 [N, H, W, 3] or [H, W, 3], got {datatype}")
        if len(shape) not in (3, 4) or shape[-1] != 3:
            raise BadRequest(f"input {IMAGE!r} must have shape [N, H, W, 3] or [H, W, 3], got {list(shape)}")
        if len(values) != count:
            raise BadRequest(f"input {IMAGE!r}: shape {list(shape)} needs {count} values, got {len(values)}")
        pixels = np.asarray(values, dtype=np.uint8).reshape(shape)
        return list(pixels) if len(shape) == 4 else [pixels]
    if name == IMAGE_BYTES:
        if datatype != "BYTES":
            raise BadRequest(f"input {IMAGE_BYTES!r} must be BYTES [N] (encoded image files), got {datatype}")
        if len(values) != count:
            raise BadRequest(f"input {IMAGE_BYTES!r}: shape {list(shape)} needs {count} elements, got {len(values)}")
        return list(values)
    raise BadRequest(f"unknown input {name!r}; send one of {IMAGE!r} (UINT8 [N, H, W, 3]) or {IMAGE_BYTES!r} (BYTES)")


def _options(parameters: Mapping[str, Any], model: str) -> tuple[PredictOptions, str | None]:
    allowed = {*OPTION_PARAMETERS, *PROTOCOL_PARAMETERS, *(("tasks",) if model == ALL else ())}
    unknown = sorted(set(parameters) - allowed)
    if unknown:
        raise BadRequest(f"unknown parameter(s) {unknown}; accepted: {sorted(allowed)}")
    options = PredictOptions.parse({k: parameters.get(k) for k in OPTION_PARAMETERS})
    tasks = parameters.get("tasks")
    if tasks is not None and not isinstance(tasks, str):
        raise BadRequest(f"parameter 'tasks' must be a comma-separated string of task names, got {tasks!r}")
    return options, tasks


def _select(engine: Engine, model: str, tasks: list[str], asked: str | None, outputs: list[str] | None) -> list[str]:
    """The tasks to run and check of the requested output names."""
    served = _served(engine)
    if model == ALL:
        if asked is not None:
            tasks = [t.strip() for t in asked.split(",") if t.strip()]
            unknown = [t for t in tasks if t not in served]
            if unknown or not tasks:
                raise NotFound(f"parameter 'tasks': unknown task(s) {unknown or asked!r}; served: {list(served)}")
        elif outputs:
            tasks = list(dict.fromkeys(o.rpartition(".")[0] for o in outputs))
    if outputs is not None:
        known = {n for t in tasks if t in served for n, _, _ in task_outputs(served[t])}
        bad = [o for o in outputs if o not in known]
        if bad:
            raise BadRequest(f"unknown output(s) {bad}; model {model!r} answers {sorted(known)}")
    return tasks


def _merge(name: str, parts: list[np.ndarray]) -> np.ndarray:
    """One batch array from per-image arrays (leading dimension 1 each); ragged fields are padded (`PAD`)."""
    if all(p.shape == parts[0].shape for p in parts):
        return np.concatenate(parts)
    field_name = name.rpartition(".")[2]
    shape = [len(parts), *np.max([p.shape[1:] for p in parts], axis=0)]
    if field_name == "mask":
        raise BadRequest(
            f"output {name!r}: masks come at each image's size and these images differ; send them in separate "
            "requests (or as one UINT8 tensor)"
        )
    out = np.full(shape, PAD.get(field_name, 0), dtype=parts[0].dtype)
    for i, p in enumerate(parts):
        out[(i, *(slice(0, d) for d in p.shape[1:]))] = p[0]
    return out


async def infer(engine: Engine, model: str, version: str | None, request: InferRequest) -> InferResponse:
    """Run `request` on `model`: every image through the engine (joining its batches), outputs as arrays."""
    tasks = check_model(engine, model, version)
    options, asked = _options(request.parameters, model)
    tasks = _select(engine, model, tasks, asked, request.outputs)
    if not tasks:
        raise NotFound(f"model {model!r} has no tasks to run (no task is served)")
    if not request.images:
        raise BadRequest("the request holds no image")
    limit = engine.config.max_queue
    if len(request.images) > limit:
        raise BadRequest(f"{len(request.images)} images in one request; at most {limit} (the server's queue)")
    answers = await asyncio.gather(*(engine.predict(image, tasks, options, form="tensors") for image in request.images))
    served = _served(engine)
    wanted = request.outputs
    outputs = []
    for task in tasks:
        for name, datatype, _ in task_outputs(served[task]):
            if wanted is not None and name not in wanted:
                continue
            field_name = name.rpartition(".")[2]
            array = _merge(name, [results[task][field_name] for results, _, _ in answers])
            outputs.append((name, datatype, array))
    if wanted is not None:  # in the order asked
        outputs.sort(key=lambda o: wanted.index(o[0]))
    return InferResponse(model, model_version(engine, model), request.id, outputs)


# --- REST encoding -------------------------------------------------------------------------------------------------


def decode_bytes_elements(data: bytes, name: str) -> list[bytes]:
    """BYTES elements in the binary tensor form: each a 4-byte little-endian length, then its bytes."""
    items, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise BadRequest(f"input {name!r}: truncated BYTES element length at byte {offset}")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise BadRequest(f"input {name!r}: BYTES element of {size} bytes runs past the data")
        items.append(data[offset : offset + size])
        offset += size
    return items


def parse_rest(body: Mapping[str, Any], binary: bytes) -> InferRequest:
    """A REST infer request from its JSON header and the binary data after it (binary tensor data extension)."""
    unknown = sorted(set(body) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown} in the infer request; accepted: id, parameters, inputs, outputs")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"'id' must be a string, got {request_id!r}")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"'parameters' must be an object, got {parameters!r}")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"'inputs' must hold exactly one input tensor ({IMAGE!r} or {IMAGE_BYTES!r})")
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
        raise BadRequest("an input tensor needs 'name', 'datatype' and 'shape'")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest(f"input {name!r}: shape must be integers, got {shape!r}")
    tensor_parameters = tensor.get("parameters") or {}
    if not isinstance(tensor_parameters, dict):
        raise BadRequest(f"input {name!r}: 'parameters' must be an object")
    if "shared_memory_region" in tensor_parameters:
        raise BadRequest("shared memory inputs are not supported: send the data in the request")
    size = tensor_parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size != len(binary):
            raise BadRequest(f"input {name!r}: binary_data_size {size!r} but {len(binary)} bytes follow the header")
        values: Any = (
            decode_bytes_elements(binary, name) if datatype == "BYTES" else np.frombuffer(binary, dtype=np.uint8)
        )
        if datatype not in ("BYTES", "UINT8"):
            raise BadRequest(f"input {name!r}: datatype {datatype} is not accepted (UINT8 or BYTES)")
    else:
        if binary:
            raise BadRequest("binary data follows the header but no input has 'binary_data_size'")
        data = tensor.get("data")
        if not isinstance(data, list):
            raise BadRequest(f"input {name!r} needs 'data' (a list) or binary data")
        values = _json_values(name, datatype, data)
    request = InferRequest(images_from_tensor(name, datatype, shape, values), parameters=dict(parameters))
    request.id = request_id
    default_binary = bool(parameters.get("binary_data_output", False))
    outputs = body.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
        ):
            raise BadRequest("'outputs' must be a list of {'name': ..., 'parameters': {...}}")
        request.outputs = []
        for o in outputs:
            p = o.get("parameters") or {}
            if not isinstance(p, dict):
                raise BadRequest(f"output {o['name']!r}: 'parameters' must be an object")
            extra = sorted(set(p) - {"binary_data"})
            if extra:
                raise BadRequest(f"output {o['name']!r}: parameter(s) {extra} not supported (only binary_data)")
            request.outputs.append(o["name"])
            request.binary[o["name"]] = bool(p.get("binary_data", default_binary))
    else:
        request.binary = {"*": default_binary}
    return request


def _json_values(name: str, datatype: str, data: list) -> Any:
    flat = list(_flatten(data))
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise BadRequest(f"input {name!r}: BYTES data in JSON must be base64 strings of the image files")
        try:
            return [base64.b64decode(v, validate=True) for v in flat]
        except ValueError as e:
            raise BadRequest(f"input {name!r}: not valid base64 ({e})") from e
    if datatype == "UINT8":
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in flat):
            raise BadRequest(f"input {name!r}: UINT8 data must be integers in [0, 255]")
        return np.asarray(flat, dtype=np.uint8)
    raise BadRequest(f"input {name!r}: datatype {datatype} is not accepted (UINT8 or BYTES)")


def _flatten(data: Any) -> Any:
    for v in data:
        if isinstance(v, list):
            yield from _flatten(v)
        else:
            yield v


def encode_rest(response: InferResponse, binary: Mapping[str, bool]) -> tuple[bytes, int | None]:
    """(body, JSON header length if binary data follow it) of a REST infer response."""
    header: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        header["id"] = response.id
    blobs, outputs = [], []
    for name, datatype, array in response.outputs:
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary.get(name, binary.get("*", False)):
            raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    header["outputs"] = outputs
    text = json.dumps(header).encode()
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)

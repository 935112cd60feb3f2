"""What `/openapi.json` says about the HTTP API: request bodies as tight as the server's checks, and every status
code and content type each route sends (checked with schemathesis in `tests/test_openapi.py`).

The one rejection a schema cannot express is an image whose bytes do not decode (or, for OIP, tensor data that do
not fill the tensor's shape): 400 on the two routes that take images.
"""

from __future__ import annotations

from typing import Any

from multitask_peft.config import TASK_NAME_RE

from . import oip

TASK_NAME = f"^{TASK_NAME_RE.pattern}$"
TASK_LIST = f"^{TASK_NAME_RE.pattern}(,{TASK_NAME_RE.pattern})*$"

_ERROR_V1 = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
        }
    },
}
_ERROR_V2 = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}

_WHY = {
    400: "bad request: malformed body, an image that does not decode, a bad option",
    401: "admin route without `Authorization: Bearer <token>`",
    403: "wrong admin token, or the admin API is disabled",
    404: "unknown task / model (or version)",
    409: "the backend's tasks are fixed (ONNX)",
    413: "request body too large",
    415: "unsupported content type or content encoding",
    422: "missing, unknown or ill-typed fields",
    429: "the queue is full (see Retry-After)",
    500: "internal error",
    503: "not ready, or shutting down",
    504: "no result within the request's timeout",
}


def responses(*codes: int, v2: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error codes a route sends (500 is added: any route may fail)."""
    schema = _ERROR_V2 if v2 else _ERROR_V1
    return {
        code: {"description": _WHY[code], "content": {"application/json": {"schema": schema}}}
        for code in sorted({*codes, 500})
    }


def _options() -> dict[str, Any]:
    number = {"type": "number"}
    return {
        "score_threshold": {**number, "minimum": 0, "maximum": 1},
        "max_detections": {"type": "integer", "minimum": 0, "maximum": 10000},
        "mask_format": {"type": "string", "enum": ["png", "list"]},
        "logits": {"type": "boolean"},
        "timeout_s": {**number, "exclusiveMinimum": 0, "maximum": 3600},
        "alpha": {**number, "minimum": 0, "maximum": 1, "description": "WiSE coefficient (torch backend)"},
        "wise_reference": {
            "type": "string",
            "pattern": TASK_NAME,
            "description": "the linear-probe task alpha = 0 becomes (needs alpha)",
        },
    }


PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["image", "tasks"],
                "additionalProperties": False,
                "dependentRequired": {"wise_reference": ["alpha"]},
                "properties": {
                    "image": {
                        "type": "string",
                        "minLength": 1,
                        "contentEncoding": "base64",
                        "description": "the image file (PNG, JPEG, WEBP, BMP, GIF, TIFF), base64 (or a data URL)",
                    },
                    "tasks": {
                        "oneOf": [
                            {"type": "array", "items": {"type": "string", "pattern": TASK_NAME}, "minItems": 1},
                            {"type": "string", "pattern": TASK_LIST},
                        ]
                    },
                    **_options(),
                },
            }
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image", "tasks"],
                "dependentRequired": {"wise_reference": ["alpha"]},
                "properties": {
                    "image": {"type": "string", "format": "binary"},
                    "tasks": {"type": "string", "pattern": TASK_LIST, "description": "comma-separated task names"},
                    **_options(),
                },
            }
        },
    },
}

LOAD_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["path"],
                "additionalProperties": False,
                "properties": {
                    "path": {"type": "string", "description": "task folder, relative to the adapter directory"},
                    "name": {"type": "string", "pattern": TASK_NAME, "description": "served name (default: saved)"},
                },
            }
        }
    },
}

_PARAMETERS = {
    "type": "object",
    "properties": {
        **_options(),
        "tasks": {"type": "string", "pattern": TASK_LIST, "description": f"model {oip.ALL} only"},
        "binary_data_output": {"type": "boolean"},
    },
    "additionalProperties": False,
}

INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "string"},
                    "parameters": _PARAMETERS,
                    "inputs": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "datatype", "shape", "data"],
                            "properties": {
                                "name": {"type": "string", "enum": [oip.IMAGE, oip.IMAGE_BYTES]},
                                "datatype": {"type": "string", "enum": ["UINT8", "BYTES"]},
                                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                                "data": {"type": "array", "description": "UINT8 pixels, or BYTES as base64"},
                            },
                        },
                    },
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "parameters": {
                                    "type": "object",
                                    "properties": {"binary_data": {"type": "boolean"}},
                                    "additionalProperties": False,
                                },
                            },
                        },
                    },
                },
            }
        },
        "application/octet-stream": {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": "the JSON header, then binary tensor data (`Inference-Header-Content-Length`)",
            }
        },
    },
}

INFER_OK = {
    200: {
        "description": "the outputs (binary tensor data after the JSON header when asked for)",
        "content": {
            "application/json": {"schema": {"type": "object", "required": ["model_name", "outputs"]}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
METRICS_OK = {200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}

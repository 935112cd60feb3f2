"""Serving: an engine that batches requests across clients, an adapter store, an HTTP API and a client.

    from multitask_peft import serving
    backend = serving.TorchBackend(model, serving.AdapterStore(model, "tasks/"), serving.Preprocess((224, 224),
                                   mean=(0.5,) * 3, std=(0.5,) * 3))
    app = serving.create_app(serving.Engine(backend, serving.EngineConfig(max_batch=32)), admin_token="...")
    # or from the shell: mtpeft serve RUN_DIR --backend torch|onnx

Both backends implement `Backend`, the one interface the engine and the HTTP API use (see `serving.backends`).

Needs the `serve` extra (fastapi, uvicorn, python-multipart, prometheus-client, httpx) for the server, the engine and
the client; the names below are imported when first used, so that `mtpeft predict`, which decodes images with
`serving.images`, runs without the extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .backends import Backend, OnnxBackend, TaskFormat, TorchBackend
    from .client import Client, ServerError
    from .engine import Engine, EngineConfig, Worker
    from .errors import ServingError
    from .images import PredictOptions, Preprocess, decode_mask_png
    from .server import onnx_backend, serve, torch_backend
    from .store import AdapterStore

#: Public name -> the submodule defining it.
_EXPORTS = {
    "create_app": "app",
    "Backend": "backends",
    "OnnxBackend": "backends",
    "TaskFormat": "backends",
    "TorchBackend": "backends",
    "Client": "client",
    "ServerError": "client",
    "Engine": "engine",
    "EngineConfig": "engine",
    "Worker": "engine",
    "ServingError": "errors",
    "PredictOptions": "images",
    "Preprocess": "images",
    "decode_mask_png": "images",
    "onnx_backend": "server",
    "serve": "server",
    "torch_backend": "server",
    "AdapterStore": "store",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "AdapterStore",
    "Backend",
    "Client",
    "Engine",
    "EngineConfig",
    "OnnxBackend",
    "PredictOptions",
    "Preprocess",
    "ServerError",
    "ServingError",
    "TaskFormat",
    "TorchBackend",
    "Worker",
    "create_app",
    "decode_mask_png",
    "onnx_backend",
    "serve",
    "torch_backend",
]

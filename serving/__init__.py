"""Serving: an engine that batches requests across clients, an adapter store, an HTTP API and a client.

    from multitask_peft import serving
    backend = serving.TorchBackend(model, serving.AdapterStore(model, "tasks/"), serving.Preprocess((224, 224),
                                   mean=(0.5,) * 3, std=(0.5,) * 3))
    app = serving.create_app(serving.Engine(backend, serving.EngineConfig(max_batch=32)), admin_token="...")
    # or from the shell: mtpeft serve RUN_DIR --backend torch|onnx

Both backends implement `Backend`, the one interface the engine and the HTTP API use (see `serving.backends`).

Needs the `serve` extra (fastapi, uvicorn, python-multipart, prometheus-client, httpx).
"""

from .app import create_app
from .backends import Backend, OnnxBackend, TaskFormat, TorchBackend
from .client import Client, ServerError
from .engine import Engine, EngineConfig, Worker
from .errors import ServingError
from .images import PredictOptions, Preprocess, decode_mask_png
from .server import onnx_backend, serve, torch_backend
from .store import AdapterStore

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

"""Start a server: backends from a run directory, uvicorn with a graceful, bounded shutdown.

`mtpeft serve DIR` serves a run directory (`mtpeft train` output: `config.yaml`, `tasks/<name>/`, and for the
ONNX backend `model.onnx` + `model.json`). The torch backend builds the backbone from the run config and serves
every task folder under `DIR/tasks` (the adapter directory: admin loads may name folders inside it only).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from multitask_peft.rundir import ONNX_FILE, RunDirectory

from .app import MAX_BODY_BYTES, create_app
from .backends import OnnxBackend, TorchBackend
from .engine import Engine, EngineConfig, Worker
from .images import Preprocess
from .store import AdapterStore

log = logging.getLogger("multitask_peft.serving")


def torch_backend(run_dir: str | Path, max_resident: int | None = None, device: str | None = None) -> TorchBackend:
    """The run's backbone with the tasks under `run_dir/tasks` (the first `max_resident` of them loaded)."""
    run = RunDirectory(run_dir)
    model = run.build_backbone()
    run.tasks_dir.mkdir(exist_ok=True)
    store = AdapterStore(model, run.tasks_dir, max_resident)
    store.scan()
    spec = run.input_spec(model)
    return TorchBackend(model, store, Preprocess(spec.size, spec.mean, spec.std), device)


def onnx_backend(run_dir: str | Path) -> OnnxBackend:
    """The exported graph of a run directory (`model.onnx`), or the `.onnx` file given."""
    path = Path(run_dir)
    if path.is_dir():  # a run directory, or any folder holding the graph and its sidecar
        path = path / ONNX_FILE
    if not path.is_file():
        raise ValueError(f"no ONNX graph at {path}; export one with `mtpeft export RUN_DIR {path}`")
    return OnnxBackend(path)


class _Server:
    """uvicorn's server, told about shutdown first: on SIGTERM / SIGINT the engine refuses new requests (503)
    while uvicorn stops accepting connections and waits (bounded) for the requests in flight."""

    def __init__(self, app: Any, engine: Engine, host: str, port: int, drain_s: float, log_level: str) -> None:
        import uvicorn

        config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_s, lifespan="on"
        )

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                if sig in (signal.SIGTERM, signal.SIGINT) and not engine.closing:
                    log.info("shutting down: draining requests in flight (at most %.0f s)", drain_s)
                engine.closing = True
                engine.ready = False
                super().handle_exit(sig, frame)

        self.server = Server(config)

    def run(self) -> None:
        self.server.run()


def serve(
    directory: str | Path,
    backend: str = "torch",
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    max_queue: int = 256,
    max_resident: int | None = None,
    timeout_s: float = 30.0,
    drain_timeout_s: float = 30.0,
    admin_token: str | None = None,
    device: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    log_level: str = "info",
    grpc_port: int | None = None,
) -> None:
    """Serve a run directory over HTTP (and OIP v2 gRPC on `grpc_port`) until SIGTERM / SIGINT (then drain,
    bounded by `drain_timeout_s`)."""
    worker = Worker()  # the model is built on the thread that will run it (see `engine`)
    if backend == "torch":
        runner: Any = worker.call(torch_backend, directory, max_resident, device)
    elif backend == "onnx":
        if max_resident is not None:
            raise ValueError("--max-resident applies to the torch backend (the ONNX graph holds its tasks)")
        runner = onnx_backend(directory)
    else:
        raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    # uvicorn waits (at most drain_timeout_s) for the requests in flight, which are every request the engine holds;
    # the engine's own drain after it is then a formality, so the two waits do not add up
    config = EngineConfig(max_batch, max_wait_ms, max_queue, timeout_s, drain_timeout_s=min(drain_timeout_s, 1.0))
    engine = Engine(runner, config, worker=worker)
    app = create_app(engine, admin_token, max_body_bytes, grpc_port=grpc_port, grpc_host=host)
    log.info("serving %s with the %s backend on http://%s:%d", directory, backend, host, port)
    _Server(app, engine, host, port, drain_timeout_s, log_level).run()

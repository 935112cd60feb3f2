"""Serving on Ray Serve: replicas of the engine on a Ray cluster, routed by the tasks they hold.

    ingress (HTTP, the same app as `mtpeft serve`: /v1, /v2 OIP, metrics)
        └── RayEngine ──handle──► TaskReplica x N   (each: backbone + adapter store + Engine with its batching)
                                   ▲ routed by `TaskAwareRouter` on each replica's resident tasks
    TaskRegistry (a named Ray actor): the ordered log of admin changes every replica applies

- **Replicas** (`TaskReplica`) each run what one `mtpeft serve` process runs: the frozen backbone, an adapter
  store over the run's `tasks/` folder (LRU within `max_resident`) and the engine, whose cross-request batches mix
  tasks (every image runs its own tasks, sharing the backbone prefix). Ray's `@serve.batch` and model multiplexing
  are not used: multiplexing splits batches by model ID, which would undo mixed-task batches.
- **Routing** (`TaskAwareRouter`, Ray Serve's request-router API): every replica reports the tasks it holds
  (`record_routing_stats`); a request goes first to a replica holding all its tasks that has room, else to any
  replica with room (which loads them). Ties go to the shorter queue.
- **Admin changes** (load, replace, unload through the same admin API and token) run on one replica, which
  validates and applies the change and appends it to the registry; then every running replica catches up with the
  registry (a broadcast), and a replica started later replays it before it takes requests. Each replica applies a
  change between two batches (the store's lock), so a request runs on one version of its tasks. Admin changes are
  serialised by the ingress (run one ingress replica).
- **Failures**: a request whose replica dies is retried on another (predictions are idempotent), a few times with
  back-off, then answered 503 with `Retry-After`; Serve's controller replaces the dead replica (health checks), and
  the new one replays the registry. Overload answers 429 / 503 from the replicas' own engines.

Entry points: `build_app(...)` / `app_builder(args)` (an application Ray's `serve run` / `serve deploy` config can
name: `import_path: multitask_peft.serving.ray:app_builder`), and `mtpeft serve RUN_DIR --ray`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from multitask_peft.rundir import RunDirectory

from .errors import QueueFull, ServingError, ShuttingDown, Unprocessable
from .images import PredictOptions, Preprocess
from .metrics import Metrics

log = logging.getLogger("multitask_peft.serving")

REPLICA = "TaskReplica"
INGRESS = "Ingress"
#: Replica failures a request survives (it is retried on another replica) before it is answered 503.
RETRIES = 3


@dataclass(frozen=True)
class Failure:
    """A `ServingError` crossing a process boundary (exceptions with extra constructor arguments do not pickle)."""

    status: int
    message: str
    headers: dict[str, str]

    @classmethod
    def of(cls, error: ServingError) -> Failure:
        return cls(error.status, error.message, dict(error.headers))

    def error(self) -> ServingError:
        error = ServingError(self.message, dict(self.headers))
        error.status = self.status
        return error


@ray.remote(num_cpus=0)
class TaskRegistry:
    """The ordered log of admin changes: [(version, "load" | "unload", name, path)]."""

    def __init__(self) -> None:
        self.log: list[tuple[int, str, str, str | None]] = []

    def record(self, op: str, name: str, path: str | None) -> int:
        self.log.append((len(self.log) + 1, op, name, path))
        return len(self.log)

    def since(self, version: int) -> list[tuple[int, str, str, str | None]]:
        return self.log[version:]


class TaskReplica:
    """One replica: the backbone, an adapter store over `run_dir/tasks` and an engine (see the module docstring)."""

    def __init__(
        self,
        run_dir: str,
        registry: Any,
        max_resident: int | None = None,
        engine: dict[str, Any] | None = None,
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        import torch

        from .engine import Engine, EngineConfig, Worker
        from .server import torch_backend

        if threads:
            torch.set_num_threads(threads)
        self.worker = Worker()
        self.backend = self.worker.call(torch_backend, run_dir, max_resident, device)
        self.engine = Engine(self.backend, EngineConfig(**(engine or {})), worker=self.worker)
        self.registry = registry
        self.version = 0  # registry changes applied
        self._started = False
        self._sync_lock: asyncio.Lock | None = None

    async def _ready(self) -> None:
        if not self._started:
            await self.engine.start()
            self._sync_lock = asyncio.Lock()
            self._started = True
        await self.sync()

    async def sync(self) -> int:
        """Apply the registry's changes this replica has not applied yet; returns the version it is at."""
        if not self._started:
            await self._ready()
            return self.version
        assert self._sync_lock is not None
        async with self._sync_lock:
            for version, op, name, path in await self.registry.since.remote(self.version):
                try:
                    if op == "load":
                        await self.backend.load(name, path)
                    else:
                        await self.backend.unload(name)
                except ServingError as e:  # (applied on the first replica, so a change of files since)
                    log.warning("registry change %d (%s %s) failed here: %s", version, op, name, e.message)
                self.version = version
        return self.version

    async def predict(self, data: Any, tasks: list[str], options: dict[str, Any], form: str = "json") -> Any:
        try:
            await self._ready()
            return await self.engine.predict(data, tasks, PredictOptions(**options), form)
        except ServingError as e:
            return Failure.of(e)

    async def admin(self, op: str, name: str | None, path: str | None) -> Any:
        """Validate and apply one admin change here, then append it to the registry (the others catch up)."""
        try:
            await self._ready()
            assert self._sync_lock is not None
            async with self._sync_lock:
                if op == "load":
                    info = await self.backend.load(name, path)
                    name = info["name"]
                else:
                    await self.backend.unload(name)
                    info = {"unloaded": name}
                version = await self.registry.record.remote(op, name, path)
                if version == self.version + 1:  # else older changes are replayed on top (idempotent loads)
                    self.version = version
            return info
        except ServingError as e:
            return Failure.of(e)

    async def served(self) -> dict[str, dict[str, Any]]:
        await self._ready()
        return self.backend.served_tasks()

    async def describe(self) -> dict[str, Any]:
        await self._ready()
        context = serve.get_replica_context()
        return {
            "replica": context.replica_id.unique_id if context else None,
            "pid": os.getpid(),
            "resident": self._resident(),
            "version": self.version,
            "queue": self.engine._queued,
            "batches": self.engine.batches,
        }

    def preprocess(self) -> dict[str, Any]:
        return asdict(self.engine.preprocess)

    def _resident(self) -> list[str]:
        return sorted(n for n, e in self.backend.store.entries.items() if e.resident)

    def record_routing_stats(self) -> dict[str, Any]:
        """What the router knows of this replica (polled by Serve): the tasks it holds."""
        return {"resident": self._resident(), "version": self.version}

    def check_health(self) -> None:
        if self.engine.closing:
            raise RuntimeError("the engine is shutting down")


class TaskAwareRouter(FIFOMixin, RequestRouter):
    """Prefers replicas holding every task of the request, then any replica; the shorter queue first."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        tasks = set(_request_tasks(pending_request))
        queue = self.replica_queue_len_cache

        def load(r: RunningReplica) -> int:
            return queue.get(r.replica_id) or 0

        if not tasks:
            return [sorted(candidate_replicas, key=load)]
        holding = [r for r in candidate_replicas if tasks <= set((r.routing_stats or {}).get("resident", ()))]
        others = [r for r in candidate_replicas if r not in holding]
        return [rank for rank in (sorted(holding, key=load), sorted(others, key=load)) if rank]


def _request_tasks(pending: PendingRequest | None) -> list[str]:
    if pending is None:
        return []
    tasks = pending.kwargs.get("tasks") if pending.kwargs else None
    return list(tasks) if isinstance(tasks, list) else []


# --- the ingress side --------------------------------------------------------------------------------------------


class _RayBackend:
    """What the HTTP app asks of a backend, answered from the replicas (served tasks cached, refreshed)."""

    name = "ray"
    wise = True

    def __init__(self, engine: RayEngine) -> None:
        self.engine = engine
        self.tasks: dict[str, dict[str, Any]] = {}

    def served_tasks(self) -> dict[str, dict[str, Any]]:
        return dict(self.tasks)

    def check_changeable(self) -> None:
        """Tasks load, change and unload live on every replica."""

    async def load(self, name: str | None, path: object) -> dict[str, Any]:
        if not isinstance(path, str):
            raise Unprocessable(f"'path' must be a string (a task folder inside the adapter directory), got {path!r}")
        return await self.engine.admin("load", name, path)

    async def unload(self, name: str) -> None:
        await self.engine.admin("unload", name, None)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "replicas": self.engine.replicas}


@dataclass(frozen=True)
class _Config:
    max_queue: int = 256
    drain_timeout_s: float = 1.0


class RayEngine:
    """The engine interface of the HTTP app (`create_app`), forwarding to the replicas: requests routed by tasks
    and retried on another replica when theirs dies; admin changes applied on one replica, then on all."""

    def __init__(self, replicas: Any, preprocess: Preprocess, max_queue: int = 256) -> None:
        self.handle = replicas
        self.preprocess = preprocess
        self.config = _Config(max_queue=max_queue)
        self.metrics = Metrics()
        self.backend = _RayBackend(self)
        self.replicas: list[dict[str, Any]] = []
        self.ready = False
        self.closing = False
        self._admin = asyncio.Lock()
        self._inflight = 0
        self._refresher: asyncio.Task | None = None

    async def start(self) -> None:
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_loop())
        self.ready = True

    async def stop(self) -> None:
        self.closing, self.ready = True, False
        if self._refresher is not None:
            self._refresher.cancel()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            try:
                await self.refresh()
            except Exception as e:  # a replica restarting: keep the last view
                log.debug("refresh failed: %s", e)

    async def refresh(self) -> None:
        """The served tasks (from one replica) and every replica's state (a broadcast)."""
        self.backend.tasks = await self._call("served")
        self.replicas = list(await self.handle.broadcast("describe").results_async())

    def check_capacity(self) -> None:
        """503 while closing; 429 when the replicas' queues are full (`max_queue` requests in flight per replica:
        beyond what the replicas take at once, requests wait at the ingress, up to this)."""
        if self.closing:
            raise ShuttingDown()
        limit = self.config.max_queue * max(1, len(self.replicas))
        if self._inflight >= limit:
            raise QueueFull(f"the replicas' queues are full ({self._inflight} requests in flight)", 1)

    async def predict(self, data: Any, tasks: list[str], options: PredictOptions, form: str = "json") -> Any:
        self.check_capacity()
        self._inflight += 1
        try:
            return await self._call("predict", data, tasks=tasks, options=asdict(options), form=form)
        finally:
            self._inflight -= 1

    async def admin(self, op: str, name: str | None, path: str | None) -> dict[str, Any]:
        async with self._admin:
            info = await self._call("admin", op, name, path)
            await self.handle.broadcast("sync").results_async()  # every running replica catches up
            await self.refresh()
            return info

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from ray.exceptions import RayActorError

        try:
            from ray.serve.exceptions import ReplicaUnavailableError
        except ImportError:  # older Ray
            ReplicaUnavailableError = RayActorError  # noqa: N806

        for attempt in range(RETRIES + 1):
            try:
                out = await getattr(self.handle, method).remote(*args, **kwargs)
            except (RayActorError, ReplicaUnavailableError) as e:  # its replica died: another one takes it
                log.warning("%s: replica unavailable (%s); retry %d", method, type(e).__name__, attempt + 1)
                await asyncio.sleep(0.1 * 2**attempt)
                continue
            if isinstance(out, Failure):
                raise out.error()
            return out
        raise ShuttingDown("no replica could take the request; retry shortly")


def _ingress_app(preprocess: dict[str, Any], admin_token: str | None, max_body_bytes: int, max_queue: int) -> Any:
    """Builds the HTTP app on the ingress replica (Serve calls it there)."""
    from .app import create_app

    context = serve.get_replica_context()
    handle = serve.get_deployment_handle(REPLICA, app_name=context.app_name)
    size = tuple(preprocess["size"])
    spec = Preprocess(size, tuple(preprocess["mean"]), tuple(preprocess["std"]), preprocess["max_pixels"])
    return create_app(RayEngine(handle, spec, max_queue), admin_token=admin_token, max_body_bytes=max_body_bytes)


class Ingress:
    """The HTTP ingress deployment (its routes are the app `_ingress_app` builds; the bound replica deployment
    makes the replicas part of the application)."""

    def __init__(self, replicas: Any) -> None:
        self.replicas = replicas


def build_app(
    run_dir: str | Path,
    replicas: int = 1,
    autoscale: tuple[int, int] | None = None,
    max_resident: int | None = None,
    admin_token: str | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    max_queue: int = 256,
    timeout_s: float = 30.0,
    device: str | None = None,
    replica_cpus: float = 1.0,
    replica_gpus: float = 0.0,
    threads: int | None = None,
    max_body_bytes: int | None = None,
    name: str = "mtpeft",
) -> Any:
    """The Ray Serve application serving a run directory: `serve.run(build_app("runs/demo", replicas=2))`.

    Args:
        replicas: Fixed number of replicas (ignored with `autoscale`).
        autoscale: (min, max) replicas; Serve scales on ongoing requests per replica (target: `max_batch`).
        replica_cpus: CPUs Ray reserves per replica (`threads`: torch threads in it; default: that number).
        replica_gpus: GPUs Ray reserves per replica (1 with `device="cuda"`: one GPU each).
        Others: as `mtpeft serve`.
    """
    from .app import MAX_BODY_BYTES

    run = RunDirectory(run_dir)  # (an early, clear error for a wrong folder)
    preprocess = _preprocess(run)
    registry = TaskRegistry.options(name=f"{name}-task-registry", get_if_exists=True, lifetime="detached").remote()
    engine = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_queue": max_queue, "timeout_s": timeout_s}
    scaling: dict[str, Any] = {"num_replicas": replicas}
    if autoscale is not None:
        low, high = autoscale
        scaling = {
            "autoscaling_config": AutoscalingConfig(
                min_replicas=low, max_replicas=high, target_ongoing_requests=max(1, max_batch)
            )
        }
    quiet = {"enable_access_log": False, "log_level": "WARNING"}  # (a log line per request costs throughput)
    replica = serve.deployment(
        TaskReplica,
        name=REPLICA,
        logging_config=quiet,
        max_ongoing_requests=max(2 * max_batch, 8),
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        request_router_config=RequestRouterConfig(
            request_router_class=TaskAwareRouter, request_routing_stats_period_s=0.5
        ),
        **scaling,
    )
    body_limit = max_body_bytes or MAX_BODY_BYTES

    def builder() -> Any:  # (Serve runs a plain function on the ingress replica; a partial it takes for an app)
        return _ingress_app(preprocess, admin_token, body_limit, max_queue)

    # The ingress only forwards: it takes more requests at once than the replicas' engines queue in all, so that it
    # answers 429 itself beyond that (`RayEngine.check_capacity`) rather than the proxy queueing without bound
    # (Serve's default of 5 capped every batch at 5 images and made the proxy retry a full ingress under load: 0.37x
    # the single server's throughput at 16 clients, 0.8x with this).
    ingress = serve.deployment(
        serve.ingress(builder)(Ingress),
        name=INGRESS,
        ray_actor_options={"num_cpus": 0},
        logging_config=quiet,
        max_ongoing_requests=2 * max_queue * (autoscale[1] if autoscale else replicas),
    )
    threads = threads or max(1, int(replica_cpus))
    return ingress.bind(replica.bind(str(run.path), registry, max_resident, engine, device, threads))


def _preprocess(run: RunDirectory) -> dict[str, Any]:
    """The run's input size and normalisation, without building the backbone (from its config)."""
    from .images import MAX_PIXELS

    spec = run.input_spec()
    return {"size": list(spec.size), "mean": list(spec.mean), "std": list(spec.std), "max_pixels": MAX_PIXELS}


def app_builder(args: dict[str, Any]) -> Any:
    """For Ray's own config files (`import_path: multitask_peft.serving.ray:app_builder`, `args: {run_dir: ...,
    replicas: 2, ...}`): `build_app(**args)`."""
    args = dict(args)
    if "autoscale" in args and args["autoscale"] is not None:
        args["autoscale"] = tuple(args["autoscale"])
    return build_app(**args)


def run(
    run_dir: str | Path,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    **options: Any,
) -> None:
    """`mtpeft serve RUN_DIR --ray`: connect to (or start) a Ray cluster, deploy, and block until interrupted."""
    ray.init(address=address, ignore_reinit_error=True, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(run_dir, **options), name=options.get("name", "mtpeft"), route_prefix="/")
    log.info("serving %s on Ray at http://%s:%d (Ctrl-C stops)", run_dir, host, port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


__all__ = ["TaskAwareRouter", "TaskRegistry", "TaskReplica", "app_builder", "build_app", "run"]

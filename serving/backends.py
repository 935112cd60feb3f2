"""Backends: what the engine serves with. Both implement `Backend`, the one interface the engine and the app use.

- `TorchBackend`: a `MultiTaskModel` (CPU or CUDA; the kernels dispatch on the device) with an `AdapterStore`;
  each image runs only the tasks it asked for, images asking for several tasks share their backbone prefix. Tasks
  and ensembles are loaded, replaced and unloaded live.
- `OnnxBackend`: an exported multi-task graph on ONNX Runtime (`OnnxRunner`); the graph computes every task (and
  ensemble) it holds for every image, the engine keeps the requested ones. Its tasks are fixed (re-export to change
  them): admin changes answer 409 Conflict.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import Conflict, NotFound, Unprocessable
from .images import Preprocess
from .metrics import Metrics
from .store import AdapterStore

#: `run_in_worker(fn, *args)`: run `fn(*args)` on the engine's worker thread, from the event loop.
RunInWorker = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class TaskFormat:
    """What formats one task's results in a batch.

    Attributes:
        kind: The form of its results (`HeadConfig.output_kind`): what the JSON looks like.
        class_names: Names of its classes (None: labels only).
        version: The task version that computes the batch.
    """

    kind: str
    class_names: list[str] | None
    version: int


class Backend(Protocol):
    """What the engine serves with: the served tasks, admission of requests, and batches.

    `run` is called on the engine's worker thread only (the server's one torch thread, see `engine`); everything
    else on the event loop. For each batch the engine calls `prepare` with the batch's tasks and, inside it, `run`
    on the worker; a request's tasks are `acquire`d when it is accepted and `release`d when it is answered.

    Attributes:
        name: The backend's name ("torch", "onnx"), in `/v1/tasks` and the OIP platform.
        preprocess: Input size and normalisation of the served model.
        wise: Whether requests may ask for a WiSE `alpha` (per-call weight-space interpolation).
    """

    name: str
    preprocess: Preprocess
    wise: bool

    @property
    def max_tasks(self) -> int | None:
        """Most distinct tasks one batch may use (None: no cap), counted by `footprint`; the batcher leaves a
        request that would pass it for the next batch."""
        ...

    def footprint(self, tasks: Iterable[str]) -> list[str]:
        """The tasks that run for `tasks` (served names, all admitted): an ensemble's members in its place."""
        ...

    def bind(self, run_in_worker: RunInWorker, metrics: Metrics) -> None:
        """Wire in the engine (called once, by `Engine.__init__`): where changes to the model run, where to count
        task loads, evictions and resident tasks."""
        ...

    def served_tasks(self) -> dict[str, dict[str, Any]]:
        """Per served task, its info (`name`, `head`, `class_names`, `version`, ...), as `/v1/tasks` lists it."""
        ...

    def acquire(self, tasks: list[str]) -> None:
        """Admit a request for `tasks`, counted until `release`.

        Raises:
            NotFound: A task is not served (404).
            BadRequest: More tasks than one batch may use (400).
        """
        ...

    def release(self, tasks: list[str]) -> None:
        """The request for `tasks` admitted by `acquire` is answered."""
        ...

    def prepare(self, tasks: list[str]) -> AbstractAsyncContextManager[dict[str, TaskFormat]]:
        """Make a batch's (distinct) tasks ready to run and keep them as they are until the context exits (the
        batch runs inside it); yields per task what formats its results."""
        ...

    def run(
        self, images: torch.Tensor, tasks: list[list[str]], wise: list[tuple[float | None, str | None]] | None = None
    ) -> list[dict[str, dict[str, Any]]]:
        """On the worker thread: the raw results (CPU tensors) of each image's tasks. `images`: (N, 3, H, W)
        normalised at `preprocess.size`; `tasks[i]`: the tasks of image i; `wise[i]`: its (alpha, reference)."""
        ...

    def check_changeable(self) -> None:
        """Raise `Conflict` (409) now if the served tasks cannot change (before an admin request is read)."""
        ...

    async def load(self, name: str | None, path: object) -> dict[str, Any]:
        """Load or replace a task live from a folder (`path`, as the admin request gave it) under `name` (default:
        its saved name); returns its info. Raises `BadRequest` for a bad folder, `Conflict` if tasks are fixed."""
        ...

    async def unload(self, name: str) -> None:
        """Stop serving a task. Raises `NotFound` for an unknown task, `Conflict` if tasks are fixed."""
        ...

    def describe(self) -> dict[str, Any]:
        """What serves (backend name, device or providers, ...), merged into `/v1/tasks`."""
        ...


class TorchBackend:
    """A `MultiTaskModel` and the store of its tasks (a `Backend`): tasks load from disk on demand, and are loaded,
    replaced and unloaded live through the admin API.

    Args:
        model: The model; moved to `device` and put in eval mode.
        store: The adapter store managing `model`'s tasks.
        preprocess: Input size and normalisation of the served model.
        device: "cpu", "cuda", ... (default: CUDA if available).
    """

    name = "torch"
    wise = True

    def __init__(self, model: Any, store: AdapterStore, preprocess: Preprocess, device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.store = store
        self.preprocess = preprocess
        self._count_resident: Callable[[], None] = lambda: None

    @property
    def max_tasks(self) -> int | None:
        return self.store.max_resident

    def footprint(self, tasks: Iterable[str]) -> list[str]:
        return self.store.footprint(tasks)

    def bind(self, run_in_worker: RunInWorker, metrics: Metrics) -> None:
        def loaded() -> None:
            metrics.task_loads.inc()
            metrics.tasks_resident.set(self.store.resident_count())

        self.store.run_in_worker = run_in_worker
        self.store.on_load = loaded
        self.store.on_evict = metrics.task_evictions.inc
        self._count_resident = lambda: metrics.tasks_resident.set(self.store.resident_count())
        self._count_resident()

    def served_tasks(self) -> dict[str, dict[str, Any]]:
        return {n: e.info() for n, e in self.store.entries.items() if not e.unloading}

    def acquire(self, tasks: list[str]) -> None:
        self.store.acquire(tasks)

    def release(self, tasks: list[str]) -> None:
        self.store.release(tasks)

    @contextlib.asynccontextmanager
    async def prepare(self, tasks: list[str]) -> AsyncIterator[dict[str, TaskFormat]]:
        """Loads the tasks that are not in the model, and holds the store's lock (no admin change, no eviction)
        until the batch is done."""
        async with self.store.lock:
            await self.store.make_resident(tasks)
            self._count_resident()
            # read under the lock, so a result is formatted by the head that made it
            entries = self.store.entries
            yield {t: TaskFormat(entries[t].head, entries[t].class_names, entries[t].version) for t in tasks}

    def run(
        self, images: torch.Tensor, tasks: list[list[str]], wise: list[tuple[float | None, str | None]] | None = None
    ) -> list[dict[str, dict[str, Any]]]:
        alpha = [a for a, _ in wise] if wise else None
        reference = [r for _, r in wise] if wise else None
        try:
            with torch.inference_mode():
                results = self.model.predict_each(images.to(self.device, non_blocking=True), tasks, alpha, reference)
        except ValueError as e:  # a WiSE request the tasks cannot take (a method without WiSE form, a bad reference)
            if wise and any(a is not None for a in alpha):
                raise Unprocessable(str(e)) from e
            raise
        return [{t: _to_cpu(r) for t, r in per_image.items()} for per_image in results]

    def check_changeable(self) -> None:
        """Tasks load, change and unload live."""

    async def load(self, name: str | None, path: object) -> dict[str, Any]:
        return (await self.store.load(name, path)).info()

    async def unload(self, name: str) -> None:
        await self.store.unload(name)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": str(self.device), "backbone": self.model.backbone.arch}


class OnnxBackend:
    """An exported multi-task graph (`mtp.export_onnx`) on ONNX Runtime (a `Backend` whose tasks are fixed: admin
    loads and unloads answer 409 Conflict).

    Args:
        path: The `.onnx` file (its sidecar next to it).
        providers: ONNX Runtime providers (default: CUDA if available, then CPU).
        session_options: Optional `onnxruntime.SessionOptions`.
    """

    name = "onnx"
    wise = False  # the graph holds each task at one alpha (export a WiSE task with `add_wise`)
    max_tasks: int | None = None

    def __init__(self, path: str | Path, providers: list[str] | None = None, session_options: Any = None) -> None:
        from multitask_peft.onnx_runner import OnnxRunner, sidecar_kind

        self.runner = OnnxRunner(path, providers, session_options)
        if self.runner.meta.get("adapters"):
            raise ValueError(f"{path} is an adapter graph (one task per run); serve a multi-task export instead")
        self._fixed = f"the {self.name} backend serves the tasks of its graph; re-export to change them"
        inp = self.runner.meta["input"]
        self.preprocess = Preprocess(tuple(inp["size"]), tuple(inp["mean"]), tuple(inp["std"]))
        self.tasks = {
            name: (sidecar_kind(spec), spec["head_config"].get("class_names"))
            for name, spec in self.runner.meta["tasks"].items()
        }
        self.ensembles = {n: spec["ensemble"] for n, spec in self.runner.meta["tasks"].items() if "ensemble" in spec}
        self._classes = {n: spec["head_config"].get("num_classes") for n, spec in self.runner.meta["tasks"].items()}

    def bind(self, run_in_worker: RunInWorker, metrics: Metrics) -> None:
        """Nothing to wire: the graph's tasks never change."""

    def footprint(self, tasks: Iterable[str]) -> list[str]:
        """(The graph runs every task it holds anyway.)"""
        return list(dict.fromkeys(tasks))

    def served_tasks(self) -> dict[str, dict[str, Any]]:
        served = {
            n: {"name": n, "head": h, "class_names": c, "num_classes": self._classes.get(n), "version": 1}
            for n, (h, c) in self.tasks.items()
        }
        for name, ensemble in self.ensembles.items():  # computed in the graph from its members' outputs
            served[name]["ensemble"] = ensemble
        return served

    def acquire(self, tasks: list[str]) -> None:
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise NotFound(f"unknown task(s) {unknown}; served tasks: {list(self.tasks)}")

    def release(self, tasks: list[str]) -> None:
        """Nothing to count: the graph's tasks never leave."""

    @contextlib.asynccontextmanager
    async def prepare(self, tasks: list[str]) -> AsyncIterator[dict[str, TaskFormat]]:
        yield {t: TaskFormat(*self.tasks[t], version=1) for t in tasks}

    def run(
        self, images: torch.Tensor, tasks: list[list[str]], wise: list[tuple[float | None, str | None]] | None = None
    ) -> list[dict[str, dict[str, Any]]]:
        raw = self.runner.run(images)
        wanted = dict.fromkeys(t for names in tasks for t in names)
        decoded = {name: self.runner.decode(name, raw) for name in wanted}
        return [{t: decoded[t][i] for t in names} for i, names in enumerate(tasks)]

    def check_changeable(self) -> None:
        raise Conflict(self._fixed)

    async def load(self, name: str | None, path: object) -> dict[str, Any]:
        raise Conflict(self._fixed)

    async def unload(self, name: str) -> None:
        raise Conflict(self._fixed)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "providers": self.runner.session.get_providers(), "graph": str(self.runner.path)}


def _to_cpu(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in result.items()}

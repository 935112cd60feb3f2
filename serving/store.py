"""The adapter store: which tasks a torch server serves, which of them sit in the model, and their files.

Every task saved under the store's directory (`<root>/<name>/adapter_config.json` + `adapter_model.safetensors`,
as `model.save_task` writes them) is served. At most `max_resident` tasks sit in the model at a time; a request for
another one loads it from disk (least recently used ones make room), transparently. Tasks are loaded, replaced and
unloaded at run time:

- slow work (reading and validating files, building modules) runs off the engine's worker thread, concurrently
  with forward passes;
- every change to the model runs *on* the worker thread, between two batches, so a batch always sees one
  consistent set of tasks: requests already batched finish on the version they started with;
- an unloaded task first stops taking new requests (404), waits until the requests already queued for it are
  done, then leaves the model.

The store's bookkeeping lives on the event loop (single-threaded); only `*_in_worker` functions touch the model.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multitask_peft.config import check_task_name
from multitask_peft.task_io import CONFIG_NAME, WEIGHTS_NAME, read_task_config

from .errors import BadRequest, Conflict, NotFound

log = logging.getLogger("multitask_peft.serving")


@dataclass
class TaskEntry:
    """A served task. `version` counts (re)loads through the admin API; `digest` is the weights' sha256."""

    name: str
    path: Path
    head: str
    class_names: list[str] | None
    version: int = 1
    digest: str = ""
    resident: bool = False
    last_used: float = 0.0
    pending: int = 0  # requests accepted and not yet answered
    unloading: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while nothing is pending

    def __post_init__(self) -> None:
        if not self.pending:
            self.idle.set()

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "head": self.head,
            "class_names": self.class_names,
            "version": self.version,
            "digest": self.digest,
            "resident": self.resident,
        }


def _head_of(config: dict[str, Any]) -> tuple[str, list[str] | None]:
    head = config.get("head") or {}
    names = head.get("class_names")
    return str(head.get("type")), list(names) if names else None


def _digest(path: Path) -> str:
    return hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()


class AdapterStore:
    """Tasks of a `MultiTaskModel` served from the directory `root`.

    Args:
        model: The model (its backbone must be the one the tasks were saved for).
        root: Directory of task folders; admin loads may only name paths inside it.
        max_resident: Most tasks in the model at once (None: no cap).
        run_in_worker: Runs a function on the engine's worker thread and awaits it (set by the engine).
    """

    def __init__(self, model: Any, root: str | Path, max_resident: int | None = None) -> None:
        if max_resident is not None and max_resident < 1:
            raise ValueError(f"max_resident must be >= 1 or None, got {max_resident}")
        self.model = model
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"adapter directory {self.root} does not exist")
        self.max_resident = max_resident
        self.entries: dict[str, TaskEntry] = {}
        self.run_in_worker: Callable[[Callable[[], Any]], Any] | None = None
        self.on_load: Callable[[], None] = lambda: None
        self.on_evict: Callable[[], None] = lambda: None
        #: Held by whoever changes the model or runs a batch: the engine holds it from `make_resident` to the end
        #: of the forward pass, admin changes while they swap tasks. Never held while waiting for requests.
        self.lock = asyncio.Lock()

    # --- start-up ------------------------------------------------------------------------------------------
    def scan(self) -> list[str]:
        """Register every task folder under `root` (not loaded yet); folders that are no task are skipped."""
        found = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not (folder / CONFIG_NAME).is_file():
                continue
            try:
                name = check_task_name(folder.name)
                config = read_task_config(folder)
            except ValueError as e:
                log.warning("skipping %s: %s", folder, e)
                continue
            head, class_names = _head_of(config)
            self.entries[name] = TaskEntry(name, folder, head, class_names)
            found.append(name)
        return found

    def load_initial(self) -> None:
        """Load the first `max_resident` registered tasks (all without a cap) into the model, synchronously."""
        for name in list(self.entries)[: self.max_resident]:
            entry = self.entries[name]
            task = self.model.read_task(entry.path, name)
            entry.digest = _digest(entry.path)
            self.model.attach_task(task)
            entry.resident = True
            self.on_load()

    # --- requests ------------------------------------------------------------------------------------------
    def acquire(self, names: Iterable[str]) -> list[TaskEntry]:
        """Entries of the tasks a new request asks for (raises `NotFound` / `BadRequest`); counted as pending."""
        names = list(names)
        missing = [n for n in names if n not in self.entries or self.entries[n].unloading]
        if missing:
            raise NotFound(f"unknown task(s) {missing}; served tasks: {self.served()}")
        if self.max_resident is not None and len(names) > self.max_resident:
            raise BadRequest(
                f"a request may ask for at most {self.max_resident} tasks (the server's --max-resident), "
                f"got {len(names)}"
            )
        entries = [self.entries[n] for n in names]
        for entry in entries:
            entry.pending += 1
            entry.idle.clear()
        return entries

    def release(self, entries: Iterable[TaskEntry]) -> None:
        for entry in entries:
            entry.pending -= 1
            if entry.pending == 0:
                entry.idle.set()

    def served(self) -> list[str]:
        return [n for n, e in self.entries.items() if not e.unloading]

    async def make_resident(self, names: Iterable[str]) -> None:
        """Load the tasks of a batch that are not in the model (evicting the least recently used others).
        The caller holds `lock` (and keeps it until its forward pass is done)."""
        needed = list(dict.fromkeys(names))
        now = time.monotonic()
        for name in needed:
            self.entries[name].last_used = now
        for name in needed:
            entry = self.entries[name]
            if entry.resident:
                continue
            task, digest = await asyncio.to_thread(self._read, entry.path, name, False)
            await self._in_worker(lambda t=task, e=entry: self._attach_in_worker(t, e, keep=set(needed)))
            entry.digest = digest
            log.info("reloaded task %s from %s", name, entry.path)

    # --- admin ---------------------------------------------------------------------------------------------
    def resolve(self, path: str) -> Path:
        """A task folder named by an admin request: relative to `root` (or absolute), and inside it."""
        if not isinstance(path, str) or not path:
            raise BadRequest("'path' must be a non-empty string: a task folder inside the adapter directory")
        try:
            resolved = (self.root / path).resolve()
        except (OSError, RuntimeError, ValueError) as e:
            raise BadRequest(f"bad path {path!r}: {e}") from e
        if resolved != self.root and self.root not in resolved.parents:
            raise BadRequest(f"path {path!r} is outside the adapter directory {self.root}")
        if not (resolved / CONFIG_NAME).is_file() or not (resolved / WEIGHTS_NAME).is_file():
            raise BadRequest(f"path {path!r} is not a task folder ({CONFIG_NAME} + {WEIGHTS_NAME})")
        return resolved

    async def load(self, name: str | None, path: str) -> TaskEntry:
        """Load (or replace) a task from a folder inside `root`; it is validated before it goes live."""
        folder = self.resolve(path)
        try:
            config = read_task_config(folder)
            name = check_task_name(name if name is not None else config["task"])
        except ValueError as e:
            raise BadRequest(str(e)) from e
        try:  # the slow part, while batches keep running
            task, digest = await asyncio.to_thread(self._read, folder, name, True)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        head, class_names = _head_of(config)
        async with self.lock:
            old = self.entries.get(name)
            if old is not None and old.unloading:
                raise Conflict(f"task {name!r} is being unloaded; load it again once that finished")
            entry = TaskEntry(name, folder, head, class_names, version=old.version + 1 if old else 1, digest=digest)
            entry.last_used = time.monotonic()
            if old is not None:
                entry.pending, entry.idle = old.pending, old.idle  # requests queued for it get the new version

            def swap() -> None:
                if old is not None and old.resident:
                    self.model.remove_task(name)
                    old.resident = False
                self._attach_in_worker(task, entry, keep={name})

            await self._in_worker(swap)
            self.entries[name] = entry
            log.info("loaded task %s v%d from %s", name, entry.version, folder)
            return entry

    async def unload(self, name: str, timeout_s: float = 60.0) -> None:
        """Stop serving a task: new requests get 404 now; it leaves the model once its queued requests are done.
        Its files stay on disk."""
        entry = self.entries.get(name)
        if entry is None or entry.unloading:
            raise NotFound(f"unknown task {name!r}; served tasks: {self.served()}")
        entry.unloading = True
        try:
            await asyncio.wait_for(entry.idle.wait(), timeout_s)  # its queued requests run on (not holding `lock`)
        except TimeoutError:
            entry.unloading = False
            raise Conflict(f"task {name!r} still has {entry.pending} requests after {timeout_s}s") from None
        async with self.lock:

            def remove() -> None:
                if entry.resident:
                    self.model.remove_task(name)
                    entry.resident = False

            await self._in_worker(remove)
            del self.entries[name]
            log.info("unloaded task %s", name)

    # --- helpers -------------------------------------------------------------------------------------------
    def _read(self, folder: Path, name: str, replace: bool) -> tuple[Any, str]:
        task = self.model.read_task(folder, name, replace=replace)
        return task, _digest(folder)

    async def _in_worker(self, fn: Callable[[], Any]) -> Any:
        if self.run_in_worker is None:
            return fn()
        return await self.run_in_worker(fn)

    def _attach_in_worker(self, task: Any, entry: TaskEntry, keep: set[str]) -> None:
        """On the worker: make room (evict least recently used, not in `keep`), then attach."""
        if self.max_resident is not None:
            resident = [e for e in self.entries.values() if e.resident and e.name not in keep]
            count = sum(e.resident for e in self.entries.values())
            for victim in sorted(resident, key=lambda e: e.last_used):
                if count < self.max_resident:
                    break
                self.model.remove_task(victim.name)
                victim.resident = False
                count -= 1
                self.on_evict()
                log.info("evicted task %s (least recently used)", victim.name)
        self.model.attach_task(task)
        entry.resident = True
        self.on_load()

    def resident_count(self) -> int:
        return sum(e.resident for e in self.entries.values())

"""The adapter store: which tasks a torch server serves, which of them sit in the model, and their files.

Every task saved under the store's directory (`<root>/<name>/adapter_config.json` + `adapter_model.safetensors`,
as `model.save_task` writes them) is served. At most `max_resident` tasks sit in the model at a time; a request for
another one loads it from disk (least recently used ones make room), transparently. Tasks are loaded, replaced and
unloaded at run time:

- reading, validating and building a task, and every change to the model, run on the engine's worker thread
  between two batches (the worker is the server's only torch thread, see `engine`), so a batch always sees one
  consistent set of tasks: requests already batched finish on the version they started with; a load costs the
  batches behind it a few milliseconds (a ViT-S LoRA task: about 8 ms);
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitask_peft.config import check_task_name
from multitask_peft.heads import HEADS
from multitask_peft.task_io import CONFIG_NAME, WEIGHTS_NAME, read_task_config

from .errors import BadRequest, Conflict, NotFound

log = logging.getLogger("multitask_peft.serving")


@dataclass
class TaskEntry:
    """A served task. `version` counts (re)loads through the admin API and reloads of changed files; `digest` is
    the weights' sha256."""

    name: str
    path: Path
    head: str  # the form of its results (HeadConfig.output_kind): what the JSON looks like
    class_names: list[str] | None
    version: int = 1
    digest: str = ""
    resident: bool = False
    last_used: float = 0.0
    unloading: bool = False

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
    """(the form of the task's results, `HeadConfig.output_kind`; its class names) from a task config."""
    head = config.get("head")
    if not isinstance(head, dict) or not isinstance(head.get("type"), str):
        raise ValueError("'head' must be an object with a 'type' string")
    names = head.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ValueError("'head.class_names' must be a list of strings")
    return HEADS.get(head["type"]).output_kind, list(names) if names else None


def _digest(path: Path) -> str:
    return hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()


#: What reading a task folder may raise for a bad folder (mapped to 400 / skipped, never a 500).
READ_ERRORS = (ValueError, TypeError, KeyError, AttributeError, OSError, RecursionError, OverflowError)


class AdapterStore:
    """Tasks of a `MultiTaskModel` served from the directory `root`.

    Args:
        model: The model (its backbone must be the one the tasks were saved for).
        root: Directory of task folders; admin loads may only name paths inside it.
        max_resident: Most tasks in the model at once (None: no cap).
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
        # wired to the engine's worker and metrics by `TorchBackend.bind`
        self.run_in_worker: Callable[[Callable[[], Any]], Any] | None = None
        self.on_load: Callable[[], None] = lambda: None
        self.on_evict: Callable[[], None] = lambda: None
        #: Held by whoever changes the model or runs a batch: the engine holds it from `make_resident` to the end
        #: of the forward pass, admin changes while they swap tasks. Never held while waiting for requests.
        self.lock = asyncio.Lock()
        self._admin = asyncio.Lock()  # one admin change (load / replace / unload) at a time
        self._pending: dict[str, int] = {}  # per task name: requests accepted and not yet answered
        self._idle: dict[str, asyncio.Event] = {}  # per task name: set while nothing is pending

    # --- start-up ------------------------------------------------------------------------------------------
    def scan(self, validate: bool = True) -> list[str]:
        """Register every task folder under `root`; folders that are not valid tasks are skipped with a warning.

        With `validate`, each task is read and checked against the model (fingerprint, names, shapes, values)
        now, so a bad folder is found at start-up rather than on its first request; the first `max_resident`
        (all, without a cap) stay loaded in the model.
        """
        found = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not (folder / CONFIG_NAME).is_file():
                continue
            try:
                if self.root not in folder.resolve().parents:
                    raise ValueError(f"it links outside the adapter directory {self.root}")
                name = check_task_name(folder.name)
                head, class_names = _head_of(read_task_config(folder))
                entry = TaskEntry(name, folder, head, class_names)
                if validate:
                    task, entry.digest = self._read(folder, name, False)
                    if self.max_resident is None or len(found) < self.max_resident:
                        self.model.attach_task(task)
                        entry.resident = True
                        self.on_load()
            except READ_ERRORS as e:
                log.warning("skipping task folder %s: %s", folder, e)
                continue
            self.entries[name] = entry
            found.append(name)
        return found

    # --- requests ------------------------------------------------------------------------------------------
    def acquire(self, names: Iterable[str]) -> None:
        """Count a new request for `names` as pending (raises `NotFound` / `BadRequest` first)."""
        names = list(names)
        missing = [n for n in names if n not in self.entries or self.entries[n].unloading]
        if missing:
            raise NotFound(f"unknown task(s) {missing}; served tasks: {self.served()}")
        if self.max_resident is not None and len(names) > self.max_resident:
            raise BadRequest(
                f"a request may ask for at most {self.max_resident} tasks (the server's --max-resident), "
                f"got {len(names)}"
            )
        for name in names:
            self._pending[name] = self._pending.get(name, 0) + 1
            self._idle.setdefault(name, asyncio.Event()).clear()

    def release(self, names: Iterable[str]) -> None:
        for name in names:
            self._pending[name] -= 1
            if self._pending[name] == 0:
                del self._pending[name]
                self._idle.pop(name).set()

    def pending(self, name: str) -> int:
        return self._pending.get(name, 0)

    def served(self) -> list[str]:
        return [n for n, e in self.entries.items() if not e.unloading]

    async def make_resident(self, names: Iterable[str]) -> None:
        """Load the tasks of a batch that are not in the model (evicting the least recently used others).
        The caller holds `lock` (and keeps it until its forward pass is done). A task whose files changed on
        disk since it was loaded comes back as a new version."""
        needed = list(dict.fromkeys(names))
        now = time.monotonic()
        for name in needed:
            self.entries[name].last_used = now
        for name in needed:
            entry = self.entries[name]
            if entry.resident:
                continue

            def reload(entry: TaskEntry = entry) -> None:
                task, digest = self._read(entry.path, entry.name, False)
                if entry.digest and digest != entry.digest:  # (never read before: this is its first version)
                    log.warning("task %s changed on disk since it was loaded: serving the new files", entry.name)
                    entry.version += 1
                entry.digest = digest
                self._attach_in_worker(task, entry, keep=set(needed))

            await self._in_worker(reload)
            log.info("reloaded task %s from %s", name, entry.path)

    # --- admin ---------------------------------------------------------------------------------------------
    def resolve(self, path: object) -> Path:
        """A task folder named by an admin request: relative to `root` (or absolute), and inside it."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise BadRequest("'path' must be a non-empty string: a task folder inside the adapter directory")
        try:
            resolved = (self.root / path).resolve()
            if resolved != self.root and self.root not in resolved.parents:
                raise BadRequest(f"path {path!r} is outside the adapter directory {self.root}")
            is_task = (resolved / CONFIG_NAME).is_file() and (resolved / WEIGHTS_NAME).is_file()
        except (OSError, RuntimeError, ValueError) as e:
            raise BadRequest(f"bad path {path[:200]!r}: {e}") from e
        if not is_task:
            raise BadRequest(f"path {path[:200]!r} is not a task folder ({CONFIG_NAME} + {WEIGHTS_NAME})")
        return resolved

    async def load(self, name: str | None, path: object) -> TaskEntry:
        """Load (or replace) a task from a folder inside `root`; it is validated before it goes live. Requests
        already batched finish on the old version; requests still queued get the new one."""
        folder = self.resolve(path)
        async with self._admin:
            try:
                config = read_task_config(folder)
                name = check_task_name(name if name is not None else config["task"])
                head, class_names = _head_of(config)
                task, digest = await self._in_worker(lambda: self._read(folder, name, True))
            except READ_ERRORS as e:
                raise BadRequest(f"cannot load the task in {folder.name!r}: {e}") from e
            async with self.lock:
                old = self.entries.get(name)
                entry = TaskEntry(name, folder, head, class_names, old.version + 1 if old else 1, digest)
                entry.last_used = time.monotonic()

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
        """Stop serving a task: new requests get 404 now; it leaves the model once the requests already accepted
        for it are answered. Its files stay on disk (a restart serves it again)."""
        async with self._admin:
            entry = self.entries.get(name)
            if entry is None:
                raise NotFound(f"unknown task {name!r}; served tasks: {self.served()}")
            entry.unloading = True
            if self.pending(name):
                try:  # its queued requests run on meanwhile (`lock` is not held here)
                    await asyncio.wait_for(self._idle[name].wait(), timeout_s)
                except asyncio.TimeoutError:
                    entry.unloading = False
                    raise Conflict(
                        f"task {name!r} still has {self.pending(name)} requests after {timeout_s}s"
                    ) from None
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

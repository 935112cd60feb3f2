"""The adapter store: which tasks a torch server serves, which of them sit in the model, and their files.

Every task saved under the store's directory (`<root>/<name>/task_config.json` + `task_weights.safetensors`,
as `model.save_task` writes them; folders with the older names `adapter_config.json` + `adapter_model.safetensors`
too) is served. HF PEFT adapters are not tasks (they have no head): a store skips them with a warning that says to
convert them with `mtpeft import-peft`. At most `max_resident` tasks sit in the model at a time; a request for
another one loads it from disk (least recently used ones make room), transparently. Tasks are loaded, replaced and
unloaded at run time:

- reading, validating and building a task, and every change to the model, run on the engine's worker thread
  between two batches (the worker is the server's only torch thread, see `engine`), so a batch always sees one
  consistent set of tasks: requests already batched finish on the version they started with; a load costs the
  batches behind it a few milliseconds (a ViT-S LoRA task: about 8 ms);
- an unloaded task first stops taking new requests (404), waits until the requests already queued for it are
  done, then leaves the model.

Ensemble folders (`<root>/<name>/ensemble_config.json`, as `model.save_task` writes them for an ensemble) are served
too, by name like tasks. An ensemble takes no slot: a request for it makes its members resident (counted against
`max_resident`), and it joins the model for as long as they stay; evicting or replacing a member takes it out of the
model first. Its members must be served tasks of one label space; a served member cannot be unloaded (409) while
an ensemble uses it.

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
from multitask_peft.ensemble import ENSEMBLE_CONFIG, check_ensemble, is_ensemble_folder, read_ensemble
from multitask_peft.heads import HEADS, HeadConfig
from multitask_peft.task_io import CONFIG_NAME, WEIGHTS_NAME, is_task_folder, read_head, read_task_config, task_files

from .errors import BadRequest, Conflict, NotFound

log = logging.getLogger("multitask_peft.serving")


@dataclass
class TaskEntry:
    """A served task or ensemble. `version` counts (re)loads through the admin API and reloads of changed files;
    `digest` is the weights' sha256 (an ensemble's: its config's). An ensemble has `members` and a `mode`; it is
    `resident` while it is in the model."""

    name: str
    path: Path
    head: str  # the form of its results (HeadConfig.output_kind): what the JSON looks like
    class_names: list[str] | None
    version: int = 1
    digest: str = ""
    resident: bool = False
    last_used: float = 0.0
    unloading: bool = False
    members: tuple[str, ...] = ()
    mode: str | None = None
    num_classes: int | None = None  # (of its head config; None where the head has no classes)

    def info(self) -> dict[str, Any]:
        info = {
            "name": self.name,
            "head": self.head,
            "class_names": self.class_names,
            "num_classes": self.num_classes,
            "version": self.version,
            "digest": self.digest,
            "resident": self.resident,
        }
        if self.members:
            info["ensemble"] = {"members": list(self.members), "mode": self.mode}
        return info


def _head_of(config: dict[str, Any]) -> tuple[str, list[str] | None]:
    """(the form of the task's results, `HeadConfig.output_kind`; its class names) from a task config."""
    head = config.get("head")
    if not isinstance(head, dict) or not isinstance(head.get("type"), str):
        raise ValueError("'head' must be an object with a 'type' string")
    names = head.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ValueError("'head.class_names' must be a list of strings")
    return HEADS.get(head["type"]).output_kind, list(names) if names else None


def _num_classes(config: dict[str, Any]) -> int | None:
    """The head's number of classes from a task config, if it has one."""
    n = config.get("head", {}).get("num_classes")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _digest(path: Path) -> str:
    file = path / ENSEMBLE_CONFIG if is_ensemble_folder(path) else task_files(path)[1]
    return hashlib.sha256(file.read_bytes()).hexdigest()


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
        found, ensemble_folders = [], []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if is_ensemble_folder(folder):
                ensemble_folders.append(folder)  # after the tasks: their members must be known
                continue
            if not task_files(folder)[0].is_file():
                continue
            try:
                if self.root not in folder.resolve().parents:
                    raise ValueError(f"it links outside the adapter directory {self.root}")
                name = check_task_name(folder.name)
                config = read_task_config(folder)
                head, class_names = _head_of(config)
                entry = TaskEntry(name, folder, head, class_names, num_classes=_num_classes(config))
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
        for folder in ensemble_folders:
            try:
                if self.root not in folder.resolve().parents:
                    raise ValueError(f"it links outside the adapter directory {self.root}")
                entry = self._ensemble_entry(folder, check_task_name(folder.name))
                if validate and all(self.entries[m].resident for m in entry.members):
                    self.model.add_ensemble(entry.name, entry.members, entry.mode)
                    entry.resident = True
            except READ_ERRORS as e:
                log.warning("skipping ensemble folder %s: %s", folder, e)
                continue
            self.entries[entry.name] = entry
            found.append(entry.name)
        return found

    # --- requests ------------------------------------------------------------------------------------------
    def acquire(self, names: Iterable[str]) -> None:
        """Count a new request for `names` as pending (raises `NotFound` / `BadRequest` first)."""
        names = list(names)
        missing = [n for n in names if n not in self.entries or self.entries[n].unloading]
        if missing:
            raise NotFound(f"unknown task(s) {missing}; served tasks: {self.served()}")
        needed = self.footprint(names)
        if self.max_resident is not None and len(needed) > self.max_resident:
            raise BadRequest(
                f"a request may ask for at most {self.max_resident} tasks (the server's --max-resident; an ensemble "
                f"counts its members), got {len(needed)}: {sorted(needed)}"
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

    def footprint(self, names: Iterable[str]) -> list[str]:
        """The tasks that must sit in the model to run `names` (an ensemble: its members), each once."""
        return list(dict.fromkeys(m for n in names for m in (self.entries[n].members or (n,))))

    async def make_resident(self, names: Iterable[str]) -> None:
        """Load the tasks of a batch that are not in the model (evicting the least recently used others).
        The caller holds `lock` (and keeps it until its forward pass is done). A task whose files changed on
        disk since it was loaded comes back as a new version."""
        asked = list(dict.fromkeys(names))
        needed = self.footprint(asked)
        now = time.monotonic()
        for name in [*asked, *needed]:
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
        for name in asked:
            entry = self.entries[name]
            if entry.members and not entry.resident:  # its members are resident now

                def join(entry: TaskEntry = entry) -> None:
                    self.model.add_ensemble(entry.name, entry.members, entry.mode)
                    entry.resident = True

                try:
                    await self._in_worker(join)
                except (ValueError, TypeError) as e:
                    raise BadRequest(f"cannot run ensemble {name!r}: {e}") from e

    # --- admin ---------------------------------------------------------------------------------------------
    def resolve(self, path: object) -> Path:
        """A task folder named by an admin request: relative to `root` (or absolute), and inside it."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise BadRequest("'path' must be a non-empty string: a task folder inside the adapter directory")
        try:
            resolved = (self.root / path).resolve()
            if resolved != self.root and self.root not in resolved.parents:
                raise BadRequest(f"path {path!r} is outside the adapter directory {self.root}")
            is_task = is_task_folder(resolved) or is_ensemble_folder(resolved)
        except (OSError, RuntimeError, ValueError) as e:
            raise BadRequest(f"bad path {path[:200]!r}: {e}") from e
        if not is_task:
            raise BadRequest(
                f"path {path[:200]!r} is not a task folder ({CONFIG_NAME} + {WEIGHTS_NAME}) or an ensemble folder "
                f"({ENSEMBLE_CONFIG})"
            )
        return resolved

    async def load(self, name: str | None, path: object) -> TaskEntry:
        """Load (or replace) a task or an ensemble from a folder inside `root`; it is validated before it goes live.
        Requests already batched finish on the old version; requests still queued get the new one."""
        folder = self.resolve(path)
        if is_ensemble_folder(folder):
            return await self._load_ensemble(name, folder)
        async with self._admin:
            try:
                config = read_task_config(folder)
                name = check_task_name(name if name is not None else config["task"])
                self._check_kind(name, ensemble=False)
                head, class_names = _head_of(config)
                task, digest = await self._in_worker(lambda: self._read(folder, name, True))
                self._check_ensembles_keep(name, task.head_config)
            except READ_ERRORS as e:
                raise BadRequest(f"cannot load the task in {folder.name!r}: {e}") from e
            async with self.lock:
                old = self.entries.get(name)
                entry = TaskEntry(name, folder, head, class_names, old.version + 1 if old else 1, digest)
                entry.num_classes = _num_classes(config)
                entry.last_used = time.monotonic()

                def swap() -> None:
                    if old is not None and old.resident:
                        self._leave_ensembles(name)
                        self.model.remove_task(name)
                        old.resident = False
                    self._attach_in_worker(task, entry, keep={name})

                await self._in_worker(swap)
                self.entries[name] = entry
            log.info("loaded task %s v%d from %s", name, entry.version, folder)
            return entry

    async def _load_ensemble(self, name: str | None, folder: Path) -> TaskEntry:
        async with self._admin:
            try:
                name = check_task_name(name if name is not None else read_ensemble(folder)["ensemble"])
                self._check_kind(name, ensemble=True)
                old = self.entries.get(name)
                entry = self._ensemble_entry(folder, name, old.version + 1 if old else 1)
            except READ_ERRORS as e:
                raise BadRequest(f"cannot load the ensemble in {folder.name!r}: {e}") from e
            async with self.lock:
                entry.last_used = time.monotonic()

                def swap() -> None:
                    if old is not None and old.resident:
                        self.model.remove_ensemble(name)  # (joins again, as the new version, on its next request)
                        old.resident = False

                await self._in_worker(swap)
                self.entries[name] = entry
            log.info("loaded ensemble %s v%d from %s", name, entry.version, folder)
            return entry

    async def unload(self, name: str, timeout_s: float = 60.0) -> None:
        """Stop serving a task: new requests get 404 now; it leaves the model once the requests already accepted
        for it are answered. Its files stay on disk (a restart serves it again)."""
        async with self._admin:
            entry = self.entries.get(name)
            if entry is None:
                raise NotFound(f"unknown task {name!r}; served tasks: {self.served()}")
            users = self._ensembles_of(name)
            if users:
                raise Conflict(f"task {name!r} is a member of ensemble(s) {users}; unload them first")
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
                    if entry.resident and entry.members:
                        self.model.remove_ensemble(name)
                        entry.resident = False
                    elif entry.resident:
                        self.model.remove_task(name)
                        entry.resident = False

                await self._in_worker(remove)
                del self.entries[name]
            log.info("unloaded task %s", name)

    # --- ensembles ----------------------------------------------------------------------------------------------
    def _ensemble_entry(self, folder: Path, name: str, version: int = 1) -> TaskEntry:
        """The entry of the ensemble folder `folder` served as `name`, checked against the served tasks (members
        served, one label space); raises a ValueError / TypeError otherwise."""
        config = read_ensemble(folder)
        heads = self._heads()
        ensembles = {n: e.members for n, e in self.entries.items() if e.members and n != name}
        ens = check_ensemble(name, config["members"], config["mode"], heads, ensembles)
        class_names = getattr(ens.head_config, "class_names", None)
        names = list(class_names) if class_names else None
        kind = ens.head_config.output_kind
        entry = TaskEntry(name, folder, kind, names, version, _digest(folder), members=ens.members, mode=ens.mode)
        entry.num_classes = getattr(ens.head_config, "num_classes", None)
        return entry

    def _heads(self, replaced: dict[str, HeadConfig] | None = None) -> dict[str, HeadConfig]:
        """{served task: head config} (read from its folder; `replaced` overrides some)."""
        heads = {n: read_head(read_task_config(e.path)) for n, e in self.entries.items() if not e.members}
        return {**heads, **(replaced or {})}

    def _ensembles_of(self, task: str) -> list[str]:
        """The served ensembles that `task` is a member of."""
        return [n for n, e in self.entries.items() if task in e.members]

    def _check_kind(self, name: str, ensemble: bool) -> None:
        """A task cannot replace an ensemble of its name, nor an ensemble a task."""
        old = self.entries.get(name)
        if old is not None and bool(old.members) != ensemble:
            what = "an ensemble" if old.members else "a task"
            raise ValueError(f"{name!r} is {what} already served; unload it first")

    def _check_ensembles_keep(self, task: str, head: HeadConfig) -> None:
        """The ensembles that use `task` still hold with its new head config (else a ValueError)."""
        users = self._ensembles_of(task)
        if users:
            heads = self._heads({task: head})
            for n in users:
                entry = self.entries[n]
                check_ensemble(n, entry.members, entry.mode, heads, {})

    def _leave_ensembles(self, task: str) -> None:
        """On the worker: the resident ensembles that use `task` leave the model (they join again on request)."""
        for n in self._ensembles_of(task):
            entry = self.entries[n]
            if entry.resident:
                self.model.remove_ensemble(n)
                entry.resident = False

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
            resident = [e for e in self.entries.values() if e.resident and not e.members and e.name not in keep]
            count = self.resident_count()
            for victim in sorted(resident, key=lambda e: e.last_used):
                if count < self.max_resident:
                    break
                self._leave_ensembles(victim.name)
                self.model.remove_task(victim.name)
                victim.resident = False
                count -= 1
                self.on_evict()
                log.info("evicted task %s (least recently used)", victim.name)
        self.model.attach_task(task)
        entry.resident = True
        self.on_load()

    def resident_count(self) -> int:
        """Tasks in the model (ensembles take no room)."""
        return sum(e.resident for e in self.entries.values() if not e.members)

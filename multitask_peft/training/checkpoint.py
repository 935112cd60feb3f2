"""Fault-tolerant checkpoints: a directory per step, written to a temp dir and renamed into place.

Layout::

    out_dir/checkpoints/
        latest                  # name of the newest complete checkpoint (written atomically)
        step_000300/
            tasks/<task>/       # `model.save_task` files (task_config.json + task_weights.safetensors)
            trainer_state.pt    # optimizer, scheduler, RNG, stream positions, step, loss-weight params

A checkpoint directory only ever appears complete (`os.replace` of a finished temp dir), and `latest` only
moves after the directory is in place, so a run killed during a save leaves the previous checkpoint intact.
`trainer_state.pt` holds only tensors and primitives and is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..model import MultiTaskModel
from ..task_io import task_files

STATE_NAME = "trainer_state.pt"
LATEST_NAME = "latest"
_STEP_RE = re.compile(r"step_(\d{6,})")


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_NAME}.tmp"
    tmp.write_text(name + "\n")
    _fsync_file(tmp)
    os.replace(tmp, root / LATEST_NAME)


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: MultiTaskModel,
    tasks: Sequence[str],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, and keep only the newest `keep` checkpoints."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".tmp_{name}_{os.getpid()}"
    for stale in root.glob(".tmp_step_*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        for task in tasks:
            model.save_task(task, tmp / "tasks" / task)
        torch.save(state, tmp / STATE_NAME)
        _fsync_file(tmp / STATE_NAME)
        if final.exists():  # the same step saved again (e.g. a re-run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(root, name)
    _prune(root, keep, protect=name)
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    steps = sorted(list_checkpoints(root.parent), key=lambda p: p.name)
    for path in steps[:-keep]:
        if path.name != protect:
            shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.fullmatch(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(_STEP_RE.fullmatch(p.name).group(1)))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` points to, or the newest complete one if the pointer is missing or stale."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST_NAME
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if _STEP_RE.fullmatch(target.name) and (target / STATE_NAME).is_file():
            return target
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of checkpoint directory `path` (tensors and primitives only: `weights_only=True`)."""
    return torch.load(Path(path) / STATE_NAME, map_location="cpu", weights_only=True)


def load_task_weights(model: MultiTaskModel, path: str | os.PathLike, task: str) -> None:
    """Copy the saved tensors of `task` into the model's existing task modules, in place (bit-exact).

    In place, so the parameter objects (and thus the optimizer's references to them) stay the same.
    """
    weights = task_files(Path(path) / "tasks" / task)[1]  # (older checkpoints: the legacy names)
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no weights for task {task!r} (expected {weights})")
    module = model.task(task)
    device = next(iter(module.state_dict().values())).device
    state = {k: v.to(device) for k, v in load_file(str(weights)).items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path}: weights of task {task!r} do not fit the model's task ({e})") from e

"""Task files, PEFT-style: `adapter_config.json` (what to build) + `adapter_model.safetensors` (its tensors)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .heads import HEADS, HeadConfig
from .peft import METHODS

if TYPE_CHECKING:
    from .model import MultiTaskModel, Task

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "multitask-peft-task"
FORMAT_VERSION = 1


def task_config(model: MultiTaskModel, name: str) -> dict[str, Any]:
    task = model.task(name)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "task": name,
        "backbone": {"arch": model.backbone.arch, "fingerprint": model.backbone.fingerprint},
        "head": {"type": task.head_config.head_type, **task.head_config.to_dict()},
        "peft": [{"method": c.method, **c.to_dict()} for c in task.peft_configs],
        "num_parameters": model.num_parameters(name),
    }


def save_task(model: MultiTaskModel, name: str, path: str | os.PathLike) -> None:
    """Write the task's config and tensors into directory `path` (created if needed; files replaced atomically)."""
    config = task_config(model, name)
    state = {k: v.detach().contiguous().cpu() for k, v in model.task(name).state_dict().items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, lambda f: save_file(state, f, metadata={"format": "pt", "task": name}))
    _atomic_write(out / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))


def _atomic_write(target: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_task_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"{path}: no {CONFIG_NAME}; a task directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f'{file}: not a multitask-peft task config (expected "format": "{FORMAT}")')
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {config.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    for key in ("task", "backbone", "head", "peft"):
        if key not in config:
            raise ValueError(f"{file}: missing key {key!r}")
    return config


def read_task(
    model: MultiTaskModel,
    path: str | os.PathLike,
    name: str | None = None,
    replace: bool = False,
    head: HeadConfig | None = None,
) -> Task:
    """Build, validate and load a saved task for `model` without attaching it (`model.attach_task`).

    With `head`, the task gets that (freshly initialised) head instead of the saved one: only the saved PEFT
    modules are loaded.
    """
    config = read_task_config(path)
    backbone = config["backbone"]
    saved_for = backbone.get("fingerprint") if isinstance(backbone, dict) else backbone
    if saved_for != model.backbone.fingerprint:
        raise ValueError(
            f"{path}: task was saved for backbone {saved_for!r}, this model's backbone is "
            f"{model.backbone.fingerprint!r}; load it into a model built from the same weights"
        )
    new_head = head is not None
    if not new_head:
        head_cfg = dict(config["head"])
        head = HEADS.get(head_cfg.pop("type", None)).from_dict(head_cfg)
    if not isinstance(config["peft"], list):
        raise ValueError(f"{path}: 'peft' must be a list of method entries")
    peft = []
    for entry in config["peft"]:
        if not isinstance(entry, dict) or "method" not in entry:
            raise ValueError(f"{path}: each 'peft' entry needs a 'method' key, got {entry!r}")
        options = {k: v for k, v in entry.items() if k != "method"}
        peft.append(METHODS.get(entry["method"]).from_dict(options))
    task = model.build_task(name or config["task"], head, peft, replace=replace)

    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{path}: no {WEIGHTS_NAME}")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights}: not a valid safetensors file ({e})") from e
    expected = task.state_dict()
    if new_head:  # the saved head's tensors are not this task's
        expected = {k: v for k, v in expected.items() if not k.startswith("head.")}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs task {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{weights} does not match the task built from its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}"
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{weights}: non-finite values in {bad[:5]}")
    task.load_state_dict(state, strict=not new_head)
    return task

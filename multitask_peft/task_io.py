"""Task folders: `task_config.json` (what to build) + `task_weights.safetensors` (its tensors).

Folders written before these names hold the same files under HF PEFT's names (`adapter_config.json` +
`adapter_model.safetensors`), which PEFT could not load; they are still read (`task_files`), and saving a task into
such a folder replaces them. HF PEFT's own adapters are read and written by `peft_format`.

This module reads and writes the files and validates what can be validated without a model (format, the recipe's
configs, tensor values); it knows nothing of the model. `MultiTaskModel.save_task` / `read_task` compose it with
building the task and checking the tensors' names and shapes against it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .heads import HeadConfig, head_from_dict, head_to_dict
from .peft import PeftConfig, recipe_from_list, recipe_to_list
from .version import __version__

CONFIG_NAME = "task_config.json"
WEIGHTS_NAME = "task_weights.safetensors"
#: The names the same files had before (HF PEFT's; still read, never written).
LEGACY_CONFIG_NAME = "adapter_config.json"
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "multitask-peft-task"
FORMAT_VERSION = 1


def task_config(
    name: str,
    backbone: dict[str, str],
    head: HeadConfig,
    peft: Sequence[PeftConfig],
    num_parameters: dict[str, int],
) -> dict[str, Any]:
    """The JSON config of a task folder.

    Args:
        name: The task's name.
        backbone: {"arch": timm name, "fingerprint": hash of the frozen weights} of the backbone it was trained on.
        head: Its head config.
        peft: Its PEFT recipe.
        num_parameters: Trainable parameter counts ({"peft": ..., "head": ...}), for people reading the file.
    """
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "task": name,
        "backbone": dict(backbone),
        "head": head_to_dict(head),
        "peft": recipe_to_list(list(peft)),
        "num_parameters": dict(num_parameters),
    }


def task_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """The (config, weights) files of task folder `path`: `task_config.json` + `task_weights.safetensors`, or the
    legacy names (`adapter_config.json` + `adapter_model.safetensors`) in a folder that has no `task_config.json`
    but has a legacy config (whether that file is ours or an HF PEFT adapter's is for its reader to check)."""
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file() and (folder / LEGACY_CONFIG_NAME).is_file():
        return folder / LEGACY_CONFIG_NAME, folder / LEGACY_WEIGHTS_NAME
    return folder / CONFIG_NAME, folder / WEIGHTS_NAME


def is_task_folder(path: str | os.PathLike) -> bool:
    """Whether folder `path` holds a config and a weights file under either naming (`task_files`)."""
    config, weights = task_files(path)
    return config.is_file() and weights.is_file()


def write_task(path: str | os.PathLike, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Write a task's config and tensors into directory `path` (created if needed; each file replaced atomically).
    Task files of ours under the legacy names in that folder are superseded, and removed."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "task": str(config.get("task", ""))}
    _atomic_write(out / WEIGHTS_NAME, lambda f: save_file(state, f, metadata=metadata))
    _atomic_write(out / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))
    if _holds_our_config(out / LEGACY_CONFIG_NAME):
        (out / LEGACY_CONFIG_NAME).unlink()
        (out / LEGACY_WEIGHTS_NAME).unlink(missing_ok=True)


def _holds_our_config(file: Path) -> bool:
    try:
        return file.is_file() and json.loads(file.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _atomic_write(target: Path, write: Callable[[str], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_task_config(path: str | os.PathLike) -> dict[str, Any]:
    """The validated config of the task folder `path` (format, version, required keys), under either naming."""
    holds = f"a task directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
    return read_versioned_json(
        path, task_files(path)[0].name, holds, "task", FORMAT, FORMAT_VERSION, ("task", "backbone", "head", "peft")
    )


def read_json(file: Path, missing: str) -> Any:
    """The parsed JSON file `file`; a ValueError with `missing` if it is not there, or naming the parse error."""
    if not file.is_file():
        raise ValueError(missing)
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e


def read_versioned_json(
    path: str | os.PathLike, name: str, holds: str, what: str, fmt: str, version: int, required: tuple[str, ...]
) -> dict[str, Any]:
    """JSON file `name` of folder `path`, checked: it exists (else the error says what the folder `holds`), parses,
    has `"format": fmt` and `"format_version": version`, and every `required` key."""
    file = Path(path) / name
    config = read_json(file, f"{path}: no {name}; {holds}")
    if isinstance(config, dict) and "peft_type" in config and config.get("format") != fmt:
        raise ValueError(
            f"{file}: an HF PEFT adapter (peft_type {config['peft_type']!r}), not a multitask-peft {what} config; "
            "load it with model.load_task(path, head=...) or convert it with `mtpeft import-peft`"
        )
    if not isinstance(config, dict) or config.get("format") != fmt:
        raise ValueError(f'{file}: not a multitask-peft {what} config (expected "format": "{fmt}")')
    if config.get("format_version") != version:
        raise ValueError(f"{file}: format_version {config.get('format_version')!r}; this version reads {version}")
    for key in required:
        if key not in config:
            raise ValueError(f"{file}: missing key {key!r}")
    return config


def backbone_fingerprint(config: dict[str, Any]) -> object:
    """The fingerprint of the backbone a task was saved for (older files store it directly under "backbone")."""
    backbone = config["backbone"]
    return backbone.get("fingerprint") if isinstance(backbone, dict) else backbone


def read_head(config: dict[str, Any]) -> HeadConfig:
    """The head config a task config describes (strict: unknown options are errors)."""
    return head_from_dict(config["head"])


def read_peft(config: dict[str, Any], path: str | os.PathLike) -> list[PeftConfig]:
    """The PEFT method configs a task config describes (strict: unknown options are errors)."""
    try:
        return recipe_from_list(config["peft"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the task folder `path` (`check_tensors` validates them against the task they are for)."""
    weights = task_files(path)[1]
    if not weights.is_file():
        raise ValueError(f"{path}: no {weights.name}")
    return read_safetensors(weights)


def read_safetensors(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (never a pickle); a broken file is a ValueError naming it."""
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights}: not a valid safetensors file ({e})") from e
    return state


def check_tensors(path: str | os.PathLike, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Raise unless the file's tensors have exactly the names and shapes of the task built from its config, and
    every floating-point value is finite."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs task {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{task_files(path)[1]} does not match the task built from its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}"
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{task_files(path)[1]}: non-finite values in {bad[:5]}")

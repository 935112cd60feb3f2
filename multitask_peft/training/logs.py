"""Run logs: JSON lines (`log.jsonl`) and TensorBoard scalars."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any


class RunLogger:
    """Appends one JSON object per record to `out_dir/log.jsonl`; mirrors numbers to TensorBoard (`out_dir/tb`).

    Args:
        out_dir: Run directory.
        tensorboard: Also write TensorBoard scalars (skipped with a warning if `tensorboard` is missing).
        resume_step: On resume, records after this step (written by the killed run after its last
            checkpoint) are dropped, so the log reads like one uninterrupted run.
    """

    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(out_dir) / "log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - depends on the environment
                warnings.warn(
                    "tensorboard is not installed (pip install 'multitask-peft[tensorboard]'); writing log.jsonl only",
                    stacklevel=2,
                )
            else:
                self._tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=resume_step)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_log(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of `out_dir/log.jsonl`."""
    path = Path(out_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

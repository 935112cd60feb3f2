"""A run directory, as `mtpeft train` writes it and `mtpeft eval | tasks | export | serve` read it.

```
RUN_DIR/
  config.yaml        the run config (`RunConfig.to_dict()`)
  tasks/<name>/      one task folder per trained task (`model.save_task`), one ensemble folder per ensemble
  model.onnx         the multi-task ONNX graph (+ model.json), when the run exports one
  report.md, report.html, figures/, report.json, log.jsonl, checkpoints/
  robustness.json, robustness.md, figures/robustness.png    `mtpeft eval RUN --shift corruptions`
```

    run = RunDirectory("runs/demo")
    model = run.load_model()                 # the backbone with every trained task
    spec = run.input_spec()                  # what the served model takes: side, mean, std
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .run_config import RunConfig, add_ensembles, build_backbone, load_run_config

if TYPE_CHECKING:
    from .model import MultiTaskModel

CONFIG_FILE = "config.yaml"
TASKS_DIR = "tasks"
ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class InputSpec:
    """The input of a run's model: images resized to `size` (height, width), scaled to [0, 1], then normalised
    per channel with `mean` and `std`."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class RunDirectory:
    """A run directory: its config (read and validated here), its task folders and its ONNX graph.

    Args:
        path: The directory; it must hold `config.yaml`.

    Raises:
        ValueError: `path` is not a run directory, or its config is not valid.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / CONFIG_FILE).is_file():
            raise ValueError(
                f"{self.path} is not a run directory (no {CONFIG_FILE}); train one with `mtpeft train CONFIG`"
            )
        self.config: RunConfig = load_run_config(self.path / CONFIG_FILE)

    @classmethod
    def create(cls, path: str | os.PathLike, config: RunConfig) -> RunDirectory:
        """Make `path` a run directory of `config` (writes `config.yaml`; other files are left as they are)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return cls(path)

    @property
    def tasks_dir(self) -> Path:
        """The folder of the trained tasks (`tasks/<name>/`), the adapter directory of a server."""
        return self.path / TASKS_DIR

    @property
    def onnx_path(self) -> Path:
        """Where the run's multi-task ONNX graph is (or goes); its JSON sidecar sits next to it."""
        return self.path / ONNX_FILE

    def input_spec(self, model: MultiTaskModel | None = None) -> InputSpec:
        """What the run's model is served on: the largest task image size, normalised as its backbone's weights
        expect (from `model`, the run's model, else from the run's backbone built here)."""
        backbone = (model if model is not None else self.build_backbone()).data_config
        return InputSpec(self.config.input_size(backbone), backbone.mean, backbone.std)

    def build_backbone(self) -> MultiTaskModel:
        """The run's model without tasks (random weights come from the run's seed, as in training)."""
        return build_backbone(self.config)

    def load_model(self) -> MultiTaskModel:
        """The run's model with every task of its config loaded from `tasks/`, and the ensembles of its config.

        Raises:
            ValueError: A task of the config has no task folder (the run did not finish).
        """
        missing = [name for name in self.config.tasks if not (self.tasks_dir / name).is_dir()]
        if missing:
            raise ValueError(
                f"{self.path}: no trained task folder for {missing} in {self.tasks_dir} (the run did not finish); "
                f"finish it with `mtpeft train CONFIG --resume`"
            )
        model = self.build_backbone()
        for name in self.config.tasks:
            model.load_task(self.tasks_dir / name)
        add_ensembles(model, self.config)
        return model

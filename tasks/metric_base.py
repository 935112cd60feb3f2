"""Pieces the output kinds' metrics share: a metric made of named torchmetrics objects, batch checks.

The metrics themselves live with their output kinds (`classification_output`, `detection_output`,
`segmentation_output`); `metrics.py` gathers them and picks one per head config (`metric_for`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from multitask_peft.outputs import TaskMetric

Results = Sequence[Mapping[str, Any]]
Sized = Sequence[Any] | torch.Tensor


class MetricDict(TaskMetric):
    """A task metric made of named torchmetrics objects (`self.metrics`), computed and reset together."""

    metrics: dict[str, Any]

    def update_all(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predictions and targets (as torchmetrics takes them) to every metric."""
        for metric in self.metrics.values():
            metric.update(preds, target)

    def compute(self) -> dict[str, float]:
        return {name: float(metric.compute()) for name, metric in self.metrics.items()}

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


def check_batch(owner: str, results: Results, targets: Sized) -> None:
    """A ValueError unless there is one target per result."""
    if len(results) != len(targets):
        raise ValueError(f"{owner}.update: {len(results)} results but {len(targets)} targets; they must pair up")


def as_cpu(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """`value` as a detached CPU tensor of `dtype`."""
    return torch.as_tensor(value).detach().to(device="cpu", dtype=dtype)

"""Task metrics on top of torchmetrics: they consume `model.predict` result dicts and the shared target conventions.

Each metric belongs to its output kind (`classification_output`, `detection_output`, `segmentation_output`), which
builds it for a head config; `metric_for` picks the one of a task. Nothing is hand-written arithmetic: top-k
accuracy is torchmetrics' `MulticlassAccuracy`, COCO mAP is torchmetrics' `MeanAveragePrecision` with the
pycocotools backend (COCOeval, 101-point interpolation), mIoU and pixel accuracy are torchmetrics'
`MulticlassJaccardIndex` / `MulticlassAccuracy` with `ignore_index`. The metric classes only convert result dicts
and targets into what those metrics take, and return plain floats.

torchmetrics is imported when a metric is built, not when `multitask_peft.tasks` is imported (it adds seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from multitask_peft.heads import HeadConfig
from multitask_peft.outputs import OUTPUT_KINDS, TaskMetric

from .classification_output import ClassificationMetric
from .detection_output import DetectionMetric
from .segmentation_output import SegmentationMetric

MetricFactory = Callable[[HeadConfig], TaskMetric]


class _KindMetrics:
    """Output kind name -> factory of its metric from a head config, for the registered kinds that have one (a
    read-only view of `OUTPUT_KINDS`: a kind brings its metric when it registers)."""

    kind = "metric"

    def names(self) -> list[str]:
        return [name for name in OUTPUT_KINDS if OUTPUT_KINDS.get(name).primary_metric is not None]

    def get(self, name: str) -> MetricFactory:
        if name not in self:
            raise ValueError(f"Unknown metric {name!r}; available: {', '.join(sorted(self.names()))}")
        return OUTPUT_KINDS.get(name).metric

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


#: Output kind -> factory building the metric from the head config.
METRICS = _KindMetrics()


def metric_for(head_config: HeadConfig) -> TaskMetric:
    """A fresh metric for a task's head config, picked by the form of its results (`output_kind`)."""
    kind = getattr(head_config, "output_kind", "")
    if kind not in METRICS:
        raise ValueError(
            f"no metric for {kind!r} results (head config {type(head_config).__name__}); "
            f"metrics exist for: {', '.join(METRICS.names())}"
        )
    return METRICS.get(kind)(head_config)


__all__ = [
    "METRICS",
    "ClassificationMetric",
    "DetectionMetric",
    "SegmentationMetric",
    "TaskMetric",
    "metric_for",
]

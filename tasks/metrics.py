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

from multitask_peft.heads import HeadConfig
from multitask_peft.outputs import OUTPUT_KINDS, TaskMetric

from .classification_output import ClassificationMetric
from .detection_output import DetectionMetric
from .segmentation_output import SegmentationMetric


def metric_for(head_config: HeadConfig) -> TaskMetric:
    """A fresh metric for a task's head config, picked by the form of its results (`output_kind`)."""
    kind = getattr(head_config, "output_kind", "")
    if kind not in OUTPUT_KINDS or OUTPUT_KINDS.get(kind).primary_metric is None:
        measured = [name for name in OUTPUT_KINDS if OUTPUT_KINDS.get(name).primary_metric is not None]
        raise ValueError(
            f"no metric for {kind!r} results (head config {type(head_config).__name__}); "
            f"metrics exist for: {', '.join(measured)}"
        )
    return OUTPUT_KINDS.get(kind).metric(head_config)


__all__ = [
    "ClassificationMetric",
    "DetectionMetric",
    "SegmentationMetric",
    "TaskMetric",
    "metric_for",
]

"""Task metrics on top of torchmetrics: they consume `model.predict` result dicts and the shared target conventions.

Nothing here is hand-written arithmetic: top-k accuracy is torchmetrics' `MulticlassAccuracy`, COCO mAP is
torchmetrics' `MeanAveragePrecision` with the pycocotools backend (COCOeval, 101-point interpolation), mIoU and
pixel accuracy are torchmetrics' `MulticlassJaccardIndex` / `MulticlassAccuracy` with `ignore_index`. The classes
here only convert result dicts and targets into what those metrics take, and return plain floats.

torchmetrics is imported when a metric is built, not when `multitask_peft.tasks` is imported (it adds seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from multitask_peft.config import check_positive_int
from multitask_peft.heads import HeadConfig
from multitask_peft.registry import Registry

Results = Sequence[Mapping[str, Any]]
Sized = Sequence[Any] | torch.Tensor


class TaskMetric:
    """Accumulates one task's metric over batches: `update(results, targets)` per batch, then `compute()`."""

    def update(self, results: Results, targets: Any) -> None:
        """Add one batch: `results` as returned by `model.predict(...)[task]`, `targets` as the task's convention."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """The metric values over every batch seen since the last `reset`, as plain floats."""
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class _MetricDict(TaskMetric):
    """A task metric made of named torchmetrics objects (`self.metrics`), computed and reset together."""

    metrics: dict[str, Any]

    def compute(self) -> dict[str, float]:
        return {name: float(metric.compute()) for name, metric in self.metrics.items()}

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


def _check_batch(owner: str, results: Results, targets: Sized) -> None:
    if len(results) != len(targets):
        raise ValueError(f"{owner}.update: {len(results)} results but {len(targets)} targets; they must pair up")


class ClassificationMetric(_MetricDict):
    """Top-k accuracy (torchmetrics `MulticlassAccuracy(top_k=k, average="micro")`) from result logits.

    Keys are `top{k}` for each requested k. A k above `num_classes` is computed as top-`num_classes` (which is
    1.0, as a true top-k accuracy is when there are at most k classes), so the keys stay the same for any
    number of classes.

    Args:
        num_classes: Number of classes of the head.
        top_k: The k values to report.
    """

    def __init__(self, num_classes: int, top_k: Sequence[int] = (1, 5)) -> None:
        from torchmetrics.classification import MulticlassAccuracy

        check_positive_int("ClassificationMetric", "num_classes", num_classes)
        if not top_k:
            raise ValueError("ClassificationMetric: `top_k` should name at least one k, e.g. (1, 5); got ()")
        for k in top_k:
            check_positive_int("ClassificationMetric", "top_k", k)
        self.num_classes = num_classes
        self.metrics = {
            f"top{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro") for k in top_k
        }

    def update(self, results: Results, targets: torch.Tensor | Sequence[int]) -> None:
        """Args: results: [{"logits": (C,), ...}] per image; targets: int class index per image."""
        _check_batch("ClassificationMetric", results, targets)
        if not results:
            return
        if any("logits" not in r for r in results):
            raise ValueError(f"ClassificationMetric.update: results need 'logits'; got keys {sorted(results[0])}")
        logits = torch.stack([torch.as_tensor(r["logits"]).detach().float().cpu() for r in results])  # (N, C)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"ClassificationMetric.update: logits of shape {tuple(logits.shape)}; expected (N, {self.num_classes})"
            )
        target = torch.as_tensor(targets, dtype=torch.int64).cpu().reshape(-1)  # (N,)
        for metric in self.metrics.values():
            metric.update(logits, target)


class DetectionMetric(TaskMetric):
    """COCO box mAP (torchmetrics `MeanAveragePrecision`, pycocotools backend: COCOeval with 101-point interpolation).

    Targets per image are {"boxes": (K, 4) xyxy, "labels": (K,), "iscrowd": (K,) optional}; crowd boxes go to
    COCOeval as `iscrowd`, so they are ignore regions (unmatched crowd boxes cost no recall, detections matched to
    them are neither true nor false positives). Keys: "map" (IoU 0.50:0.95), "map50", "map75", "map_small",
    "map_medium", "map_large" (COCO area ranges; -1.0 where no ground truth falls in that range, as in COCOeval)
    and "mar_100". At most 100 detections per image (the highest scoring) count, as in COCO. With no ground
    truth at all every value is -1.0.
    """

    def __init__(self) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def update(self, results: Results, targets: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Args: results: [{"boxes", "scores", "labels"}] per image; targets: [{"boxes", "labels", "iscrowd"?}]."""
        _check_batch("DetectionMetric", results, targets)
        preds = []
        for r in results:
            missing = {"boxes", "scores", "labels"} - set(r)
            if missing:
                raise ValueError(f"DetectionMetric.update: results lack {sorted(missing)}; got keys {sorted(r)}")
            preds.append(
                {
                    "boxes": _cpu(r["boxes"], torch.float32).reshape(-1, 4),  # (K, 4)
                    "scores": _cpu(r["scores"], torch.float32).reshape(-1),
                    "labels": _cpu(r["labels"], torch.int64).reshape(-1),
                }
            )
        gts = []
        for t in targets:
            if not isinstance(t, Mapping) or "boxes" not in t or "labels" not in t:
                raise ValueError(
                    "DetectionMetric.update: each target must be a dict with 'boxes' and 'labels' "
                    f"(and optionally 'iscrowd'); got {type(t).__name__}"
                )
            boxes = _cpu(t["boxes"], torch.float32).reshape(-1, 4)  # (K, 4)
            crowd = t.get("iscrowd")
            crowd = torch.zeros(len(boxes), dtype=torch.int64) if crowd is None else _cpu(crowd, torch.int64)
            gts.append({"boxes": boxes, "labels": _cpu(t["labels"], torch.int64).reshape(-1), "iscrowd": crowd})
        self.metric.update(preds, gts)

    def compute(self) -> dict[str, float]:
        out = self.metric.compute()
        keys = {
            "map": "map",
            "map50": "map_50",
            "map75": "map_75",
            "map_small": "map_small",
            "map_medium": "map_medium",
            "map_large": "map_large",
            "mar_100": "mar_100",
        }
        return {name: float(out[key]) for name, key in keys.items()}

    def reset(self) -> None:
        self.metric.reset()


class SegmentationMetric(_MetricDict):
    """Semantic segmentation mIoU and pixel accuracy, pixels labelled `ignore_index` left out.

    "miou" is torchmetrics `MulticlassJaccardIndex(average="macro")` over the confusion matrix accumulated over
    the whole dataset: the mean IoU over the classes *present*, i.e. classes that occur in the ground truth or
    in the predictions (on non-ignored pixels) at least once; a class that is predicted but never in the ground
    truth counts with IoU 0, a class absent from both is left out of the mean (as mmsegmentation's nan-mean).
    "pixel_acc" is `MulticlassAccuracy(average="micro")`: correct pixels / non-ignored pixels.

    Args:
        num_classes: Number of classes of the head.
        ignore_index: Target value of pixels to ignore.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        check_positive_int("SegmentationMetric", "num_classes", num_classes)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or 0 <= ignore_index < num_classes:
            raise ValueError(
                f"SegmentationMetric: `ignore_index` should be an int outside [0, {num_classes}) "
                f"but the value passed is {ignore_index!r}"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.metrics = {
            "miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
            "pixel_acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
        }

    def update(self, results: Results, targets: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Args: results: [{"mask": (H, W)}] per image; targets: (N, H, W) or a list of (H, W) class-id maps."""
        _check_batch("SegmentationMetric", results, targets)
        if not len(results):
            return
        preds, gts = [], []
        for i, (r, t) in enumerate(zip(results, targets)):
            if "mask" not in r:
                raise ValueError(f"SegmentationMetric.update: results need 'mask'; got keys {sorted(r)}")
            mask, target = _cpu(r["mask"], torch.int64), _cpu(t, torch.int64)
            if mask.shape != target.shape or mask.ndim != 2:
                raise ValueError(
                    f"SegmentationMetric.update: image {i} has a predicted mask of shape {tuple(mask.shape)} "
                    f"and a target of shape {tuple(target.shape)}; both must be the same (H, W)"
                )
            preds.append(mask.reshape(-1))  # (H * W,)
            gts.append(target.reshape(-1))
        pred, gt = torch.cat(preds), torch.cat(gts)
        bad = (pred < 0) | (pred >= self.num_classes)
        if bad.any():
            raise ValueError(
                f"SegmentationMetric.update: predicted class {int(pred[bad][0])} outside [0, {self.num_classes})"
            )
        bad = ((gt < 0) | (gt >= self.num_classes)) & (gt != self.ignore_index)
        if bad.any():
            raise ValueError(
                f"SegmentationMetric.update: target class {int(gt[bad][0])} outside [0, {self.num_classes}) "
                f"and not the ignore index {self.ignore_index}"
            )
        for metric in self.metrics.values():
            metric.update(pred, gt)


def _cpu(value: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(value).detach().to(device="cpu", dtype=dtype)


# head type -> factory building the metric from the head config
METRICS: Registry[Callable[[HeadConfig], TaskMetric]] = Registry("metric")
METRICS.register("classification")(lambda cfg: ClassificationMetric(cfg.num_classes))
METRICS.register("detection")(lambda cfg: DetectionMetric())
METRICS.register("segmentation")(
    lambda cfg: SegmentationMetric(cfg.num_classes, ignore_index=getattr(cfg, "ignore_index", 255))
)


def metric_for(head_config: HeadConfig) -> TaskMetric:
    """A fresh metric for a task's head config, picked by the form of its results (`output_kind`)."""
    kind = getattr(head_config, "output_kind", "")
    if kind not in METRICS:
        raise ValueError(
            f"no metric for {kind!r} results (head config {type(head_config).__name__}); "
            f"metrics exist for: {', '.join(METRICS.names())}"
        )
    return METRICS.get(kind)(head_config)

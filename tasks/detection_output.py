"""The detection output kind: boxes, scores and labels per image, and the post-processing its heads share.

Tensor form (`export_outputs` of every detection head), padded to K detections per image, best first:
    "boxes": (N, K, 4) float32 xyxy input pixels (0 where padded), "scores": (N, K) float32 (0 where padded),
    "labels": (N, K) int64 (-1 where padded), "num_detections": (N,) int64.
Results: one {"boxes": (k, 4) float32 xyxy input pixels, "scores": (k,) float32, "labels": (k,) int64} per image.

Shared post-processing: `best_detections` (class-wise NMS of a fixed number of candidates per image, then the
best K, padded; traceable) on the custom op `nms_keep`, whose ONNX form (one batched `NonMaxSuppression`) is here
too (`onnx_translations`); `pad_detections` pads detections made image by image (mmdet's `predict_by_feat`).

No `from __future__ import annotations` in this module: the ONNX exporter reads the onnxscript type annotations of
`nms_keep`'s translation at run time.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torchvision.ops import batched_nms

from multitask_peft.heads import HeadConfig
from multitask_peft.outputs import (
    JsonContext,
    OutputKind,
    Result,
    TaskMetric,
    TensorSpec,
    register_output_kind,
)

from .metric_base import Results, as_cpu, check_batch

Target = Mapping[str, torch.Tensor]


@torch.library.custom_op("multitask_peft::nms_keep", mutates_args=())
def nms_keep(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float, min_score: float, num_classes: int
) -> torch.Tensor:
    """Class-wise NMS per image of a fixed-size candidate batch: (N, k) bool, True for the candidates kept
    (score > `min_score`, not suppressed by a better box of their image and class with IoU > `iou`).

    Args:
        boxes: (N, k, 4) xyxy. scores: (N, k). labels: (N, k) int64 in [0, num_classes).

    A custom op so that ONNX export can emit one batched `NonMaxSuppression` (`onnx_translations`) instead of an
    NMS over all images at once (quadratic in the batch).
    """
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for i in range(scores.shape[0]):
        index = (scores[i] > min_score).nonzero().flatten()
        kept = batched_nms(boxes[i, index], scores[i, index], labels[i, index], iou)
        keep[i, index[kept]] = True
    return keep


@nms_keep.register_fake
def _(boxes, scores, labels, iou, min_score, num_classes):  # noqa: ANN001, ANN202
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


def onnx_translations() -> dict[Any, Callable[..., Any]]:
    """{op: onnxscript function}: `nms_keep` as one batched NonMaxSuppression (imports onnxscript, the `onnx`
    extra, when called)."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript import BOOL, FLOAT, INT64
    from onnxscript import opset18 as op

    def nms_keep_onnx(
        boxes: FLOAT, scores: FLOAT, labels: INT64, iou: float, min_score: float, num_classes: int
    ) -> BOOL:
        # per-class score planes (N, C, k): a candidate scores in its own class only (0 elsewhere, under min_score)
        onehot = op.OneHot(labels, op.Constant(value_int=num_classes), op.Constant(value_floats=[0.0, 1.0]))
        planes = op.Transpose(op.Mul(onehot, op.Unsqueeze(scores, [-1])), perm=[0, 2, 1])
        k = op.Shape(scores, start=1, end=2)
        selected = op.NonMaxSuppression(
            boxes, planes, k, op.Constant(value_float=iou), op.Constant(value_float=min_score)
        )  # (S, 3): image, class, candidate
        pairs = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # (S, 2): image, candidate
        keep = op.ConstantOfShape(op.Shape(scores), value=ir.tensor(np.array([False])))
        ones = op.Expand(op.Constant(value=ir.tensor(np.array([True]))), op.Shape(pairs, start=0, end=1))
        return op.ScatterND(keep, pairs, ones)

    return {torch.ops.multitask_peft.nms_keep.default: nms_keep_onnx}


def best_detections(
    boxes: torch.Tensor,  # (N, k, 4)
    scores: torch.Tensor,  # (N, k)
    labels: torch.Tensor,  # (N, k) int64
    iou: float,
    min_score: float,
    num_classes: int,
    max_detections: int,
) -> dict[str, torch.Tensor]:
    """Class-wise NMS of fixed-size candidates (scores above `min_score` only), then the best `max_detections` per
    image: the tensor form, K = min(max_detections, k). Traceable (NMS exports as ONNX NonMaxSuppression)."""
    kept = nms_keep(boxes, scores, labels, iou, min_score, num_classes)
    ranked = torch.where(kept & (scores > min_score), scores, torch.full_like(scores, -1.0))
    top, order = ranked.topk(min(max_detections, scores.shape[1]), dim=1)  # (N, K)
    valid = top >= 0
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4)) * valid[..., None]  # (N, K, 4)
    labels = torch.where(valid, labels.gather(1, order), torch.full_like(order, -1))
    return {"boxes": boxes, "scores": top.clamp(min=0.0), "labels": labels, "num_detections": valid.sum(1)}


def pad_detections(
    detections: Sequence[Mapping[str, torch.Tensor]], num_slots: int, device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Per-image detections ({"boxes" (k, 4), "scores" (k,), "labels" (k,)}, best first) -> the tensor form with
    K = `num_slots` (detections beyond it are dropped)."""
    n = len(detections)
    device = detections[0]["boxes"].device if n else device
    boxes = torch.zeros(n, num_slots, 4, dtype=torch.float32, device=device)
    scores = torch.zeros(n, num_slots, dtype=torch.float32, device=device)
    labels = torch.full((n, num_slots), -1, dtype=torch.int64, device=device)
    counts = torch.zeros(n, dtype=torch.int64, device=device)
    for i, det in enumerate(detections):
        k = min(num_slots, len(det["scores"]))
        boxes[i, :k] = det["boxes"][:k].float()
        scores[i, :k] = det["scores"][:k].float()
        labels[i, :k] = det["labels"][:k].long()
        counts[i] = k
    return {"boxes": boxes, "scores": scores, "labels": labels, "num_detections": counts}


def check_detection_targets(
    targets: Sequence[Target], num_images: int, num_classes: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """Validated detection targets for a loss, crowd boxes dropped: [{"boxes": (K, 4) float32 xyxy, "labels": (K,)
    int64}] on `device`, from one {"boxes", "labels", "iscrowd" (optional)} per image."""
    if isinstance(targets, Mapping) or not isinstance(targets, Sequence) or len(targets) != num_images:
        got = f"{type(targets).__name__} of length {len(targets)}" if hasattr(targets, "__len__") else repr(targets)
        raise ValueError(f"detection targets must be a list of {num_images} dicts (one per row), got {got}")
    checked = []
    for i, target in enumerate(targets):
        if not isinstance(target, Mapping) or "boxes" not in target or "labels" not in target:
            raise ValueError(f"detection target {i} must be a dict with 'boxes' and 'labels', got {target!r}")
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device)
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"detection target {i}: 'boxes' must be (K, 4) xyxy, got shape {tuple(boxes.shape)}")
        labels = torch.as_tensor(target["labels"], device=device)
        if labels.dtype.is_floating_point or labels.shape != boxes.shape[:1]:
            raise ValueError(
                f"detection target {i}: 'labels' must be {boxes.shape[0]} integers (one per box), got {labels!r}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"detection target {i}: labels must lie in [0, {num_classes}), got {labels.tolist()}")
        if (boxes[:, 2:] < boxes[:, :2]).any():
            raise ValueError(f"detection target {i}: boxes must be xyxy with x2 >= x1 and y2 >= y1, got {boxes!r}")
        crowd = target.get("iscrowd")
        keep = ~torch.as_tensor(crowd, dtype=torch.bool, device=device).reshape(-1) if crowd is not None else None
        if keep is not None and keep.shape != labels.shape:
            raise ValueError(f"detection target {i}: 'iscrowd' must have one flag per box, got {crowd!r}")
        if keep is not None:
            boxes, labels = boxes[keep], labels[keep]
        checked.append({"boxes": boxes, "labels": labels.long()})
    return checked


class DetectionMetric(TaskMetric):
    """COCO box mAP (torchmetrics `MeanAveragePrecision`, pycocotools backend: COCOeval with 101-point interpolation).

    Targets per image are {"boxes": (K, 4) xyxy, "labels": (K,), "iscrowd": (K,) optional}; crowd boxes go to
    COCOeval as `iscrowd`, so they are ignore regions (unmatched crowd boxes cost no recall, detections matched to
    them are neither true nor false positives). Keys: "map" (IoU 0.50:0.95), "map50", "map75", "map_small",
    "map_medium", "map_large" (COCO area ranges; -1.0 where no ground truth falls in that range, as in COCOeval)
    and "mar_100". At most 100 detections per image (the highest scoring) count, as in COCO. With no ground
    truth at all every value is -1.0.
    """

    KEYS = {
        "map": "map",
        "map50": "map_50",
        "map75": "map_75",
        "map_small": "map_small",
        "map_medium": "map_medium",
        "map_large": "map_large",
        "mar_100": "mar_100",
    }

    def __init__(self) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def update(self, results: Results, targets: Sequence[Target]) -> None:
        """Args: results: [{"boxes", "scores", "labels"}] per image; targets: [{"boxes", "labels", "iscrowd"?}]."""
        check_batch("DetectionMetric", results, targets)
        preds = []
        for r in results:
            missing = {"boxes", "scores", "labels"} - set(r)
            if missing:
                raise ValueError(f"DetectionMetric.update: results lack {sorted(missing)}; got keys {sorted(r)}")
            preds.append(
                {
                    "boxes": as_cpu(r["boxes"], torch.float32).reshape(-1, 4),  # (K, 4)
                    "scores": as_cpu(r["scores"], torch.float32).reshape(-1),
                    "labels": as_cpu(r["labels"], torch.int64).reshape(-1),
                }
            )
        gts = []
        for t in targets:
            if not isinstance(t, Mapping) or "boxes" not in t or "labels" not in t:
                raise ValueError(
                    "DetectionMetric.update: each target must be a dict with 'boxes' and 'labels' "
                    f"(and optionally 'iscrowd'); got {type(t).__name__}"
                )
            boxes = as_cpu(t["boxes"], torch.float32).reshape(-1, 4)  # (K, 4)
            crowd = t.get("iscrowd")
            crowd = torch.zeros(len(boxes), dtype=torch.int64) if crowd is None else as_cpu(crowd, torch.int64)
            gts.append({"boxes": boxes, "labels": as_cpu(t["labels"], torch.int64).reshape(-1), "iscrowd": crowd})
        self.metric.update(preds, gts)

    def compute(self) -> dict[str, float]:
        out = self.metric.compute()
        return {name: float(out[key]) for name, key in self.KEYS.items()}

    def reset(self) -> None:
        self.metric.reset()


#: The tensor form's fields (K: detections per image, padded; `num_detections` of them are real).
_FIELDS = (
    TensorSpec("boxes", torch.float32, (-1, -1, 4)),
    TensorSpec("scores", torch.float32, (-1, -1)),
    TensorSpec("labels", torch.int64, (-1, -1)),
    TensorSpec("num_detections", torch.int64, (-1,)),
)


@register_output_kind("detection")
class DetectionOutput(OutputKind):
    """Boxes in input pixels, scores and labels, best first; JSON boxes rescaled to the sent image."""

    primary_metric = "map50"

    def tensor_spec(self, head_config: HeadConfig, image_size: tuple[int, int]) -> tuple[TensorSpec, ...]:
        return _FIELDS

    def decode(self, tensors: Mapping[str, torch.Tensor]) -> list[Result]:
        boxes, scores, labels = tensors["boxes"], tensors["scores"], tensors["labels"]  # (N, K, 4), (N, K), (N, K)
        counts = tensors["num_detections"].tolist()
        return [{"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]} for i, n in enumerate(counts)]

    def oip_fields(self, num_classes: int | None) -> tuple[TensorSpec, ...]:
        """As the tensor form; K is the most detections of an image in the batch (the others padded: scores 0,
        labels -1), `num_detections` says how many are real."""
        return _FIELDS

    def to_oip(self, results: Sequence[Mapping[str, Any]], contexts: Sequence[JsonContext]) -> dict[str, torch.Tensor]:
        kept = [_kept(r, c) for r, c in zip(results, contexts, strict=True)]
        k = max((len(s) for _, s, _ in kept), default=0)
        boxes, scores = torch.zeros(len(kept), k, 4), torch.zeros(len(kept), k)
        labels = torch.full((len(kept), k), -1, dtype=torch.int64)
        for i, (b, s, lab) in enumerate(kept):
            boxes[i, : len(s)], scores[i, : len(s)], labels[i, : len(s)] = b, s, lab
        counts = torch.tensor([len(s) for _, s, _ in kept], dtype=torch.int64)
        return {"boxes": boxes, "scores": scores, "labels": labels, "num_detections": counts}

    def to_json(self, result: Mapping[str, Any], context: JsonContext) -> dict[str, Any]:
        """{"boxes": [[x1, y1, x2, y2]] in the sent image's pixels, "scores", "labels", "class_names"?}: scores at
        least `options.score_threshold`, at most `options.max_detections`."""
        boxes, scores, kept_labels = _kept(result, context)
        labels = [int(v) for v in kept_labels.tolist()]
        out = {
            "boxes": [[round(float(v), 3) for v in box] for box in boxes.tolist()],
            "scores": [float(v) for v in scores.tolist()],
            "labels": labels,
        }
        if context.class_names:
            out["class_names"] = [context.class_names[v] for v in labels]
        return out

    def metric(self, head_config: HeadConfig) -> DetectionMetric:
        return DetectionMetric()


def _kept(result: Mapping[str, Any], context: JsonContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes (K, 4) in the sent image's pixels, scores (K,), labels (K,)) of the detections the options keep:
    scores at least `options.score_threshold`, at most `options.max_detections` (the best: scores come sorted)."""
    options, (h, w), (original_h, original_w) = context.options, context.input_size, context.original
    scores = result["scores"].float()
    keep = (scores >= options.score_threshold).nonzero().flatten()
    if options.max_detections is not None:
        keep = keep[: options.max_detections]
    sy, sx = original_h / h, original_w / w
    boxes = result["boxes"].float()[keep] * torch.tensor([sx, sy, sx, sy])
    return boxes, scores[keep], result["labels"][keep].long()

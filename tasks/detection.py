"""Object detection head: an anchor-free FCOS dense head on a feature pyramid built by the task's own neck.

The pieces come from torchvision's FCOS: `FCOSHead` (classification / regression / centerness towers and its
`compute_loss`: sigmoid focal loss, GIoU loss, centerness BCE) and `BoxLinearCoder`. Anchor points, matching
(center sampling + per-level scale ranges) and post-processing (score threshold, top-k per level, decoding,
clipping, `batched_nms`, max detections) are small pure functions that mirror `torchvision.models.detection.FCOS`
(`compute_loss`, `postprocess_detections`) without its image transform: our images arrive normalised and batched.

Head outputs (a dict; every tensor has the rows of the batch first):
    "cls_logits": (N, A, num_classes), "bbox_regression": (N, A, 4) (distances / stride),
    "bbox_ctrness": (N, A, 1), "anchors": (A, 4) stride-sized boxes centred on each cell (shared by all rows),
    "num_anchors_per_level": list[int] (A = sum over the pyramid levels of H_l * W_l).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.ops import batched_nms, clip_boxes_to_image

from multitask_peft.config import check_class_names, check_positive_float, check_positive_int
from multitask_peft.heads import FeatureInfo, Features, Head, HeadConfig, register_head

from .necks import build_neck

Target = Mapping[str, torch.Tensor]


@register_head("detection")
@dataclasses.dataclass
class Detection(HeadConfig):
    """FCOS detection head config.

    Args:
        num_classes: Number of object classes (no background class).
        channels: Width of the neck and of the towers.
        strides: Strides of the pyramid levels (increasing; plain ViTs: any power-of-two multiple or fraction of
            the patch size; CNNs: stages of the backbone, coarser levels by max-pooling the deepest one).
        num_convs: Conv + GroupNorm + ReLU layers in each tower.
        score_thresh: Minimum score sqrt(sigmoid(class logit) * sigmoid(centerness)) of a kept detection.
        nms_thresh: IoU above which `batched_nms` suppresses a lower-scoring box of the same class.
        topk_candidates: Best candidates kept per pyramid level before NMS.
        detections_per_img: Best detections kept per image after NMS.
        center_sampling_radius: Anchor points within this many strides of a box centre (and inside it) are
            positives for that box.
        class_names: Optional names of the classes, saved with the task.
    """

    num_classes: int = 1
    channels: int = 64
    strides: tuple[int, ...] = (8, 16, 32)
    num_convs: int = 2
    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    topk_candidates: int = 1000
    detections_per_img: int = 100
    center_sampling_radius: float = 1.5
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for field in ("num_classes", "channels", "topk_candidates", "detections_per_img"):
            check_positive_int("Detection", field, getattr(self, field))
        if isinstance(self.num_convs, bool) or not isinstance(self.num_convs, int) or self.num_convs < 0:
            raise ValueError(
                f"Detection: `num_convs` should be an integer >= 0 but the value passed is {self.num_convs!r}"
            )
        if isinstance(self.strides, list):
            self.strides = tuple(self.strides)
        if (
            not isinstance(self.strides, tuple)
            or not self.strides
            or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in self.strides)
            or list(self.strides) != sorted(set(self.strides))
        ):
            raise ValueError(
                f"Detection: `strides` should be a non-empty tuple of increasing positive integers such as (8, 16, 32)"
                f" but the value passed is {self.strides!r}"
            )
        for field, low_open in (("score_thresh", False), ("nms_thresh", True)):
            value = getattr(self, field)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not (0.0 < value <= 1.0 if low_open else 0.0 <= value < 1.0):
                accepted = "(0, 1]" if low_open else "[0, 1)"
                raise ValueError(f"Detection: `{field}` should be in {accepted} but the value passed is {value!r}")
        check_positive_float("Detection", "center_sampling_radius", self.center_sampling_radius)
        self.class_names = check_class_names("Detection", self.class_names, self.num_classes)

    def build(self, info: FeatureInfo) -> DetectionHead:
        return DetectionHead(self, info)


class FCOSTowers(FCOSHead):
    """torchvision's `FCOSHead` (towers, `forward`, `compute_loss`) with one anchor per location.

    Two changes to its construction: GroupNorm with gcd(32, channels) groups, so that any width works
    (torchvision hard-codes 32), and a regression bias of 1 stride per side.
    """

    def __init__(self, channels: int, num_classes: int, num_convs: int) -> None:
        nn.Module.__init__(self)
        norm = partial(nn.GroupNorm, math.gcd(32, channels))
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(channels, 1, num_classes, num_convs, norm_layer=norm)
        self.regression_head = FCOSRegressionHead(channels, 1, num_convs, norm_layer=norm)
        # Boxes start 2 strides wide instead of degenerate (torchvision: bias 0): the GIoU loss then has a gradient
        # from the first step, and an adaptive optimiser cannot push the ReLU'd regression dead before it learns
        # (seen with AdamW at lr 3e-3 to 5e-3: mAP50 stuck near 0 to 0.4 on some of the tests' toy scenes).
        nn.init.constant_(self.regression_head.bbox_reg.bias, 1.0)


def anchor_points(
    grid_sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device | None = None
) -> torch.Tensor:
    """One stride-sized square anchor per feature-map cell, centred on the cell (FCOS's points), level by level.

    Returns:
        (sum of H_l * W_l, 4) xyxy anchors, row-major within each level.
    """
    anchors = []
    for (h, w), s in zip(grid_sizes, strides):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * s
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
        centers = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 4)  # (H*W, 4)
        anchors.append(centers + torch.tensor([-s, -s, s, s], device=device, dtype=torch.float32) / 2)
    return torch.cat(anchors)


def match_anchors(
    anchors: torch.Tensor,  # (A, 4)
    boxes: torch.Tensor,  # (K, 4)
    num_anchors_per_level: Sequence[int],
    center_sampling_radius: float,
) -> torch.Tensor:
    """For each anchor point, the index of the ground-truth box it regresses, or -1 (background).

    torchvision's FCOS rule: the point lies inside the box and within `center_sampling_radius` strides of its
    centre; its largest distance to the box edges lies in the level's range (4 to 8 strides; the first level
    has no lower bound, the last no upper bound); among several such boxes the smallest one wins.

    Returns:
        (A,) int64.
    """
    if boxes.numel() == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    gt_centers = (boxes[:, :2] + boxes[:, 2:]) / 2  # (K, 2)
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # (A, 2)
    anchor_sizes = anchors[:, 2] - anchors[:, 0]  # (A,)
    # center sampling: the point must be close enough to the box centre
    offsets = (anchor_centers[:, None, :] - gt_centers[None, :, :]).abs()  # (A, K, 2)
    match = offsets.max(dim=2).values < center_sampling_radius * anchor_sizes[:, None]  # (A, K)
    x, y = anchor_centers.unsqueeze(dim=2).unbind(dim=1)  # (A, 1) each
    x0, y0, x1, y1 = boxes.unsqueeze(dim=0).unbind(dim=2)  # (1, K) each
    distances = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)  # (A, K, 4)
    match &= distances.min(dim=2).values > 0  # inside the box
    lower = anchor_sizes * 4
    lower[: num_anchors_per_level[0]] = 0
    upper = anchor_sizes * 8
    upper[-num_anchors_per_level[-1] :] = float("inf")
    reach = distances.max(dim=2).values  # (A, K)
    match &= (reach > lower[:, None]) & (reach < upper[:, None])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # (K,)
    best, matched = (match.to(torch.float32) * (1e8 - areas[None, :])).max(dim=1)  # smallest matching box
    matched[best < 1e-5] = -1
    return matched


def postprocess_detections(
    outputs: Mapping[str, Any], image_size: tuple[int, int], box_coder: BoxLinearCoder, config: Detection
) -> list[dict[str, torch.Tensor]]:
    """Per image: score threshold, top-k per level, box decoding, clipping, class-wise NMS, best detections.

    Mirrors `torchvision.models.detection.FCOS.postprocess_detections`.

    Returns:
        One {"boxes": (K, 4) float32 xyxy input pixels, "scores": (K,) float32, "labels": (K,) int64} per image.
    """
    sizes = list(outputs["num_anchors_per_level"])
    anchors = outputs["anchors"].float().split(sizes)  # per level (A_l, 4)
    logits = outputs["cls_logits"].float().split(sizes, dim=1)  # per level (N, A_l, C)
    regression = outputs["bbox_regression"].float().split(sizes, dim=1)  # per level (N, A_l, 4)
    ctrness = outputs["bbox_ctrness"].float().split(sizes, dim=1)  # per level (N, A_l, 1)
    num_classes = outputs["cls_logits"].shape[-1]
    detections = []
    for i in range(outputs["cls_logits"].shape[0]):
        image_boxes, image_scores, image_labels = [], [], []
        for level_anchors, level_logits, level_regression, level_ctrness in zip(anchors, logits, regression, ctrness):
            scores = torch.sqrt(level_logits[i].sigmoid() * level_ctrness[i].sigmoid()).flatten()  # (A_l * C,)
            candidates = torch.where(scores > config.score_thresh)[0]
            scores, order = scores[candidates].topk(min(config.topk_candidates, candidates.numel()))
            candidates = candidates[order]
            anchor_index = torch.div(candidates, num_classes, rounding_mode="floor")
            boxes = box_coder.decode(level_regression[i][anchor_index], level_anchors[anchor_index])  # (k, 4)
            image_boxes.append(clip_boxes_to_image(boxes, image_size))
            image_scores.append(scores)
            image_labels.append(candidates % num_classes)
        boxes, scores, labels = torch.cat(image_boxes), torch.cat(image_scores), torch.cat(image_labels)
        keep = batched_nms(boxes, scores, labels, config.nms_thresh)[: config.detections_per_img]
        detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return detections


@torch.library.custom_op("multitask_peft::nms_keep", mutates_args=())
def nms_keep(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float, min_score: float, num_classes: int
) -> torch.Tensor:
    """Class-wise NMS per image of a fixed-size candidate batch: (N, k) bool, True for the candidates kept
    (score > `min_score`, not suppressed by a better box of their image and class with IoU > `iou`).

    Args:
        boxes: (N, k, 4) xyxy. scores: (N, k). labels: (N, k) int64 in [0, num_classes).

    A custom op so that ONNX export can emit one batched `NonMaxSuppression` (see `export.py`) instead of an NMS
    over all images at once (quadratic in the batch).
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


def export_detections(
    outputs: Mapping[str, Any], image_size: tuple[int, int], box_coder: BoxLinearCoder, config: Detection
) -> dict[str, torch.Tensor]:
    """`postprocess_detections` for a whole batch with fixed shapes (traceable; NMS exports as ONNX
    NonMaxSuppression): the same detections, padded to `detections_per_img` per image.

    Candidates below `score_thresh` are kept through top-k (they rank after every valid candidate, so they cannot
    displace one) and left out of NMS (`nms_keep`, ONNX NonMaxSuppression in an exported graph).

    Returns:
        {"boxes": (N, K, 4) float32, "scores": (N, K) float32, "labels": (N, K) int64 (-1 where padded),
        "num_detections": (N,) int64}, K = min(detections_per_img, candidates), best first.
    """
    sizes = list(outputs["num_anchors_per_level"])
    anchors = outputs["anchors"].float().split(sizes)
    logits = outputs["cls_logits"].float().split(sizes, dim=1)
    regression = outputs["bbox_regression"].float().split(sizes, dim=1)
    ctrness = outputs["bbox_ctrness"].float().split(sizes, dim=1)
    num_classes = outputs["cls_logits"].shape[-1]
    all_boxes, all_scores, all_labels = [], [], []
    for level_anchors, level_logits, level_regression, level_ctrness in zip(anchors, logits, regression, ctrness):
        scores = torch.sqrt(level_logits.sigmoid() * level_ctrness.sigmoid()).flatten(1)  # (N, A_l * C)
        scores, candidates = scores.topk(min(config.topk_candidates, scores.shape[1]), dim=1)  # (N, k_l)
        anchor_index = torch.div(candidates, num_classes, rounding_mode="floor")
        deltas = level_regression.gather(1, anchor_index[..., None].expand(-1, -1, 4))  # (N, k_l, 4)
        boxes = box_coder.decode(deltas.flatten(0, 1), level_anchors[anchor_index.flatten()]).view_as(deltas)
        all_boxes.append(clip_boxes_to_image(boxes, image_size))
        all_scores.append(scores)
        all_labels.append(candidates % num_classes)
    boxes, scores, labels = torch.cat(all_boxes, 1), torch.cat(all_scores, 1), torch.cat(all_labels, 1)
    return best_detections(
        boxes, scores, labels, config.nms_thresh, config.score_thresh, num_classes, config.detections_per_img
    )


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
    image, padded: the fixed-shape detections of the export forms (see `export_detections`)."""
    kept = nms_keep(boxes, scores, labels, iou, min_score, num_classes)
    ranked = torch.where(kept & (scores > min_score), scores, torch.full_like(scores, -1.0))
    top, order = ranked.topk(min(max_detections, scores.shape[1]), dim=1)  # (N, K)
    valid = top >= 0
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4)) * valid[..., None]
    labels = torch.where(valid, labels.gather(1, order), torch.full_like(order, -1))
    return {"boxes": boxes, "scores": top.clamp(min=0.0), "labels": labels, "num_detections": valid.sum(1)}


class DetectionHead(Head):
    """Neck (simple feature pyramid for ViTs, FPN for CNNs) + FCOS towers; loss and post-processing as in FCOS."""

    def __init__(self, config: Detection, info: FeatureInfo) -> None:
        super().__init__()
        self.config = config
        self.neck = build_neck(info, config.channels, config.strides)
        self.towers = FCOSTowers(config.channels, config.num_classes, config.num_convs)

    def forward(self, features: Features) -> dict[str, Any]:
        pyramid = self.neck(features.maps)  # per level (N, channels, H_l, W_l)
        outputs = self.towers(pyramid)  # (N, A, C), (N, A, 4), (N, A, 1)
        grid_sizes = [(p.shape[-2], p.shape[-1]) for p in pyramid]
        outputs["anchors"] = anchor_points(grid_sizes, self.config.strides, device=pyramid[0].device)  # (A, 4)
        outputs["num_anchors_per_level"] = [h * w for h, w in grid_sizes]
        return outputs

    def losses(self, outputs: Mapping[str, Any], targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        """The three FCOS losses ("classification", "bbox_regression", "bbox_ctrness"), each per positive.

        Crowd boxes (`iscrowd` True) are dropped before matching, so they are never positives.
        """
        num_images = outputs["cls_logits"].shape[0]
        targets = _check_targets(targets, num_images, self.config.num_classes, outputs["anchors"].device)
        anchors = outputs["anchors"].float()
        sizes = list(outputs["num_anchors_per_level"])
        matched = [match_anchors(anchors, t["boxes"], sizes, self.config.center_sampling_radius) for t in targets]
        head_outputs = {k: outputs[k].float() for k in ("cls_logits", "bbox_regression", "bbox_ctrness")}
        return self.towers.compute_loss(targets, head_outputs, [anchors] * num_images, matched)

    def loss(self, outputs: Mapping[str, Any], targets: Sequence[Target]) -> torch.Tensor:
        """Sum of the FCOS losses (see `losses`)."""
        return sum(self.losses(outputs, targets).values())

    def postprocess(self, outputs: Mapping[str, Any], image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        return postprocess_detections(outputs, image_size, self.towers.box_coder, self.config)

    def export_outputs(self, outputs: Mapping[str, Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        return export_detections(outputs, image_size, self.towers.box_coder, self.config)


def _check_targets(
    targets: Sequence[Target], num_images: int, num_classes: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """Validated targets without crowd boxes: [{"boxes": (K, 4) float32, "labels": (K,) int64}] on `device`."""
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

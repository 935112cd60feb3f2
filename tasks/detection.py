"""Object detection head: an anchor-free FCOS dense head on a feature pyramid built by the task's own neck.

The pieces come from torchvision's FCOS: `FCOSHead` (classification / regression / centerness towers and its
`compute_loss`: sigmoid focal loss, GIoU loss, centerness BCE) and `BoxLinearCoder`. Anchor points, matching
(center sampling + per-level scale ranges) and candidate selection (top-k per level, decoding, clipping) are small
pure functions that mirror `torchvision.models.detection.FCOS` (`compute_loss`, `postprocess_detections`) without
its image transform: our images arrive normalised and batched. Score threshold, class-wise NMS and the best
detections are the detection output kind's (`detection_output.best_detections`), shared with mmdet heads.

Head outputs (a dict; every tensor has the rows of the batch first):
    "cls_logits": (N, A, num_classes), "bbox_regression": (N, A, 4) (distances / stride),
    "bbox_ctrness": (N, A, 1), "anchors": (A, 4) stride-sized boxes centred on each cell (shared by all rows),
    "num_anchors_per_level": list[int] (A = sum over the pyramid levels of H_l * W_l).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.ops import clip_boxes_to_image

from multitask_peft.config import check_class_names, check_positive_float, check_positive_int
from multitask_peft.heads import FeatureInfo, Features, Head, HeadConfig, register_head

from .detection_output import Target, best_detections, check_detection_targets, onnx_translations
from .necks import build_neck, check_strides


@register_head("detection")
@dataclasses.dataclass
class Detection(HeadConfig):
    """FCOS detection head config.

    Args:
        num_classes: Number of object classes (no background class).
        channels: Width of the neck and of the towers.
        strides: Strides of the pyramid levels (increasing; plain ViTs: any power-of-two multiple or fraction of
            the patch size, patch 14 counting as 16; multi-stage backbones: their stages, finer levels by
            upsampling the first, coarser ones by max-pooling the deepest).
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
        self.strides = check_strides("Detection", self.strides, powers_of_two=False)
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


def export_detections(
    outputs: Mapping[str, Any], image_size: tuple[int, int], box_coder: BoxLinearCoder, config: Detection
) -> dict[str, torch.Tensor]:
    """The tensor form of the detection output kind for a batch (traceable): per level the best
    `topk_candidates` (anchor, class) scores sqrt(sigmoid(class logit) * sigmoid(centerness)), their boxes decoded
    and clipped to `image_size`; then `best_detections`: class-wise NMS of the candidates above `score_thresh`, the
    best `detections_per_img`. The detections of torchvision's `FCOS.postprocess_detections`, padded.

    Candidates below `score_thresh` are kept through top-k (they rank after every valid candidate, so they cannot
    displace one) and left out of NMS.

    Returns:
        {"boxes": (N, K, 4) float32, "scores": (N, K) float32, "labels": (N, K) int64 (-1 where padded),
        "num_detections": (N,) int64}, K = min(detections_per_img, candidates), best first.
    """
    sizes = list(outputs["num_anchors_per_level"])
    anchors = outputs["anchors"].float().split(sizes)  # per level (A_l, 4)
    logits = outputs["cls_logits"].float().split(sizes, dim=1)  # per level (N, A_l, C)
    regression = outputs["bbox_regression"].float().split(sizes, dim=1)  # per level (N, A_l, 4)
    ctrness = outputs["bbox_ctrness"].float().split(sizes, dim=1)  # per level (N, A_l, 1)
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


class DetectionHead(Head):
    """Neck (simple feature pyramid for ViTs, FPN for CNNs) + FCOS towers; loss and detections as in FCOS."""

    def __init__(self, config: Detection, info: FeatureInfo) -> None:
        super().__init__()
        self.config = config
        self.neck = build_neck(info, config.channels, config.strides, owner="Detection")
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
        targets = check_detection_targets(targets, num_images, self.config.num_classes, outputs["anchors"].device)
        anchors = outputs["anchors"].float()
        sizes = list(outputs["num_anchors_per_level"])
        matched = [match_anchors(anchors, t["boxes"], sizes, self.config.center_sampling_radius) for t in targets]
        head_outputs = {k: outputs[k].float() for k in ("cls_logits", "bbox_regression", "bbox_ctrness")}
        return self.towers.compute_loss(targets, head_outputs, [anchors] * num_images, matched)

    def loss(self, outputs: Mapping[str, Any], targets: Sequence[Target]) -> torch.Tensor:
        """Sum of the FCOS losses (see `losses`)."""
        return sum(self.losses(outputs, targets).values())

    def export_outputs(self, outputs: Mapping[str, Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The detection tensor form (`export_detections`), boxes in input pixels."""
        return export_detections(outputs, image_size, self.towers.box_coder, self.config)

    def onnx_translations(self) -> dict[Any, Callable[..., Any]]:
        return onnx_translations()  # NMS as ONNX NonMaxSuppression

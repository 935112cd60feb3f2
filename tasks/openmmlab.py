"""MMDetection dense heads and MMSegmentation decode heads as heads of our tasks.

`MMDetHead(head=dict(type="RetinaHead", ...))` and `MMSegHead(head=dict(type="UPerHead", ...))` take the head
part of an OpenMMLab config as it is written there, build it with that library's registry, and put it behind our
head interface: our neck (a simple feature pyramid for plain ViTs, an FPN over the stages of CNNs) turns the
task's backbone features into the pyramid the OpenMMLab head expects, the head's own `loss_by_feat` gives the loss
and its own `predict_by_feat` (mmdet: decoding, score threshold, NMS) the detections, in the tensor form of our
detection / segmentation output kinds, so prediction, evaluation, serving and ONNX export treat them like our own
heads.

The configs are registered head types, so tasks using them save and load like any other; building one needs the
OpenMMLab extra (`scripts/install_openmmlab.sh`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from multitask_peft.config import check_class_names, check_positive_int
from multitask_peft.heads import FeatureInfo, Features, Head, HeadConfig, register_head

from .detection_output import Target, best_detections, check_detection_targets, onnx_translations, pad_detections
from .necks import build_neck, check_strides
from .openmmlab_env import require_openmmlab
from .segmentation_output import check_mask_targets


def _check_head_dict(owner: str, head: object, example: str) -> dict[str, Any]:
    if not isinstance(head, Mapping) or not isinstance(head.get("type"), str):
        raise ValueError(f"{owner}: `head` should be an OpenMMLab head config such as {example}, got {head!r}")
    return dict(head)


def _num_classes(owner: str, head: dict[str, Any]) -> int:
    value = head.get("num_classes")
    check_positive_int(owner, "head.num_classes", value)
    return value


def _config_dict(value: object, owner: str, field: str) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"{owner}: `{field}` should be a dict (an OpenMMLab config) or None, got {value!r}")
    return None if value is None else dict(value)


def _build(registry_module: str, cfg: dict[str, Any]) -> torch.nn.Module:
    """Build an OpenMMLab module from a config dict with mmdet's or mmseg's MODELS registry."""
    require_openmmlab()
    import importlib
    import logging

    from mmengine.config import ConfigDict
    from mmengine.logging import MMLogger
    from mmengine.registry import DefaultScope

    importlib.import_module(f"{registry_module}.models")  # fills the registry
    registry = importlib.import_module(f"{registry_module}.registry").MODELS
    # The library's own scope, whatever a runner made the default (mmdet's scope has no UPerHead, and an mmseg
    # head's nested configs, its losses, must resolve in mmseg too); nested dicts as ConfigDicts (attribute access).
    with DefaultScope.overwrite_default_scope(registry_module):
        module = registry.build(ConfigDict(copy.deepcopy(cfg)))
    if hasattr(module, "init_weights"):  # OpenMMLab modules initialise from their init_cfg only when asked
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)  # it logs every initialised tensor
        try:
            module.init_weights()
        finally:
            logger.setLevel(level)
    return module


@register_head("mmdet")
@dataclasses.dataclass
class MMDetHead(HeadConfig):
    """An MMDetection dense head (RetinaHead, FCOSHead, ATSSHead, GFLHead, ...) as a detection head.

    Args:
        head: The head's config as in an mmdet config's `model.bbox_head`, e.g. `dict(type="RetinaHead",
            num_classes=3, in_channels=256, anchor_generator=..., bbox_coder=..., loss_cls=..., loss_bbox=...)`.
            `in_channels` defaults to `channels`.
        train_cfg: The detector's `model.train_cfg` (assigner, sampler, ...), given to the head as mmdet does.
        test_cfg: The detector's `model.test_cfg` (nms_pre, score_thr, nms, max_per_img).
        channels: Width of our neck's pyramid (the head's input).
        strides: Pyramid strides; they must equal the head's prior (anchor / point) strides.
        class_names: Optional names of the classes, saved with the task.
    """

    output_kind: ClassVar[str] = "detection"

    head: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_cfg: dict[str, Any] | None = None
    test_cfg: dict[str, Any] | None = None
    channels: int = 256
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.head = _check_head_dict("MMDetHead", self.head, 'dict(type="RetinaHead", num_classes=3, ...)')
        self.train_cfg = _config_dict(self.train_cfg, "MMDetHead", "train_cfg")
        self.test_cfg = _config_dict(self.test_cfg, "MMDetHead", "test_cfg")
        check_positive_int("MMDetHead", "channels", self.channels)
        self.strides = check_strides("MMDetHead", self.strides)
        self.class_names = check_class_names("MMDetHead", self.class_names, _num_classes("MMDetHead", self.head))

    @property
    def num_classes(self) -> int:
        return self.head["num_classes"]

    def build(self, info: FeatureInfo) -> MMDetDenseHead:
        return MMDetDenseHead(self, info)


class MMDetDenseHead(Head):
    """Our neck + an mmdet dense head; outputs {"feats": the head's forward outputs, "batch_input_shape"}."""

    def __init__(self, config: MMDetHead, info: FeatureInfo) -> None:
        super().__init__()
        self.config = config
        self.neck = build_neck(info, config.channels, config.strides, owner="MMDetHead")
        cfg = dict(config.head)
        cfg.setdefault("in_channels", config.channels)
        cfg.update(train_cfg=config.train_cfg, test_cfg=config.test_cfg)
        self.head = _build("mmdet", cfg)
        self.reduction = info.levels[0][1]
        priors = getattr(self.head, "prior_generator", None)
        strides = [tuple(s) if isinstance(s, (tuple, list)) else (s, s) for s in getattr(priors, "strides", [])]
        if priors is not None and strides != [(s, s) for s in config.strides]:
            raise ValueError(
                f"MMDetHead: the head's prior strides {[s[0] for s in strides]} differ from `strides` "
                f"{list(config.strides)}; make them equal (anchor_generator.strides / strides of the head)"
            )

    def forward(self, features: Features) -> dict[str, Any]:
        pyramid = self.neck(features.maps)  # per level (N, channels, H_l, W_l)
        first = features.maps[0]
        size = (first.shape[-2] * self.reduction, first.shape[-1] * self.reduction)
        return {"feats": tuple(self.head(tuple(pyramid))), "batch_input_shape": size}

    def losses(self, outputs: Mapping[str, Any], targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        """The head's `loss_by_feat` terms (lists of per-level terms summed), crowd boxes left out."""
        from mmengine.structures import InstanceData

        feats = outputs["feats"]
        n = feats[0][0].shape[0]
        checked = check_detection_targets(targets, n, self.config.num_classes, feats[0][0].device)
        gts = [InstanceData(bboxes=t["boxes"], labels=t["labels"]) for t in checked]
        metas = [_img_meta(outputs["batch_input_shape"]) for _ in range(n)]
        terms = self.head.loss_by_feat(*feats, gts, metas)
        return {k: sum(v) if isinstance(v, (list, tuple)) else v for k, v in terms.items() if "loss" in k}

    def loss(self, outputs: Mapping[str, Any], targets: Sequence[Target]) -> torch.Tensor:
        return sum(self.losses(outputs, targets).values())

    def export_outputs(self, outputs: Mapping[str, Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The detection tensor form of an exported graph: the traceable copy of `predict_by_feat`
        (`traceable_outputs`)."""
        return self.traceable_outputs(outputs, image_size)

    def tensor_outputs(self, outputs: Mapping[str, Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The detection tensor form in eager mode, boxes in input pixels: the head's own `predict_by_feat` (its
        test_cfg: score threshold, NMS, max_per_img; any dense head, also those without a traceable copy), padded
        to the K of `traceable_outputs`."""
        feats = outputs["feats"]
        n = feats[0][0].shape[0]
        metas = [_img_meta(image_size) for _ in range(n)]
        predicted = self.head.predict_by_feat(*feats, batch_img_metas=metas, rescale=False)
        detections = [{"boxes": r.bboxes, "scores": r.scores, "labels": r.labels} for r in predicted]
        return pad_detections(detections, self._num_slots(feats[0]), device=feats[0][0].device)

    def onnx_translations(self) -> dict[Any, Callable[..., Any]]:
        return onnx_translations()  # NMS as ONNX NonMaxSuppression

    def _num_slots(self, cls_scores: Sequence[torch.Tensor]) -> int:
        """K of the tensor form, as `traceable_outputs` makes it: min(max_per_img, (prior, class) candidates)."""
        cfg = self.head.test_cfg or {}
        max_per_img = cfg.get("max_per_img", 100)
        out_channels = getattr(self.head, "cls_out_channels", None)
        if out_channels is None:  # not a head with per-prior class scores: it has no traceable copy either
            return max_per_img
        nms_pre = cfg.get("nms_pre", -1)
        num_classes = self.config.num_classes
        # a level's scores are (N, priors per cell * cls_out_channels, H, W): a candidate per (prior, class)
        counts = [c.shape[-2] * c.shape[-1] * (c.shape[1] // out_channels) * num_classes for c in cls_scores]
        return min(max_per_img, sum(_num_candidates(count, nms_pre) for count in counts))

    def traceable_outputs(self, outputs: Mapping[str, Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """`predict_by_feat` for a whole batch with fixed shapes (traceable; NMS exports as ONNX NonMaxSuppression).

        Mirrors mmdet's `BaseDenseHead._predict_by_feat_single` for heads with a prior generator and a box coder
        (RetinaHead, FCOSHead, ATSSHead, ...): per level the best `nms_pre` (prior, class) scores above `score_thr`,
        boxes decoded and clipped, scores times the sigmoid score factors (centerness) if the head has them, boxes
        not wider and taller than `min_bbox_size` dropped, class-wise NMS, the best `max_per_img`. Padded like
        `Detection`'s: {"boxes" (N, K, 4), "scores" (N, K), "labels" (N, K) (-1 where padded), "num_detections"}.
        """
        head, cfg = self.head, self.head.test_cfg
        if not hasattr(head, "prior_generator") or not hasattr(head, "bbox_coder"):
            raise NotImplementedError(f"{type(head).__name__} has no ONNX export form (no prior generator / box coder)")
        if getattr(head.loss_cls, "custom_cls_channels", False) or cfg.get("nms", {}).get("type", "nms") != "nms":
            raise NotImplementedError(f"{type(head).__name__}: custom class channels / soft NMS do not export")
        feats = outputs["feats"]
        cls_scores, bbox_preds = feats[0], feats[1]
        factors = feats[2] if len(feats) > 2 else [None] * len(cls_scores)
        n = cls_scores[0].shape[0]
        priors = head.prior_generator.grid_priors(
            [c.shape[-2:] for c in cls_scores], dtype=torch.float32, device=cls_scores[0].device
        )
        nms_pre, score_thr = cfg.get("nms_pre", -1), cfg.get("score_thr", 0.0)
        min_size = cfg.get("min_bbox_size", -1)
        size = (int(image_size[0]), int(image_size[1]))
        all_boxes, all_scores, all_labels = [], [], []
        for cls, box, factor, level_priors in zip(cls_scores, bbox_preds, factors, priors):
            logits = cls.float().permute(0, 2, 3, 1).reshape(n, -1, head.cls_out_channels)
            scores = logits.sigmoid() if head.use_sigmoid_cls else logits.softmax(-1)[..., :-1]  # (N, A, C)
            num_classes = scores.shape[-1]
            flat = scores.flatten(1)  # (N, A * C), prior-major as in mmdet's filter_scores_and_topk
            k = _num_candidates(flat.shape[1], nms_pre)
            top, index = flat.topk(k, dim=1)  # (N, k)
            prior_index = torch.div(index, num_classes, rounding_mode="floor")
            deltas = box.float().permute(0, 2, 3, 1).reshape(n, -1, head.bbox_coder.encode_size)
            deltas = deltas.gather(1, prior_index[..., None].expand(-1, -1, deltas.shape[-1]))
            chosen = level_priors[prior_index.flatten()]  # (N * k, prior dims)
            with _mmdet_eager_decode():
                boxes = head.bbox_coder.decode(chosen, deltas.flatten(0, 1), max_shape=size).view(n, k, 4)
            valid = top > score_thr
            if factor is not None:
                centerness = factor.float().permute(0, 2, 3, 1).reshape(n, -1).sigmoid().gather(1, prior_index)
                top = top * centerness
            if min_size >= 0:
                valid &= ((boxes[..., 2] - boxes[..., 0]) > min_size) & ((boxes[..., 3] - boxes[..., 1]) > min_size)
            all_boxes.append(boxes)
            all_scores.append(torch.where(valid, top, torch.zeros_like(top)))  # 0: never kept (min_score 0)
            all_labels.append(index % num_classes)
        boxes, scores, labels = torch.cat(all_boxes, 1), torch.cat(all_scores, 1), torch.cat(all_labels, 1)
        iou, max_per_img = float(cfg.nms.iou_threshold), cfg.get("max_per_img", 100)
        return best_detections(boxes, scores, labels, iou, 0.0, num_classes, max_per_img)


def _num_candidates(count: int, nms_pre: int) -> int:
    """Candidates a level keeps for NMS out of `count` (prior, class) scores: the best `nms_pre` (all if <= 0)."""
    return count if nms_pre <= 0 else min(nms_pre, count)


@contextlib.contextmanager
def _mmdet_eager_decode() -> Iterator[None]:
    """mmdet's box coders switch to mmdet 2.x ONNX code (`mmdet.core.export`, gone in 3.x) while
    `torch.onnx.is_in_onnx_export()`; their eager decode traces fine, so they see False while decoding."""
    is_exporting = torch.onnx.is_in_onnx_export
    torch.onnx.is_in_onnx_export = lambda: False
    try:
        yield
    finally:
        torch.onnx.is_in_onnx_export = is_exporting


def _img_meta(size: tuple[int, int]) -> dict[str, Any]:
    h, w = int(size[0]), int(size[1])
    return {"img_shape": (h, w), "pad_shape": (h, w), "batch_input_shape": (h, w), "scale_factor": (1.0, 1.0)}


@register_head("mmseg")
@dataclasses.dataclass
class MMSegHead(HeadConfig):
    """An MMSegmentation decode head (UPerHead, FCNHead, PSPHead, SegformerHead, ...) as a segmentation head.

    Args:
        head: The head's config as in an mmseg config's `model.decode_head`, e.g. `dict(type="UPerHead",
            num_classes=11, channels=128, loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0))`.
            `in_channels` and `in_index` default to every level of our pyramid for heads that take several
            (UPerHead, FPNHead, SegformerHead, or an `input_transform`), else to the finest level (FCNHead,
            PSPHead, ...); `ignore_index` defaults to 255.
        channels: Width of our neck's pyramid (the head's input).
        strides: Pyramid strides (the finest sets the resolution of the head's logits).
        class_names: Optional names of the classes, saved with the task.
    """

    output_kind: ClassVar[str] = "segmentation"

    head: dict[str, Any] = dataclasses.field(default_factory=dict)
    channels: int = 64
    strides: tuple[int, ...] = (4, 8, 16, 32)
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.head = _check_head_dict("MMSegHead", self.head, 'dict(type="UPerHead", num_classes=11, channels=128)')
        check_positive_int("MMSegHead", "channels", self.channels)
        self.strides = check_strides("MMSegHead", self.strides)
        num_classes = _num_classes("MMSegHead", self.head)
        ignore = self.head.get("ignore_index", 255)
        if isinstance(ignore, bool) or not isinstance(ignore, int) or 0 <= ignore < num_classes:
            raise ValueError(
                f"MMSegHead: `head.ignore_index` should be an integer outside the class ids [0, {num_classes}) "
                f"but the value passed is {ignore!r}"
            )
        self.class_names = check_class_names("MMSegHead", self.class_names, num_classes)

    @property
    def num_classes(self) -> int:
        return self.head["num_classes"]

    @property
    def ignore_index(self) -> int:
        return self.head.get("ignore_index", 255)

    def build(self, info: FeatureInfo) -> MMSegDecodeHead:
        return MMSegDecodeHead(self, info)


# Decode heads that take every pyramid level by design; others take one map (the finest) unless their config sets
# `input_transform` ("resize_concat" / "multiple_select") as mmseg's own configs do.
MULTI_INPUT_HEADS = ("UPerHead", "FPNHead", "SegformerHead")


class MMSegDecodeHead(Head):
    """Our neck + an mmseg decode head; outputs the head's (N, num_classes, H / s0, W / s0) logits."""

    def __init__(self, config: MMSegHead, info: FeatureInfo) -> None:
        super().__init__()
        self.config = config
        self.neck = build_neck(info, config.channels, config.strides, owner="MMSegHead")
        levels = len(config.strides)
        cfg = dict(config.head)
        multi = cfg["type"] in MULTI_INPUT_HEADS or cfg.get("input_transform") in ("resize_concat", "multiple_select")
        cfg.setdefault("in_channels", [config.channels] * levels if multi else config.channels)
        cfg.setdefault("in_index", list(range(levels)) if multi else 0)
        self.head = _build("mmseg", cfg)
        self.stride = config.strides[0]

    def forward(self, features: Features) -> torch.Tensor:
        pyramid = self.neck(features.maps)
        return self.head(list(pyramid))  # (N, C, H / s0, W / s0)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The head's `loss_by_feat` terms (its `loss_decode`; the `acc_seg` it also reports is left out)."""
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample

        check_mask_targets(outputs, targets, self.config.num_classes, self.config.ignore_index)
        samples = []
        for target in targets:
            sample = SegDataSample()
            sample.gt_sem_seg = PixelData(data=target[None].long())
            samples.append(sample)
        terms = self.head.loss_by_feat(outputs, samples)
        return sum(v for k, v in terms.items() if "loss" in k)

    def export_outputs(self, outputs: torch.Tensor, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """{"mask": (N, H, W) int64}: the head's logits resized to `image_size` as mmseg does, arg-max (or its
        threshold for a binary head)."""
        size = (int(image_size[0]), int(image_size[1]))
        align = bool(getattr(self.head, "align_corners", False))
        logits = F.interpolate(outputs.float(), size=size, mode="bilinear", align_corners=align)
        if logits.shape[1] == 1:  # a binary head with a sigmoid loss (out_channels=1)
            return {"mask": (logits[:, 0].sigmoid() > getattr(self.head, "threshold", 0.5)).long()}
        return {"mask": logits.argmax(dim=1)}  # (N, H, W) int64

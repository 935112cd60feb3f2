"""The segmentation output kind: a class id per pixel of the input image.

Tensor form: "mask" (N, H, W) int64 class ids at the input size. Results: one {"mask": (H, W) int64} per image.
JSON: the mask at the size of the image the client sent, as a base64 PNG of class ids (or nested lists).
Metric: mIoU and pixel accuracy.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from multitask_peft.config import check_positive_int
from multitask_peft.heads import HeadConfig
from multitask_peft.outputs import JsonContext, OutputKind, Result, TensorSpec, register_output_kind

from .metric_base import MetricDict, Results, as_cpu, check_batch


def check_mask_targets(outputs: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """A TypeError / ValueError unless `targets` are (N, H, W) int64 class ids in [0, num_classes) or
    `ignore_index`, N the rows of the (N, C, H', W') logits `outputs`."""
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"segmentation targets must be an int64 tensor (N, H, W) of class ids, got {got}")
    if targets.ndim != 3 or targets.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"segmentation targets must have shape (N={outputs.shape[0]}, H, W), got {tuple(targets.shape)}"
        )
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= num_classes))
    if bool(bad.any()):
        values = sorted(set(targets[bad].unique().tolist()))[:5]
        raise ValueError(
            f"segmentation targets hold class ids {values} outside [0, {num_classes}) "
            f"and not the ignore_index {ignore_index}"
        )


def encode_mask_png(mask: torch.Tensor) -> str:
    """(H, W) class ids -> base64 PNG (8-bit grey for ids < 256, else 16-bit)."""
    array = mask.cpu().numpy()
    mode_dtype = np.uint8 if array.max(initial=0) < 256 else np.uint16
    buffer = io.BytesIO()
    Image.fromarray(array.astype(mode_dtype)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_mask_png(text: str) -> np.ndarray:
    """Inverse of `encode_mask_png`: (H, W) int64 class ids."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text)))).astype(np.int64)


class SegmentationMetric(MetricDict):
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
        check_batch("SegmentationMetric", results, targets)
        if not len(results):
            return
        preds, gts = [], []
        for i, (r, t) in enumerate(zip(results, targets)):
            if "mask" not in r:
                raise ValueError(f"SegmentationMetric.update: results need 'mask'; got keys {sorted(r)}")
            mask, target = as_cpu(r["mask"], torch.int64), as_cpu(t, torch.int64)
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
        self.update_all(pred, gt)


@register_output_kind("segmentation")
class SegmentationOutput(OutputKind):
    """A class-id mask at the input size; JSON masks resized (nearest) to the sent image."""

    primary_metric = "miou"

    def tensor_spec(self, head_config: HeadConfig, image_size: tuple[int, int]) -> tuple[TensorSpec, ...]:
        return (TensorSpec("mask", torch.int64, (-1, int(image_size[0]), int(image_size[1]))),)

    def decode(self, tensors: Mapping[str, torch.Tensor]) -> list[Result]:
        masks = tensors["mask"]  # (N, H, W)
        return [{"mask": masks[i]} for i in range(len(masks))]

    def from_class_logits(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mask": logits.argmax(dim=1)}  # (N, C, H, W) -> (N, H, W) int64

    def oip_fields(self, num_classes: int | None) -> tuple[TensorSpec, ...]:
        return (TensorSpec("mask", torch.int64, (-1, -1, -1)),)  # (N, H, W) at the sent images' size

    def to_oip(self, results: Sequence[Mapping[str, Any]], contexts: Sequence[JsonContext]) -> dict[str, torch.Tensor]:
        sizes = {tuple(c.original) for c in contexts}
        if len(sizes) > 1:
            raise ValueError(
                f"segmentation masks come at each image's size, and these images differ ({sorted(sizes)}): send "
                "them in separate requests, or as one UINT8 tensor of equal images"
            )
        return {"mask": torch.stack([_at_size(r["mask"], c.original) for r, c in zip(results, contexts, strict=True)])}

    def to_json(self, result: Mapping[str, Any], context: JsonContext) -> dict[str, Any]:
        """{"size": [H, W], "mask_png" (or "mask" as lists with `options.mask_format="list"`), "class_names"?}."""
        mask = _at_size(result["mask"], context.original)
        out: dict[str, Any] = {"size": [int(mask.shape[0]), int(mask.shape[1])]}
        if context.options.mask_format == "list":
            out["mask"] = mask.tolist()
        else:
            out["mask_png"] = encode_mask_png(mask)
        if context.class_names:
            out["class_names"] = list(context.class_names)
        return out

    def metric(self, head_config: HeadConfig) -> SegmentationMetric:
        return SegmentationMetric(head_config.num_classes, ignore_index=getattr(head_config, "ignore_index", 255))


def _at_size(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A (H, W) class-id mask resized (nearest) to `size`, as int64."""
    if tuple(mask.shape) != tuple(size):
        mask = F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest")[0, 0]
    return mask.long()

"""COCO JSON object detection (boxes; `iscrowd` honoured)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from .common import (
    Check,
    DataError,
    DataIssue,
    FolderDataset,
    OnError,
    collate_detection,
    probe_image,
    read_image,
    report_issues,
    require_dir,
)

BOX_TOLERANCE = 1.0  # pixels a box may reach past the image border before it is reported (then clamped)


@dataclass
class _Record:
    path: Path
    image_id: int
    boxes: np.ndarray  # (K, 4) float32 xyxy
    labels: np.ndarray  # (K,) int64
    iscrowd: np.ndarray  # (K,) bool


def _labels_and_crowd(inputs: tuple[Any, dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """`SanitizeBoundingBoxes` labels getter: drop labels and iscrowd together with their boxes."""
    return inputs[1]["labels"], inputs[1]["iscrowd"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _box_problem(bbox: Any, width: int | None, height: int | None) -> str | None:
    """Why a COCO `bbox` [x, y, w, h] is invalid, or None."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox must be [x, y, width, height], got {bbox!r}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return f"bbox {bbox!r} has non-finite or non-numeric values"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"empty box {bbox!r} (width and height must be > 0)"
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE:
        return f"negative box coordinates {bbox!r}"
    if width is not None and height is not None and (x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE):
        return f"box {bbox!r} reaches outside the {width}x{height} image"
    return None


class CocoDetection(FolderDataset):
    """Object detection from a COCO JSON file; items are (image float32 (3, H, W), target dict).

    The target holds "boxes" float32 (K, 4) xyxy in the returned image's pixels, "labels" int64 (K,), "iscrowd"
    bool (K,) and "image_id" (the COCO id). COCO category ids map to contiguous labels 0..C-1 in sorted id order
    (`category_ids[label]` maps back). After the transform, boxes are clamped to the image and boxes that became
    degenerate (side < `min_size`) are dropped together with their labels and iscrowd flags.

    Problems are reported as path + reason: missing or corrupt images, image sizes that disagree with the JSON,
    and invalid annotations (negative or empty boxes, boxes outside the image, unknown image or category ids).
    With `on_error="skip"` (default) the bad image or annotation is skipped and one warning gives the count; with
    "raise" a `DataError` lists them. A file that is not valid COCO JSON always raises.

    Args:
        images: folder the `file_name` entries are relative to.
        annotations: the COCO JSON file.
        transform: called as `transform(image, target)` on a uint8 `tv_tensors.Image` and a target whose "boxes"
            are `tv_tensors.BoundingBoxes` (e.g. `train_transforms(size)`); normalisation happens afterwards.
        mean: normalisation mean (one number or one per channel).
        std: normalisation std.
        on_error: "skip" or "raise".
        check: how much each image is checked up front: "none", "header" (open + verify) or "full" (decode).
        min_size: boxes with a side below this many pixels after the transform are dropped (>= 1).
        drop_empty: leave out images without (valid) annotations.
    """

    collate = staticmethod(collate_detection)

    def __init__(
        self,
        images: str | os.PathLike,
        annotations: str | os.PathLike,
        transform: Callable | None = None,
        *,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        on_error: OnError = "skip",
        check: Check = "header",
        min_size: float = 1.0,
        drop_empty: bool = False,
    ) -> None:
        super().__init__(transform, mean, std, on_error, check)
        if not min_size >= 1:
            raise ValueError(f"min_size must be >= 1 pixel, got {min_size!r}")
        self.image_dir = require_dir(images, "COCO image folder")
        self.ann_file = Path(annotations)
        data = self._read_json()
        ann = str(self.ann_file)
        categories = data["categories"]
        self.category_ids: tuple[int, ...] = tuple(sorted(c["id"] for c in categories))
        names = {c["id"]: str(c.get("name", c["id"])) for c in categories}
        self.class_names = tuple(names[i] for i in self.category_ids)
        label_of = {cid: label for label, cid in enumerate(self.category_ids)}

        entries: dict[int, dict] = {}
        sizes: dict[int, tuple[int, int] | None] = {}
        skipped: set[int] = set()
        for i, entry in enumerate(data["images"]):
            where = f"{ann}: images[{i}]"
            if (
                not isinstance(entry, dict)
                or not _is_int(entry.get("id"))
                or not isinstance(entry.get("file_name"), str)
            ):
                self.issues.append(DataIssue(where, "image entry needs an integer 'id' and a string 'file_name'"))
                continue
            image_id = entry["id"]
            if image_id in entries:
                self.issues.append(DataIssue(where, f"duplicate image id {image_id}"))
                continue
            path = self.image_dir / entry["file_name"]
            size, problem = probe_image(path, check)
            declared = (entry.get("width"), entry.get("height"))
            if problem is None and size is not None and None not in declared and tuple(size) != declared:
                problem = f"image is {size[0]}x{size[1]} but {ann} says {declared[0]}x{declared[1]}"
            entries[image_id] = entry
            if problem:
                self.issues.append(DataIssue(str(path), problem))
                skipped.add(image_id)
            sizes[image_id] = declared if None not in declared else size

        objects: dict[int, list[tuple[list[float], int, bool]]] = {i: [] for i in entries}
        for i, a in enumerate(data.get("annotations", [])):
            if not isinstance(a, dict):
                self.issues.append(DataIssue(f"{ann}: annotations[{i}]", f"annotation must be an object, got {a!r}"))
                continue
            where = f"{ann}: annotation id={a.get('id')} (annotations[{i}], image_id={a.get('image_id')})"
            image_id, category = a.get("image_id"), a.get("category_id")
            if _is_int(image_id) and image_id in skipped:
                continue  # its image is already reported
            if not _is_int(image_id) or image_id not in entries:
                problem = f"image_id {image_id!r} is not in 'images'"
            elif not _is_int(category) or category not in label_of:
                problem = f"category_id {category!r} is not in the class list {list(self.category_ids)}"
            elif a.get("iscrowd", 0) not in (0, 1):
                problem = f"iscrowd must be 0 or 1, got {a.get('iscrowd')!r}"
            else:
                problem = _box_problem(a.get("bbox"), *(sizes[image_id] or (None, None)))
            if problem:
                self.issues.append(DataIssue(where, problem))
                continue
            objects[image_id].append((a["bbox"], label_of[category], bool(a.get("iscrowd", 0))))

        self.records: list[_Record] = []
        for image_id, entry in entries.items():
            if image_id in skipped or (drop_empty and not objects[image_id]):
                continue
            found = objects[image_id]
            xywh = np.array([b for b, _, _ in found], dtype=np.float32).reshape(-1, 4)  # (K, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # (K, 4) xyxy
            self.records.append(
                _Record(
                    self.image_dir / entry["file_name"],
                    image_id,
                    boxes,
                    np.array([label for _, label, _ in found], dtype=np.int64),
                    np.array([crowd for _, _, crowd in found], dtype=bool),
                )
            )
        self._sanitize = v2.Compose(
            [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=min_size, labels_getter=_labels_and_crowd)]
        )
        report_issues(self.issues, on_error, f"CocoDetection({ann!r})", "images and annotations")

    def _read_json(self) -> dict:
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file {str(self.ann_file)!r} not found")
        try:
            data = json.loads(self.ann_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.ann_file}: not valid JSON ({e})", [DataIssue(str(self.ann_file), str(e))]) from e
        problem = None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            problem = "a COCO file is an object with an 'images' list"
        elif not isinstance(data.get("annotations", []), list):
            problem = "'annotations' must be a list"
        elif not isinstance(data.get("categories"), list) or not data["categories"]:
            problem = "a COCO detection file needs a non-empty 'categories' list"
        elif not all(isinstance(c, dict) and _is_int(c.get("id")) for c in data["categories"]):
            problem = "every category needs an integer 'id'"
        elif len({c["id"] for c in data["categories"]}) != len(data["categories"]):
            problem = f"duplicate category ids in {sorted(c['id'] for c in data['categories'])}"
        if problem:
            raise DataError(f"{self.ann_file}: {problem}", [DataIssue(str(self.ann_file), problem)])
        return data

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.records[index]
        image = read_image(record.path)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(record.boxes), format="XYXY", canvas_size=tuple(image.shape[-2:])
            ),
            "labels": torch.from_numpy(record.labels),
            "iscrowd": torch.from_numpy(record.iscrowd),
            "image_id": record.image_id,
        }
        if self.transform is not None:
            image, target = self.transform(image, target)
        image, target = self._sanitize(image, target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor).float()  # (K, 4)
        return self.normalize(image), target

    def __repr__(self) -> str:
        return f"CocoDetection(annotations={str(self.ann_file)!r}, {len(self)} images, {self.num_classes} classes)"

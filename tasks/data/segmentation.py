"""Semantic segmentation from an image folder and a folder of PNG masks (VOC-style, 255 = ignore)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors

from .common import (
    IGNORE_INDEX,
    IMG_EXTENSIONS,
    Check,
    DataError,
    DataIssue,
    FolderDataset,
    OnError,
    collate_segmentation,
    probe_image,
    read_image,
    read_mask,
    report_issues,
    require_dir,
)


def _mask_problem(mask: np.ndarray, num_classes: int) -> str | None:
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if not bad.any():
        return None
    values = np.unique(mask[bad]).tolist()
    return f"mask values {values[:10]} outside the class list (0..{num_classes - 1}, {IGNORE_INDEX} = ignore)"


class SegmentationFolder(FolderDataset):
    """Images plus same-named single-channel PNG masks; items are (image float32 (3, H, W), mask int64 (H, W)).

    Mask pixels hold class ids 0..C-1 (palette indices for VOC "P" PNGs) or 255 = ignore. The layout is
    `root/<images>/<id>.<jpg|png|...>` and `root/<masks>/<id>.png`; ids are the image file stems, or the lines
    of a VOC `ImageSets` file given as `ids`. Problems are reported as path + reason: a missing or corrupt image
    or mask, a mask that is not single-channel or differs in size from its image, and ("full" check, or when the
    item is loaded) mask values outside the class list. With `on_error="skip"` (default) bad pairs are skipped
    with one warning giving the count; "raise" raises a `DataError` that lists them. A bad mask found only when
    the item is loaded always raises (a map-style dataset cannot skip an item then).

    Args:
        root: dataset folder.
        class_names: names of classes 0..C-1 (C <= 255).
        transform: called as `transform(image, mask)` on a uint8 `tv_tensors.Image` and a `tv_tensors.Mask`
            (resized with nearest neighbours; padding should fill 255); normalisation happens afterwards.
        images: sub-folder with the images.
        masks: sub-folder with the masks.
        ids: a file listing ids one per line (relative to `root` unless absolute), or a sequence of ids.
        mean: normalisation mean (one number or one per channel).
        std: normalisation std.
        on_error: "skip" or "raise".
        check: up-front checks: "none" (files exist), "header" (open + verify, sizes, mask mode) or "full"
            (decode, mask values).
    """

    collate = staticmethod(collate_segmentation)

    def __init__(
        self,
        root: str | os.PathLike,
        class_names: Sequence[str],
        transform: Callable | None = None,
        *,
        images: str = "images",
        masks: str = "masks",
        ids: str | os.PathLike | Sequence[str] | None = None,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        on_error: OnError = "skip",
        check: Check = "header",
    ) -> None:
        super().__init__(transform, mean, std, on_error, check)
        if isinstance(class_names, str) or not 0 < len(class_names) < IGNORE_INDEX:
            raise ValueError(f"class_names must be a sequence of 1 to {IGNORE_INDEX - 1} names, got {class_names!r}")
        self.class_names = tuple(class_names)
        self.root = require_dir(root, "segmentation root")
        self.image_dir = require_dir(self.root / images, "image folder")
        self.mask_dir = require_dir(self.root / masks, "mask folder")
        found = {
            p.stem: p
            for p in sorted(self.image_dir.iterdir())
            if p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")
        }
        if ids is None:
            ids = sorted(found)
        elif isinstance(ids, (str, os.PathLike)):
            ids_file = self.root / ids
            if not ids_file.is_file():
                raise FileNotFoundError(f"ids file {str(ids_file)!r} not found")
            ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
        self.samples: list[tuple[Path, Path]] = []
        for sample_id in ids:
            image, mask = found.get(sample_id), self.mask_dir / f"{sample_id}.png"
            problem = self._pair_problem(image, mask, sample_id)
            if problem:
                self.issues.append(problem)
            else:
                self.samples.append((image, mask))
        report_issues(self.issues, on_error, f"SegmentationFolder({str(self.root)!r})", "image/mask pairs")

    def _pair_problem(self, image: Path | None, mask: Path, sample_id: str) -> DataIssue | None:
        if image is None:
            return DataIssue(str(self.image_dir / sample_id), f"missing image (no {sample_id}.<image suffix>)")
        image_size, problem = probe_image(image, self.check)
        if problem:
            return DataIssue(str(image), problem)
        mask_size, problem = probe_image(mask, self.check, modes=("L", "P"))
        if problem:
            return DataIssue(str(mask), problem if problem != "missing file" else f"missing mask for image {image}")
        if self.check == "none":
            return None
        if image_size != mask_size:
            return DataIssue(
                str(mask), f"mask is {mask_size[0]}x{mask_size[1]}, its image {image_size[0]}x{image_size[1]}"
            )
        if self.check == "full":
            problem = _mask_problem(read_mask(mask), self.num_classes)
            return DataIssue(str(mask), problem) if problem else None
        return None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.samples[index]
        image, values = read_image(image_path), read_mask(mask_path)
        problem = _mask_problem(values, self.num_classes)
        if problem is None and values.shape != tuple(image.shape[-2:]):
            problem = f"mask is {values.shape[1]}x{values.shape[0]}, its image {image.shape[2]}x{image.shape[1]}"
        if problem:
            raise DataError(f"{mask_path}: {problem}", [DataIssue(str(mask_path), problem)])
        mask = tv_tensors.Mask(torch.from_numpy(values))  # (H, W) uint8
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"the transform gave a {tuple(mask.shape)} mask for a {tuple(image.shape)} image")
        return self.normalize(image), mask.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"SegmentationFolder(root={str(self.root)!r}, {len(self)} pairs, {self.num_classes} classes)"

"""ImageFolder-style classification: root/<class>/<image>, one folder per class."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .common import (
    IMG_EXTENSIONS,
    Check,
    DataIssue,
    FolderDataset,
    OnError,
    collate_classification,
    probe_image,
    read_image,
    report_issues,
    require_dir,
)


class ImageFolder(FolderDataset):
    """Images in one sub-folder per class; items are (image float32 (3, H, W), label int).

    Classes are the sub-folder names in sorted order unless `classes` fixes the names and their order (then every
    listed folder must exist; other folders are reported and skipped). Files whose suffix is not an image suffix
    are ignored; missing or corrupt images are reported (path + reason) and skipped with one warning, or raise a
    `DataError` with `on_error="raise"`.

    Args:
        root: folder with one sub-folder per class.
        transform: called on the uint8 `tv_tensors.Image` (3, H, W) (e.g. `train_transforms(size)`); the dataset
            then scales to [0, 1] and normalises with `mean` / `std`.
        mean: normalisation mean (one number or one per channel).
        std: normalisation std.
        classes: class folder names in label order (default: sorted sub-folder names).
        on_error: "skip" (warn with the count) or "raise" for corrupt files.
        check: how much each image is checked up front: "none", "header" (open + verify, cheap) or "full" (decode).
        extensions: file suffixes taken as images (case-insensitive).
    """

    collate = staticmethod(collate_classification)

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        *,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        classes: Sequence[str] | None = None,
        on_error: OnError = "skip",
        check: Check = "header",
        extensions: Sequence[str] = IMG_EXTENSIONS,
    ) -> None:
        super().__init__(transform, mean, std, on_error, check)
        self.root = require_dir(root, "ImageFolder root")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            if not folders:
                raise ValueError(f"ImageFolder root {str(self.root)!r} has no class sub-folders")
            classes = folders
        else:
            classes = list(classes)
            missing = [c for c in classes if c not in folders]
            if missing or len(set(classes)) != len(classes) or not classes:
                raise ValueError(
                    f"classes must be distinct, non-empty and name sub-folders of {str(self.root)!r}; "
                    f"got {classes!r} (missing: {missing!r}; folders there: {folders!r})"
                )
            for extra in sorted(set(folders) - set(classes)):
                self.issues.append(DataIssue(str(self.root / extra), f"class folder not in classes={classes!r}"))
        self.class_names = tuple(classes)
        suffixes = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.class_names):
            for path in sorted((self.root / name).rglob("*")):
                if path.suffix.lower() not in suffixes or path.name.startswith(".") or path.is_dir():
                    continue
                _, problem = probe_image(path, check)
                if problem:
                    self.issues.append(DataIssue(str(path), problem))
                else:
                    self.samples.append((path, label))
        report_issues(self.issues, on_error, f"ImageFolder({str(self.root)!r})", "images")

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = read_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return self.normalize(image), label

    def __repr__(self) -> str:
        return f"ImageFolder(root={str(self.root)!r}, {len(self)} images, {self.num_classes} classes)"

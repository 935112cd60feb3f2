"""Shared pieces of the datasets: problem reporting, image reading, normalisation and collate functions."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import tv_tensors

OnError = Literal["skip", "raise"]
Check = Literal["none", "header", "full"]
ON_ERROR = ("skip", "raise")
CHECKS = ("none", "header", "full")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IGNORE_INDEX = 255


@dataclass(frozen=True)
class DataIssue:
    """One problem found in a dataset: where (a file, or a file plus an annotation) and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class DataError(ValueError):
    """Corrupt / missing files or invalid annotations; `issues` lists every problem (path + reason)."""

    def __init__(self, message: str, issues: Sequence[DataIssue] = ()) -> None:
        super().__init__(message)
        self.issues = list(issues)


def format_issues(issues: Sequence[DataIssue], limit: int = 10) -> str:
    lines = [f"  {issue}" for issue in issues[:limit]]
    if len(issues) > limit:
        lines.append(f"  ... and {len(issues) - limit} more")
    return "\n".join(lines)


def report_issues(issues: Sequence[DataIssue], on_error: OnError, source: str, what: str) -> None:
    """Apply the problem policy: raise a `DataError` listing them, or warn once with their count."""
    if not issues:
        return
    if on_error == "raise":
        raise DataError(
            f"{source}: {len(issues)} problem(s) (on_error='raise'; pass on_error='skip' to skip {what} "
            f"with a warning):\n{format_issues(issues)}",
            issues,
        )
    warnings.warn(
        f"{source}: skipped {len(issues)} problem(s) in {what}; the first: {issues[0]} (all in `dataset.issues`)",
        stacklevel=3,
    )


def validate_options(on_error: str, check: str, mean: Any, std: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the shared constructor options; returns mean and std as (3, 1, 1) tensors."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    stats = []
    for name, value in (("mean", mean), ("std", std)):
        values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(values) != 3 or (name == "std" and min(values) <= 0):
            raise ValueError(f"{name} must be a number or 3 numbers (std > 0), got {value!r}")
        stats.append(torch.tensor(values, dtype=torch.float32).view(3, 1, 1))
    return stats[0], stats[1]


def require_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} is not a directory")
    return path


def probe_image(
    path: Path, check: Check, modes: Sequence[str] | None = None
) -> tuple[tuple[int, int] | None, str | None]:
    """Look at an image file as deep as `check` asks: ((width, height) or None, problem or None).

    `modes` restricts the accepted PIL modes (masks: "L" or "P"); by default 32-bit / 16-bit grey are refused.
    """
    if not path.is_file():
        return None, "missing file"
    if check == "none":
        return None, None
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            if check == "full":
                im.load()
            else:
                im.verify()  # reads the whole stream without decoding pixels (checksums, truncation for PNG)
    except Exception as e:  # PIL raises many types for broken files
        return None, f"unreadable image ({type(e).__name__}: {e})"
    if (modes is not None and mode not in modes) or (modes is None and mode in ("I", "F", "I;16")):
        accepted = f"; accepted: {', '.join(modes)}" if modes else ""
        return size, f"unsupported image mode {mode!r}{accepted}"
    return size, None


def upright_rgb(image: Image.Image) -> Image.Image:
    """A decoded image as it is shown: EXIF orientation applied (phone photos), RGB. Training data, `predict` and
    the server all decode through this, so one photo gives one tensor everywhere."""
    return ImageOps.exif_transpose(image).convert("RGB")


def image_tensor(image: Image.Image) -> tv_tensors.Image:
    """An RGB PIL image as a uint8 (3, H, W) tensor."""
    return tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1))


def normalize(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (or float in [0, 1]) (3, H, W) -> float32 (3, H, W) scaled to [0, 1] and normalised per channel
    (`mean` / `std`: (3, 1, 1))."""
    x = image.as_subclass(torch.Tensor)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return (x - mean) / std


def read_image(path: Path) -> tv_tensors.Image:
    """Decode an image file as RGB uint8 (3, H, W), upright; a `DataError` names the file if that fails."""
    try:
        with Image.open(path) as im:
            return image_tensor(upright_rgb(im))
    except Exception as e:
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})", [DataIssue(str(path), str(e))]) from e


def read_mask(path: Path) -> np.ndarray:
    """Decode a single-channel (L or P) PNG mask as uint8 (H, W); P masks give palette indices (VOC)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise ValueError(f"mask must be a single-channel L or P image, got mode {im.mode!r}")
            return np.array(im)  # (H, W)
    except Exception as e:
        raise DataError(f"{path}: unreadable mask ({type(e).__name__}: {e})", [DataIssue(str(path), str(e))]) from e


class FolderDataset(Dataset):
    """Base of the datasets here: applies the transform, then scales to [0, 1] and normalises.

    Subclasses set `class_names`, `issues` and implement `__len__` / `__getitem__`.
    """

    class_names: tuple[str, ...]
    issues: list[DataIssue]
    collate: Callable[[list], Any]

    def __init__(
        self,
        transform: Callable | None,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        on_error: OnError,
        check: Check,
    ) -> None:
        self.mean, self.std = validate_options(on_error, check, mean, std)
        self.transform, self.on_error, self.check = transform, on_error, check
        self.issues = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 1]) (3, H, W) -> float32 (3, H, W) normalised with the dataset's mean/std."""
        return normalize(image, self.mean, self.std)


def _stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    sizes = {tuple(x.shape) for x in images}
    if len(sizes) > 1:
        raise ValueError(
            f"cannot batch images of different sizes {sorted(sizes)}; give the dataset a transform that resizes "
            "to a fixed size (e.g. multitask_peft.tasks.data.eval_transforms(size))"
        )
    return torch.stack(list(images))  # (N, 3, H, W)


def collate_classification(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(image, label)] -> images (N, 3, H, W), labels int64 (N,)."""
    images, labels = zip(*batch)
    return _stack_images(images), torch.as_tensor(labels, dtype=torch.int64)


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """[(image, target)] -> images (N, 3, H, W), list of N target dicts."""
    images, targets = zip(*batch)
    return _stack_images(images), list(targets)


def collate_segmentation(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(image, mask)] -> images (N, 3, H, W), masks int64 (N, H, W)."""
    images, masks = zip(*batch)
    return _stack_images(images), torch.stack(list(masks))  # (N, H, W)


class IndexedSubset(Dataset):
    """Items `indices` of `dataset`, keeping what our datasets expose (`collate`, `class_names`, `num_classes`, ...:
    every attribute not found here is the dataset's)."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Any:
        return self.dataset[self.indices[k]]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "indices"):  # (unpickling in DataLoader workers)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def holdout_indices(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split `range(size)` into (kept, held out) with round(fraction * size) items held out, drawn by `seed`; both
    parts ascending. A `ValueError` if either part would be empty."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction!r}")
    held = round(fraction * size)
    if not 0 < held < size:
        raise ValueError(f"holding out {fraction} of {size} items leaves {held} held out and {size - held} kept")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])

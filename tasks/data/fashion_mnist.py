"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files read directly, no download)."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .common import collate_classification, normalize, validate_options

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # unsigned byte payload
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file ({payload.size} values for shape {dims})")
    return payload.reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the official `train` (60k) or `test` (10k) split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root}; install it with `apt-get install dataset-fashion-mnist` "
            "(Debian) or point FASHION_MNIST_DIR at a folder with the four *-ubyte.gz files"
        )
    x, y = _read_idx(images), _read_idx(labels).astype(np.int64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{root}: {x.shape[0]} images but {y.shape[0]} labels in the {split} split")
    return x, y


def to_model_input(images: np.ndarray, size: int, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """Grey uint8 (N, 28, 28) -> normalised float (N, 3, size, size): upsampled, grey repeated to 3 channels."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)[:, None]  # (N, 1, 28, 28)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()  # (N, 3, size, size)


class FashionMNIST(Dataset):
    """An official Fashion-MNIST split as a dataset of (image float32 (3, H, W) normalised, label int): the grey
    28 x 28 image repeated to RGB, passed to `transform` as a uint8 `tv_tensors.Image` (e.g.
    `eval_transforms(size)`), then scaled to [0, 1] and normalised with `mean` / `std`.

    Args:
        split: "train" (60,000 images) or "test" (10,000).
        transform: Called on each uint8 (3, 28, 28) image (None: used as is).
        root: Folder of the four IDX files (default: the Debian package's, or $FASHION_MNIST_DIR).
        mean: Normalisation mean (one number or one per channel).
        std: Normalisation std.
    """

    collate = staticmethod(collate_classification)
    class_names = CLASSES
    num_classes = len(CLASSES)

    def __init__(
        self,
        split: str = "train",
        transform: Callable | None = None,
        *,
        root: str | os.PathLike | None = None,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
    ) -> None:
        self.images, self.labels = load_fashion_mnist(split, root)
        self.transform = transform
        self.mean, self.std = validate_options("skip", "none", mean, std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        grey = torch.from_numpy(self.images[index].copy())  # (28, 28) uint8
        image = tv_tensors.Image(grey[None].expand(3, -1, -1).contiguous())  # (3, 28, 28)
        if self.transform is not None:
            image = self.transform(image)
        return normalize(image, self.mean, self.std), int(self.labels[index])

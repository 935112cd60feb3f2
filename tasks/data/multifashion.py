"""MultiFashion: a real-data multi-task dataset built offline from Fashion-MNIST and scikit-image photos.

Layout written by `generate_multifashion(out, config)` (`mtpeft data multifashion OUT`):

```
OUT/multifashion.json                                   class names, sizes, seed, layout
OUT/classification/{train,val,test}/<k>_<name>/*.png    one garment per image (ImageFolder; k = class index)
OUT/detection/{train,val,test}/images/*.jpg             scenes of several garments on real photos
OUT/detection/{train,val,test}.json                     COCO: exact boxes, visible-mask RLE, category id k + 1
OUT/segmentation/{train,val,test}/images/*.jpg          the same scenes (hard links)
OUT/segmentation/{train,val,test}/masks/*.png           0 = background, k + 1 = Fashion-MNIST class k
```

Train and val garments come from disjoint parts of Fashion-MNIST's train split, test garments from its test
split. Every item is rendered from its own seed (seed, split, kind, index), so the output does not depend on the
number of workers.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .classification import ImageFolder
from .coco import CocoDetection
from .common import IGNORE_INDEX, FolderDataset
from .fashion_mnist import CLASSES, load_fashion_mnist
from .scenes import (
    BACKGROUNDS,
    background_pyramid,
    load_backgrounds,
    mask_to_rle,
    random_background,
    render_crop,
    render_scene,
)
from .segmentation import SegmentationFolder

SPLITS = ("train", "val", "test")
TASKS = ("classification", "detection", "segmentation")
FORMATS = ("jpg", "png")
VAL_POOL = 10_000  # Fashion-MNIST train images reserved for the val split
CROP_SCALE = (0.6, 0.95)  # garment side in a classification image, as a fraction of the image side
OUTPUTS = ("classification", "detection", "segmentation", "multifashion.json")
# Class folder names: index-prefixed so that sorted order is label order (plain ImageFolder readers agree).
FOLDERS = tuple(f"{k}_{name.replace('/', '_').replace(' ', '_')}" for k, name in enumerate(CLASSES))
SEGMENTATION_CLASSES = ("background", *CLASSES)
PALETTE = [0, 0, 0] + [int(v) for k in range(1, 256) for v in ((k * 67) % 256, (k * 151) % 256, (k * 211) % 256)]


def _three(value: Sequence[int] | int, name: str) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, int) and v >= 0 for v in values):
        raise ValueError(f"{name} must be three counts >= 0 (train, val, test), got {value!r}")
    return values  # type: ignore[return-value]


@dataclass
class MultiFashionConfig:
    """What to generate.

    Args:
        num_scenes: scenes per split (train, val, test), for detection and segmentation.
        num_crops: single-garment classification images per split.
        image_size: side of a scene in pixels.
        crop_size: side of a classification image in pixels.
        max_objects: garments per scene are drawn uniformly from 1..max_objects.
        object_scale: garment side as a fraction of the scene side (low, high).
        max_overlap: largest overlap of two garments' boxes, as a fraction of the smaller box.
        seed: everything is a function of it.
        image_format: "jpg" (quality 95) or "png" (lossless) for scene images; masks and crops are always PNG.
        workers: processes (0: all CPU cores).
        fashion_mnist_dir: folder with the four Fashion-MNIST *-ubyte.gz files (default: the Debian package's).
    """

    num_scenes: tuple[int, int, int] = (2000, 500, 500)
    num_crops: tuple[int, int, int] = (2000, 500, 500)
    image_size: int = 128
    crop_size: int = 64
    max_objects: int = 4
    object_scale: tuple[float, float] = (0.25, 0.6)
    max_overlap: float = 0.3
    seed: int = 0
    image_format: str = "jpg"
    workers: int = 0
    fashion_mnist_dir: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.num_scenes, self.num_crops = _three(self.num_scenes, "num_scenes"), _three(self.num_crops, "num_crops")
        for name in ("image_size", "crop_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 16:
                raise ValueError(f"{name} must be an int >= 16 pixels, got {getattr(self, name)!r}")
        if not isinstance(self.max_objects, int) or self.max_objects < 1:
            raise ValueError(f"max_objects must be an int >= 1, got {self.max_objects!r}")
        self.object_scale = tuple(float(v) for v in self.object_scale)
        low, high = self.object_scale if len(self.object_scale) == 2 else (0.0, 0.0)
        if not 0 < low <= high <= 1 or round(low * self.image_size) < 8:
            raise ValueError(
                f"object_scale must be (low, high) with 0 < low <= high <= 1 and low * image_size >= 8 pixels, "
                f"got {self.object_scale!r}"
            )
        if not 0 <= self.max_overlap <= 1:
            raise ValueError(f"max_overlap must be in [0, 1], got {self.max_overlap!r}")
        if self.image_format not in FORMATS:
            raise ValueError(f"image_format must be one of {FORMATS}, got {self.image_format!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an int >= 0 (0 = all cores), got {self.workers!r}")


# ---------------------------------------------------------------------------------------------- rendering (workers)
_STATE: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    _STATE.update(state)


def _rng(config: MultiFashionConfig, split: int, kind: int, index: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, split, kind, index])


def _render_crops(job: tuple[str, int, np.ndarray]) -> int:
    """Classification images `start..` of a split; `garments` indexes the split's pool."""
    split, start, garments = job
    config, out = _STATE["config"], _STATE["out"]
    pool, images, labels = _STATE["pools"][split], _STATE["images"], _STATE["labels"]
    for offset, g in enumerate(garments):
        index = start + offset
        rng = _rng(config, SPLITS.index(split), 0, index)
        picture, label = images[pool[g]], int(labels[pool[g]])
        background = random_background(_STATE["crop_backgrounds"], config.crop_size, rng)
        crop = render_crop(background, picture, CROP_SCALE, rng)
        Image.fromarray(crop).save(out / "classification" / split / FOLDERS[label] / f"{index:06d}.png")
    return len(garments)


def _render_scenes(job: tuple[str, int, int]) -> tuple[str, list[tuple[int, list[dict]]]]:
    """Scenes `start..stop` of a split: writes image, hard link and mask; returns COCO annotations per scene."""
    split, start, stop = job
    config, out = _STATE["config"], _STATE["out"]
    pool, images, labels = _STATE["pools"][split], _STATE["images"], _STATE["labels"]
    results = []
    for index in range(start, stop):
        rng = _rng(config, SPLITS.index(split), 1, index)
        background = random_background(_STATE["scene_backgrounds"], config.image_size, rng)
        picks = pool[rng.integers(len(pool), size=int(rng.integers(1, config.max_objects + 1)))]
        garments = [(images[i], int(labels[i])) for i in picks]
        scene = render_scene(background, garments, config.object_scale, config.max_overlap, rng)
        name = f"{index:06d}"
        image_path = out / "detection" / split / "images" / f"{name}.{config.image_format}"
        options = {"quality": 95} if config.image_format == "jpg" else {"compress_level": 1}
        Image.fromarray(scene.image).save(image_path, **options)
        link = out / "segmentation" / split / "images" / image_path.name
        try:
            os.link(image_path, link)
        except OSError:
            shutil.copyfile(image_path, link)
        mask = Image.frombytes("P", scene.semantic.shape[::-1], np.ascontiguousarray(scene.semantic).tobytes())
        mask.putpalette(PALETTE)
        mask.save(out / "segmentation" / split / "masks" / f"{name}.png")
        annotations = [
            {
                "category_id": label + 1,
                "bbox": box,
                "area": int(visible.sum()),
                "iscrowd": 0,
                "segmentation": mask_to_rle(visible),
            }
            for label, box, visible in zip(scene.labels, scene.boxes, scene.masks)
        ]
        results.append((index, annotations))
    return split, results


# ---------------------------------------------------------------------------------------------- driver
def _prepare(out: Path, overwrite: bool) -> None:
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {existing}; pass overwrite=True (--overwrite) to replace them")
    for name in existing:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink()
    for split in SPLITS:
        for folder in FOLDERS:
            (out / "classification" / split / folder).mkdir(parents=True)
        (out / "detection" / split / "images").mkdir(parents=True)
        (out / "segmentation" / split / "images").mkdir(parents=True)
        (out / "segmentation" / split / "masks").mkdir(parents=True)


def _chunks(total: int, workers: int) -> list[tuple[int, int]]:
    step = max(8, min(256, -(-total // (workers * 8)))) if total else 1
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _coco(split: str, config: MultiFashionConfig, scenes: list[tuple[int, list[dict]]]) -> dict:
    images, annotations = [], []
    for index, objects in sorted(scenes, key=lambda item: item[0]):
        name, size = f"{index:06d}.{config.image_format}", config.image_size
        images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1} | obj)
    return {
        "info": {
            "description": f"MultiFashion {split}: Fashion-MNIST garments on scikit-image photos",
            "version": "1.0",
            "seed": config.seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "garment"} for k, name in enumerate(CLASSES)],
    }


def generate_multifashion(
    out: str | os.PathLike, config: MultiFashionConfig | None = None, *, overwrite: bool = False, progress: bool = True
) -> dict:
    """Write MultiFashion to `out` (see the module docstring); returns the contents of `multifashion.json`.

    Raises:
        FileNotFoundError: the Fashion-MNIST files are missing (the message says what to install).
        FileExistsError: `out` already holds a dataset and `overwrite` is False.
    """
    from tqdm.auto import tqdm

    config = config or MultiFashionConfig()
    out = Path(out)
    train_x, train_y = load_fashion_mnist("train", config.fashion_mnist_dir)
    test_x, test_y = load_fashion_mnist("test", config.fashion_mnist_dir)
    photos = load_backgrounds()
    _prepare(out, overwrite)
    order = np.random.default_rng([config.seed, 99]).permutation(len(train_x))
    offset = len(train_x)
    state = {
        "config": config,
        "out": out,
        "images": np.concatenate([train_x, test_x]),
        "labels": np.concatenate([train_y, test_y]),
        "pools": {"train": order[VAL_POOL:], "val": order[:VAL_POOL], "test": np.arange(len(test_x)) + offset},
        "scene_backgrounds": background_pyramid(photos, config.image_size),
        "crop_backgrounds": background_pyramid(photos, config.crop_size),
    }
    crop_jobs, scene_jobs = [], []
    workers = config.workers or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    for s, split in enumerate(SPLITS):
        pool_size, n = len(state["pools"][split]), config.num_crops[s]
        rng = np.random.default_rng([config.seed, s, 2])
        picks = np.concatenate([rng.permutation(pool_size) for _ in range(-(-n // pool_size))] or [[]])[:n]
        crop_jobs += [(split, a, picks[a:b]) for a, b in _chunks(n, workers)]
        scene_jobs += [(split, a, b) for a, b in _chunks(config.num_scenes[s], workers)]
    bar = tqdm(
        total=sum(config.num_crops) + sum(config.num_scenes), desc="multifashion", unit="img", disable=not progress
    )
    scenes: dict[str, list] = {split: [] for split in SPLITS}
    context = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = context.Pool(workers, _init_worker, (state,)) if workers > 1 else None
    try:
        _init_worker(state)
        run = pool.imap_unordered if pool else map
        for done in run(_render_crops, crop_jobs):
            bar.update(done)
        for split, result in run(_render_scenes, scene_jobs):
            scenes[split] += result
            bar.update(len(result))
    finally:
        _STATE.clear()
        if pool:
            pool.close()
            pool.join()
        bar.close()
    for split in SPLITS:
        (out / "detection" / f"{split}.json").write_text(json.dumps(_coco(split, config, scenes[split])))
    meta = {
        "name": "MultiFashion",
        "version": 1,
        "config": {k: v for k, v in asdict(config).items() if k not in ("workers", "fashion_mnist_dir")},
        "classes": list(CLASSES),
        "classification_folders": list(FOLDERS),
        "segmentation_classes": list(SEGMENTATION_CLASSES),
        "ignore_index": IGNORE_INDEX,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "splits": {
            split: {
                "crops": config.num_crops[s],
                "scenes": config.num_scenes[s],
                "objects": sum(len(objects) for _, objects in scenes[split]),
                "garment_source": "fashion-mnist test" if split == "test" else f"fashion-mnist train ({split} part)",
            }
            for s, split in enumerate(SPLITS)
        },
        "backgrounds": [f"skimage.data.{name}" for name in BACKGROUNDS],
    }
    (out / "multifashion.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_multifashion(
    root: str | os.PathLike, task: str, split: str, transform: Any = None, **kwargs: Any
) -> FolderDataset:
    """A MultiFashion dataset with this project's loaders: `ImageFolder`, `CocoDetection` or `SegmentationFolder`.

    Args:
        root: the folder `generate_multifashion` wrote.
        task: "classification", "detection" or "segmentation".
        split: "train", "val" or "test".
        transform: passed to the dataset (e.g. `train_transforms(128)`).
        **kwargs: further dataset options (`on_error`, `check`, ...).
    """
    root = Path(root)
    if task not in TASKS or split not in SPLITS:
        raise ValueError(f"task must be one of {TASKS} and split one of {SPLITS}, got {task!r}, {split!r}")
    if not (root / "multifashion.json").is_file():
        raise FileNotFoundError(f"{root} has no multifashion.json; build it with `mtpeft data multifashion {root}`")
    meta = json.loads((root / "multifashion.json").read_text())
    if task == "classification":
        dataset = ImageFolder(root / task / split, transform, classes=meta["classification_folders"], **kwargs)
        dataset.class_names = tuple(meta["classes"])  # the garments' names, not their folder names
        return dataset
    if task == "detection":
        return CocoDetection(root / task / split / "images", root / task / f"{split}.json", transform, **kwargs)
    return SegmentationFolder(root / task / split, meta["segmentation_classes"], transform, **kwargs)

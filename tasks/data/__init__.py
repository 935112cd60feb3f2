"""Datasets in common formats (ImageFolder, COCO JSON, image + PNG mask folders), joint image / box / mask
augmentation with `torchvision.transforms.v2`, Fashion-MNIST, and the MultiFashion generator.

Every dataset returns (image float32 (3, H, W) normalised with its mean / std, target): an int label, a detection
dict {"boxes" (K, 4) xyxy, "labels" (K,), "iscrowd" (K,), "image_id"}, or an int64 (H, W) mask (255 = ignore).
Each exposes `class_names`, `issues` (problems found, path + reason) and `collate` for a `DataLoader`.

`CORRUPTIONS` is a suite of ImageNet-C-style corruptions (noise, blur, digital, elastic; severities 1..5, seeded);
`Corrupted(dataset, corruption, severity, mean, std, seed)` shows any of these datasets through one of them.
"""

from .classification import ImageFolder
from .coco import CocoDetection
from .common import (
    IGNORE_INDEX,
    DataError,
    DataIssue,
    collate_classification,
    collate_detection,
    collate_segmentation,
)
from .corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    Corrupted,
    Corruption,
    check_corruption_names,
    check_severities,
    check_severity,
)
from .multifashion import MultiFashionConfig, generate_multifashion, load_multifashion
from .segmentation import SegmentationFolder
from .transforms import eval_transforms, train_transforms

__all__ = [
    "CORRUPTIONS",
    "IGNORE_INDEX",
    "SEVERITIES",
    "CocoDetection",
    "Corrupted",
    "Corruption",
    "DataError",
    "DataIssue",
    "ImageFolder",
    "MultiFashionConfig",
    "SegmentationFolder",
    "check_corruption_names",
    "check_severities",
    "check_severity",
    "collate_classification",
    "collate_detection",
    "collate_segmentation",
    "eval_transforms",
    "generate_multifashion",
    "load_multifashion",
    "train_transforms",
]

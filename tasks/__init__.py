"""Task heads, datasets and metrics: classification, detection, semantic segmentation, embeddings; OpenMMLab
heads (mmdet dense heads, mmseg decode heads) behind the same interface."""

from multitask_peft.heads import HEADS, FeatureInfo, Head, HeadConfig, register_head

from .classification import Classification, ClassificationHead
from .detection import Detection, DetectionHead
from .embedding import Embedding, EmbeddingHead
from .evaluate import collate_pairs, evaluate
from .metrics import METRICS, ClassificationMetric, DetectionMetric, SegmentationMetric, TaskMetric, metric_for
from .openmmlab import MMDetDenseHead, MMDetHead, MMSegDecodeHead, MMSegHead
from .segmentation import Segmentation, SegmentationHead, soft_dice_loss

__all__ = [
    "HEADS",
    "METRICS",
    "Classification",
    "ClassificationHead",
    "ClassificationMetric",
    "Detection",
    "DetectionHead",
    "DetectionMetric",
    "Embedding",
    "EmbeddingHead",
    "FeatureInfo",
    "Head",
    "HeadConfig",
    "MMDetDenseHead",
    "MMDetHead",
    "MMSegDecodeHead",
    "MMSegHead",
    "Segmentation",
    "SegmentationHead",
    "SegmentationMetric",
    "TaskMetric",
    "collate_pairs",
    "evaluate",
    "metric_for",
    "register_head",
    "soft_dice_loss",
]

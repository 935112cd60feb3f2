"""Task heads, output kinds, datasets and metrics: classification, detection, semantic segmentation, embeddings;
OpenMMLab heads (mmdet dense heads, mmseg decode heads) behind the same interface.

Importing this package registers the heads (`HEADS`) and the output kinds (`OUTPUT_KINDS`: per kind its tensor
form, result decoding, JSON form and metric; one module each, `*_output.py`).
"""

from multitask_peft.heads import HEADS, FeatureInfo, Head, HeadConfig, register_head
from multitask_peft.outputs import OUTPUT_KINDS, OutputKind, ResultOptions, TensorSpec, output_kind

from .classification import Classification, ClassificationHead
from .classification_output import ClassificationOutput
from .detection import Detection, DetectionHead
from .detection_output import DetectionOutput
from .embedding import Embedding, EmbeddingHead
from .embedding_output import EmbeddingOutput
from .evaluate import collate_pairs, evaluate, evaluate_tasks
from .metrics import ClassificationMetric, DetectionMetric, SegmentationMetric, TaskMetric, metric_for
from .openmmlab import MMDetDenseHead, MMDetHead, MMSegDecodeHead, MMSegHead
from .segmentation import Segmentation, SegmentationHead, soft_dice_loss
from .segmentation_output import SegmentationOutput

__all__ = [
    "HEADS",
    "OUTPUT_KINDS",
    "Classification",
    "ClassificationHead",
    "ClassificationMetric",
    "ClassificationOutput",
    "Detection",
    "DetectionHead",
    "DetectionMetric",
    "DetectionOutput",
    "Embedding",
    "EmbeddingHead",
    "EmbeddingOutput",
    "FeatureInfo",
    "Head",
    "HeadConfig",
    "MMDetDenseHead",
    "MMDetHead",
    "MMSegDecodeHead",
    "MMSegHead",
    "OutputKind",
    "ResultOptions",
    "Segmentation",
    "SegmentationHead",
    "SegmentationMetric",
    "SegmentationOutput",
    "TaskMetric",
    "TensorSpec",
    "collate_pairs",
    "evaluate",
    "evaluate_tasks",
    "metric_for",
    "output_kind",
    "register_head",
    "soft_dice_loss",
]

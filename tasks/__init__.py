"""Task heads (classification here; detection and segmentation build on the same interface)."""

from multitask_peft.heads import HEADS, FeatureInfo, Head, HeadConfig, register_head

from .classification import Classification, ClassificationHead

__all__ = ["HEADS", "Classification", "ClassificationHead", "FeatureInfo", "Head", "HeadConfig", "register_head"]

"""Image classification head: pooled backbone features -> linear layer or a small MLP.

Its tensor form (logits) and results are the classification output kind's (`classification_output`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from multitask_peft.config import check_class_names, check_positive_int
from multitask_peft.heads import FeatureInfo, Features, Head, HeadConfig, register_head


@register_head("classification")
@dataclasses.dataclass
class Classification(HeadConfig):
    """Classification head config.

    Args:
        num_classes: Number of classes.
        hidden_dim: Width of a hidden layer (an MLP head); None for a linear head.
        dropout: Dropout before the classifier.
        label_smoothing: Cross-entropy label smoothing.
        class_names: Optional names of the classes, saved with the task.
    """

    num_classes: int = 2
    hidden_dim: int | None = None
    dropout: float = 0.0
    label_smoothing: float = 0.0
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_positive_int("Classification", "num_classes", self.num_classes)
        if self.hidden_dim is not None:
            check_positive_int("Classification", "hidden_dim", self.hidden_dim)
        for field in ("dropout", "label_smoothing"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"Classification: `{field}` should be in [0, 1) but the value passed is {value!r}")
        self.class_names = check_class_names("Classification", self.class_names, self.num_classes)

    def build(self, info: FeatureInfo) -> ClassificationHead:
        return ClassificationHead(self, info.pooled_dim)


class ClassificationHead(Head):
    """Dropout + linear layer (or MLP) on the pooled features; outputs (N, num_classes) logits."""

    def __init__(self, config: Classification, in_dim: int) -> None:
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        if config.hidden_dim is None:
            self.classifier = nn.Linear(in_dim, config.num_classes)
        else:
            self.classifier = nn.Sequential(
                nn.Linear(in_dim, config.hidden_dim), nn.GELU(), nn.Linear(config.hidden_dim, config.num_classes)
            )

    def forward(self, features: Features) -> torch.Tensor:
        return self.classifier(self.dropout(features.pooled))  # (N, num_classes)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, label_smoothing=self.config.label_smoothing)

    def export_outputs(self, outputs: torch.Tensor, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {"logits": outputs}  # (N, num_classes)

    def class_logits(self, outputs: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        return outputs  # (N, num_classes)

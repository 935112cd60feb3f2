"""Embedding head: a task's pooled backbone features as its result (retrieval, clustering, feature serving).

It has no parameters and no loss: the task's PEFT modules are what make its features its own. A PEFT backbone
trained elsewhere (e.g. `PEFTBackbone` in an MMDetection config) is saved with this head, so that the saved task
serves its adapted features as they are, or lends its PEFT modules to a new head (`model.read_task(path,
head=...)`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from multitask_peft.heads import FeatureInfo, Features, Head, HeadConfig, register_head


@register_head("embedding")
@dataclasses.dataclass
class Embedding(HeadConfig):
    """Embedding head config.

    Args:
        normalize: L2-normalise the pooled features (cosine similarity becomes a dot product).
    """

    normalize: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.normalize, bool):
            raise ValueError(f"Embedding: `normalize` should be True or False, got {self.normalize!r}")

    def build(self, info: FeatureInfo) -> EmbeddingHead:
        return EmbeddingHead(self)


class EmbeddingHead(Head):
    """The pooled features (L2-normalised if asked); the tensor form of the embedding output kind."""

    def __init__(self, config: Embedding) -> None:
        super().__init__()
        self.config = config

    def forward(self, features: Features) -> torch.Tensor:
        pooled = features.pooled.float()  # (N, D)
        return F.normalize(pooled, dim=-1) if self.config.normalize else pooled

    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        raise ValueError(
            "an embedding head has no loss: it serves the features of its task's PEFT modules; to train them, "
            "give the task a head with a loss (read_task(path, head=...) keeps the PEFT modules and swaps the head)"
        )

    def export_outputs(self, outputs: torch.Tensor, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {"embedding": outputs}  # (N, D)

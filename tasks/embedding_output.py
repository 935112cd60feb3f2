"""The embedding output kind: one feature vector per image (no metric: what an embedding is good for depends on
its use).

Tensor form: "embedding" (N, D) float32. Results: one {"embedding": (D,)} per image. JSON: the vector as a list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from multitask_peft.heads import HeadConfig
from multitask_peft.outputs import JsonContext, OutputKind, Result, TensorSpec, register_output_kind


@register_output_kind("embedding")
class EmbeddingOutput(OutputKind):
    """The task's (pooled, optionally L2-normalised) features."""

    def tensor_spec(self, head_config: HeadConfig, image_size: tuple[int, int]) -> tuple[TensorSpec, ...]:
        return (TensorSpec("embedding", torch.float32, (-1, -1)),)  # D: the backbone's pooled width

    def decode(self, tensors: Mapping[str, torch.Tensor]) -> list[Result]:
        embeddings = tensors["embedding"]  # (N, D)
        return [{"embedding": embeddings[i]} for i in range(len(embeddings))]

    def oip_fields(self, num_classes: int | None) -> tuple[TensorSpec, ...]:
        return (TensorSpec("embedding", torch.float32, (-1, -1)),)

    def to_oip(self, results: Sequence[Mapping[str, Any]], contexts: Sequence[JsonContext]) -> dict[str, torch.Tensor]:
        return {"embedding": torch.stack([torch.as_tensor(r["embedding"]).float() for r in results])}

    def to_json(self, result: Mapping[str, Any], context: JsonContext) -> dict[str, Any]:
        """{"embedding": [float, ...]}."""
        return {"embedding": [float(v) for v in result["embedding"].float().tolist()]}

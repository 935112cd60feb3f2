"""The classification output kind: class logits per image, the best class and its probability.

Tensor form: "logits" (N, num_classes) float32. Results: one {"logits": (C,), "label": int, "score": float} per
image (`score`: the softmax probability of `label`). Metric: top-k accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from multitask_peft.config import check_positive_int
from multitask_peft.heads import HeadConfig
from multitask_peft.outputs import JsonContext, OutputKind, Result, TensorSpec, register_output_kind

from .metric_base import MetricDict, Results, check_batch


class ClassificationMetric(MetricDict):
    """Top-k accuracy (torchmetrics `MulticlassAccuracy(top_k=k, average="micro")`) from result logits.

    Keys are `top{k}` for each requested k. A k above `num_classes` is computed as top-`num_classes` (which is
    1.0, as a true top-k accuracy is when there are at most k classes), so the keys stay the same for any
    number of classes.

    Args:
        num_classes: Number of classes of the head.
        top_k: The k values to report.
    """

    def __init__(self, num_classes: int, top_k: Sequence[int] = (1, 5)) -> None:
        from torchmetrics.classification import MulticlassAccuracy

        check_positive_int("ClassificationMetric", "num_classes", num_classes)
        if not top_k:
            raise ValueError("ClassificationMetric: `top_k` should name at least one k, e.g. (1, 5); got ()")
        for k in top_k:
            check_positive_int("ClassificationMetric", "top_k", k)
        self.num_classes = num_classes
        self.metrics = {
            f"top{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro") for k in top_k
        }

    def update(self, results: Results, targets: torch.Tensor | Sequence[int]) -> None:
        """Args: results: [{"logits": (C,), ...}] per image; targets: int class index per image."""
        check_batch("ClassificationMetric", results, targets)
        if not results:
            return
        if any("logits" not in r for r in results):
            raise ValueError(f"ClassificationMetric.update: results need 'logits'; got keys {sorted(results[0])}")
        logits = torch.stack([torch.as_tensor(r["logits"]).detach().float().cpu() for r in results])  # (N, C)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"ClassificationMetric.update: logits of shape {tuple(logits.shape)}; expected (N, {self.num_classes})"
            )
        target = torch.as_tensor(targets, dtype=torch.int64).cpu().reshape(-1)  # (N,)
        self.update_all(logits, target)


@register_output_kind("classification")
class ClassificationOutput(OutputKind):
    """Logits, the arg-max label and its softmax probability."""

    primary_metric = "top1"

    def tensor_spec(self, head_config: HeadConfig, image_size: tuple[int, int]) -> tuple[TensorSpec, ...]:
        return (TensorSpec("logits", torch.float32, (-1, head_config.num_classes)),)

    def decode(self, tensors: Mapping[str, torch.Tensor]) -> list[Result]:
        logits = tensors["logits"]  # (N, C)
        scores, labels = logits.float().softmax(dim=-1).max(dim=-1)  # (N,) each
        return [{"logits": logits[i], "label": int(labels[i]), "score": float(scores[i])} for i in range(len(logits))]

    def from_class_logits(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": logits}  # (N, C)

    def oip_fields(self, num_classes: int | None) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec("logits", torch.float32, (-1, num_classes or -1)),
            TensorSpec("label", torch.int64, (-1,)),
            TensorSpec("score", torch.float32, (-1,)),
        )

    def to_oip(self, results: Sequence[Mapping[str, Any]], contexts: Sequence[JsonContext]) -> dict[str, torch.Tensor]:
        return {
            "logits": torch.stack([torch.as_tensor(r["logits"]).float() for r in results]),
            "label": torch.tensor([int(r["label"]) for r in results], dtype=torch.int64),
            "score": torch.tensor([float(r["score"]) for r in results], dtype=torch.float32),
        }

    def to_json(self, result: Mapping[str, Any], context: JsonContext) -> dict[str, Any]:
        """{"label", "score", "class_name"?, "logits"? (with `options.logits`)}."""
        label = int(result["label"])
        out: dict[str, Any] = {"label": label, "score": float(result["score"])}
        if context.class_names:
            out["class_name"] = context.class_names[label]
        if context.options.logits:
            out["logits"] = [float(v) for v in result["logits"].float().tolist()]
        return out

    def metric(self, head_config: HeadConfig) -> ClassificationMetric:
        return ClassificationMetric(head_config.num_classes)

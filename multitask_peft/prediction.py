"""Eval-mode prediction: (image, task or ensemble) requests in one routed pass, results decoded per output kind.

`MultiTaskModel.predict` / `predict_each` resolve names (WiSE copies for per-call alphas) and call `predict_rows`:
the rows share the backbone prefix their tasks have in common, every task's rows go through its head together,
rows run only for an ensemble are not decoded, and an ensemble combines its members' class logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import ensemble as ensembles
from .executor import RowPlan, run_backbone
from .outputs import output_kind

if TYPE_CHECKING:
    from .model import MultiTaskModel


def predict_rows(
    model: MultiTaskModel, images: torch.Tensor, requests: list[tuple[int, str]]
) -> dict[tuple[int, str], Any]:
    """One routed eval-mode pass (shared prefix) for (image, task or ensemble) requests; every task's rows go
    through its head together, an ensemble's members run once per image. Returns {(image, name): result}."""
    combined = {name: model._ensembles[name] for _, name in requests if name in model._ensembles}
    runs = list(dict.fromkeys((i, t) for i, name in requests for t in model._members(name)))  # (image, task)
    rows = [(i, model._runnable(name).slot) for i, name in runs]
    needed = {(i, m) for i, name in requests if name in combined for m in combined[name].members}
    wanted = set(requests)
    size = (images.shape[-2], images.shape[-1])
    was_training = model.training
    model.eval()
    try:
        features = run_backbone(model.backbone, images, RowPlan(model.backbone, rows, model._plans))
        results: dict[tuple[int, str], Any] = {}
        class_logits: dict[tuple[int, str], torch.Tensor] = {}  # (image, member) -> (C, ...)
        for name in dict.fromkeys(name for _, name in runs):
            index = [k for k, (_, task) in enumerate(runs) if task == name]
            task = model._runnable(name)
            head = task.head
            raw = head(features.select(index))
            direct = [j for j, k in enumerate(index) if runs[k] in wanted]
            if direct:
                tensors = head.tensor_outputs(raw, size)  # {field: (R, ...)}
                if len(direct) < len(index):  # rows run only for an ensemble are not decoded
                    tensors = {field: t[direct] for field, t in tensors.items()}
                outputs = output_kind(task.head_config).decode(tensors)
                for j, out in zip(direct, outputs, strict=True):
                    results[runs[index[j]]] = out
            if any(runs[k] in needed for k in index):
                logits = head.class_logits(raw, size)  # (R, C, ...)
                for j, k in enumerate(index):
                    class_logits[runs[k]] = logits[j]
        for name, ens in combined.items():
            rows_of = [i for i, n in requests if n == name]
            logits = [torch.stack([class_logits[(i, m)] for i in rows_of]) for m in ens.members]  # (R, C, ...)
            for i, out in zip(rows_of, ensembles.decode(ens, logits), strict=True):
                results[(i, name)] = out
        return results
    finally:
        model.train(was_training)

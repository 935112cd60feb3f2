"""`evaluate(model, task, dataset)`: run a task over a dataset with `model.predict` and return its metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from multitask_peft.config import check_positive_int

from .metrics import metric_for

if TYPE_CHECKING:
    from multitask_peft.model import MultiTaskModel

Collate = Callable[[list[Any]], tuple[torch.Tensor, Any]]


def collate_pairs(batch: list[Any]) -> tuple[torch.Tensor, Any]:
    """Default batching of (image, target) pairs: images stacked to (N, 3, H, W); targets by type.

    Integer targets (classification) become an int64 (N,) tensor; tensors / arrays of one shape (segmentation
    masks) are stacked; anything else (detection dicts, masks of different sizes) stays a list.
    """
    for i, item in enumerate(batch):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(
                f"evaluate: dataset items must be (image, target) pairs but item {i} of a batch is a "
                f"{type(item).__name__}; give the dataset a `collate(items) -> (images, targets)` attribute "
                "to batch another layout"
            )
    images = torch.stack([torch.as_tensor(image) for image, _ in batch])  # (N, 3, H, W)
    return images, _collate_targets([target for _, target in batch])


def _collate_targets(targets: list[Any]) -> Any:
    if all(_is_int(t) for t in targets):
        return torch.tensor([int(t) for t in targets], dtype=torch.int64)  # (N,)
    if all(isinstance(t, (torch.Tensor, np.ndarray)) for t in targets):
        tensors = [torch.as_tensor(t) for t in targets]
        if all(t.shape == tensors[0].shape for t in tensors):
            return torch.stack(tensors)  # (N, *target_shape)
        return tensors
    return list(targets)


def _is_int(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.dtype.is_floating_point and value.dtype != torch.bool
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and np.issubdtype(value.dtype, np.integer)
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def evaluate(
    model: MultiTaskModel,
    task: str,
    dataset: Sequence[Any] | torch.utils.data.Dataset,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    on_batch: Callable[[list[dict[str, Any]], Any], None] | None = None,
) -> dict[str, float]:
    """Evaluate one task of a model on a dataset of (image, target) pairs.

    The metric is the one of the task's output kind (see `tasks.metrics`): classification gives "top1", "top5";
    detection "map", "map50", "map75", "map_small", "map_medium", "map_large", "mar_100"; segmentation "miou",
    "pixel_acc". Every result also has "num_images". The model's train / eval mode is left as it was
    (`model.predict` runs in eval mode and restores it).

    Args:
        model: The multi-task model.
        task: Name of the task (or ensemble) to evaluate.
        dataset: Anything a `DataLoader` takes (a list works) whose items are (image, target) pairs, images
            already normalised (3, H, W) float tensors and targets in the task's convention. A `collate`
            attribute on the dataset, if present, batches items instead of the default `collate_pairs`.
        batch_size: Images per `model.predict` call.
        num_workers: DataLoader worker processes.
        progress: Show a tqdm progress bar.
        on_batch: Called with each batch's results and targets after the metric saw them, so that a caller can
            collect more than the metric (a confusion matrix for a report) without a second pass over the data.

    Returns:
        {metric name: value} as plain Python numbers.
    """
    hooks = {task: on_batch} if on_batch is not None else None
    return evaluate_tasks(model, [task], dataset, batch_size, num_workers, progress, hooks)[task]


def evaluate_tasks(
    model: MultiTaskModel,
    tasks: Sequence[str],
    dataset: Sequence[Any] | torch.utils.data.Dataset,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    on_batch: dict[str, Callable[[list[dict[str, Any]], Any], None]] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate several tasks that share a label space and a dataset in one pass over it: each batch is ONE
    `model.predict(images, tasks)` call, so the backbone prefix the tasks have in common runs once per image (a
    sweep's configurations, an ensemble and its members, one task at several WiSE alphas).

    Args:
        tasks: Task or ensemble names (at least one); the other arguments as in `evaluate` (`on_batch` per task).

    Returns:
        {task: {metric name: value}}.
    """
    check_positive_int("evaluate", "batch_size", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"evaluate: `num_workers` should be an int >= 0 but the value passed is {num_workers!r}")
    names = [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))
    if not names:
        raise ValueError(f"evaluate: name at least one task; tasks: {model.tasks}")
    metrics = {t: metric_for(model.head_config(t)) for t in names}  # unknown task or head type: ValueError
    collate: Collate = getattr(dataset, "collate", None) or collate_pairs
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    device = next(model.parameters()).device
    num_images = 0
    label = names[0] if len(names) == 1 else f"{len(names)} tasks"
    for images, targets in tqdm(loader, desc=f"evaluate {label}", unit="batch", disable=not progress):
        results = model.predict(images.to(device), names)
        for t in names:
            metrics[t].update(results[t], targets)
            if on_batch is not None and t in on_batch:
                on_batch[t](results[t], targets)
        num_images += images.shape[0]
    if num_images == 0:
        raise ValueError(f"evaluate: the dataset for task(s) {names} is empty")
    return {t: {**metrics[t].compute(), "num_images": num_images} for t in names}

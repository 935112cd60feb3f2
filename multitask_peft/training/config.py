"""Training configuration: `TrainConfig` (the run) and `TaskData` (one task's data and weight)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..config import ConfigBase, check_choice, check_positive_float, check_positive_int

SAMPLING = ("round_robin", "proportional", "temperature")
LOSS_WEIGHTING = ("fixed", "uncertainty")
CLIP_SCOPES = ("global", "task")
ON_NONFINITE = ("stop", "drop_task")
AMP = ("none", "bf16")


def _check_non_negative(owner: str, field: str, value: object, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        kind = "integer" if integer else "number"
        raise ValueError(f"{owner}: `{field}` should be a non-negative {kind} but the value passed is {value!r}")


@dataclasses.dataclass
class TrainConfig(ConfigBase):
    """Joint multi-task training run.

    Args:
        steps: Total optimizer steps.
        tasks_per_step: How many tasks each step draws (None = all tasks). Tasks sharing a batch stream
            (`TaskData.stream`: a sweep's configurations) are drawn together and count once.
        sampling: How tasks are drawn when `tasks_per_step` < number of streams: "round_robin", "proportional"
            (to dataset size) or "temperature" (p ~ size ** (1 / temperature)).
        temperature: Temperature of "temperature" sampling (1 = proportional, large = uniform).
        loss_weighting: "fixed" (each task's `TaskData.loss_weight`) or "uncertainty" (Kendall et al. 2018:
            learned log-variances per task, trained with the model).
        lr: Peak learning rate of the PEFT parameters (and loss-weight parameters).
        head_lr: Peak learning rate of the heads (None = `lr`).
        weight_decay: AdamW weight decay (never applied to norms, biases, prompts, VQT queries, SSF / BitFit
            parameters).
        warmup_steps: Linear warm-up steps before the cosine decay.
        min_lr_ratio: Final learning rate as a fraction of the peak.
        grad_accum: Micro-batches per optimizer step (each micro-batch draws a batch of every chosen task).
        clip_norm: Clip the gradient norm to this value (None = off).
        clip_scope: "global" (one norm over every trained parameter) or "task" (each task's parameters clipped on
            their own, so that no task's gradients change another's update: what a sweep uses; learned loss weights are
            not clipped then).
        on_nonfinite: What a NaN / inf loss (or gradient norm) of a task does: "stop" the run before the optimizer
            step (the last checkpoint stays the latest), or "drop_task": that task stops training there, keeping its
            last finite weights (that step's update is skipped for it), and the others go on (`Trainer.diverged`
            lists {task: step}); what a sweep uses, so that one diverging configuration does not end the others.
        amp: "none" or "bf16" (bf16 autocast; allowed on CPU but off by default).
        grad_checkpointing: Recompute backbone activations in the backward pass (needs model support).
        seed: Seed of data order, task sampling and the global RNGs.
        log_every: Write a log record every this many steps.
        checkpoint_every: Write a checkpoint every this many steps (and always after the last step).
        keep_checkpoints: How many of the newest checkpoints to keep.
        batch_size: Default per-task batch size (per micro-batch).
        num_workers: DataLoader worker processes per task (0 = load in the main process).
        tensorboard: Also write TensorBoard scalars (needs the `tensorboard` package).
        progress: Show a tqdm progress bar.
    """

    steps: int = 1000
    tasks_per_step: int | None = None
    sampling: str = "round_robin"
    temperature: float = 2.0
    loss_weighting: str = "fixed"
    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    clip_norm: float | None = None
    clip_scope: str = "global"
    on_nonfinite: str = "stop"
    amp: str = "none"
    grad_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    batch_size: int = 32
    num_workers: int = 0
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        for field in ("steps", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints", "batch_size"):
            check_positive_int(owner, field, getattr(self, field))
        if self.tasks_per_step is not None:
            check_positive_int(owner, "tasks_per_step", self.tasks_per_step)
        check_choice(owner, "sampling", self.sampling, SAMPLING)
        check_positive_float(owner, "temperature", self.temperature)
        check_choice(owner, "loss_weighting", self.loss_weighting, LOSS_WEIGHTING)
        check_positive_float(owner, "lr", self.lr)
        if self.head_lr is not None:
            check_positive_float(owner, "head_lr", self.head_lr)
        _check_non_negative(owner, "weight_decay", self.weight_decay)
        _check_non_negative(owner, "warmup_steps", self.warmup_steps, integer=True)
        _check_non_negative(owner, "num_workers", self.num_workers, integer=True)
        _check_non_negative(owner, "seed", self.seed, integer=True)
        if self.warmup_steps > self.steps:
            raise ValueError(f"{owner}: `warmup_steps` ({self.warmup_steps}) must not exceed `steps` ({self.steps})")
        ratio = self.min_lr_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{owner}: `min_lr_ratio` should be in [0, 1] but the value passed is {ratio!r}")
        if self.clip_norm is not None:
            check_positive_float(owner, "clip_norm", self.clip_norm)
        check_choice(owner, "clip_scope", self.clip_scope, CLIP_SCOPES)
        check_choice(owner, "on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        check_choice(owner, "amp", self.amp, AMP)
        for field in ("grad_checkpointing", "tensorboard", "progress"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(
                    f"{owner}: `{field}` should be True or False but the value passed is {getattr(self, field)!r}"
                )


@dataclasses.dataclass
class TaskData:
    """One task's training data.

    Args:
        dataset: A map-style dataset of (image, target) pairs following the shared conventions (images
            float32 (3, H, W), already normalised). Its `collate` attribute batches items if it has one, else
            `multitask_peft.tasks.collate_pairs`.
        loss_weight: Fixed weight of the task's loss (also scales the task's term under uncertainty weighting).
        batch_size: Per-task batch size (None = `TrainConfig.batch_size`).
        collate: Explicit collate function (overrides the dataset's).
        lr: Peak learning rate of the task's PEFT parameters (None = `TrainConfig.lr`).
        head_lr: Peak learning rate of the task's head (None = `lr` if given, else `TrainConfig.head_lr` / `lr`).
        weight_decay: The task's AdamW weight decay (None = `TrainConfig.weight_decay`).
        stream: Name of the batch stream the task draws from. Tasks naming one stream train on the SAME batches
            (one load, one forward with the shared backbone prefix; a sweep's configurations) and must share one
            dataset object and batch size. None = a stream of its own, named after the task. The stream's name
            seeds its data order, so a task trained alone on stream "s" sees the batches it sees in a sweep.
    """

    dataset: Any
    loss_weight: float = 1.0
    batch_size: int | None = None
    collate: Callable[[list], Any] | None = None
    lr: float | None = None
    head_lr: float | None = None
    weight_decay: float | None = None
    stream: str | None = None

    def __post_init__(self) -> None:
        if not hasattr(self.dataset, "__getitem__") or not hasattr(self.dataset, "__len__"):
            raise TypeError(
                f"TaskData: `dataset` must be a map-style dataset (__len__ and __getitem__), got "
                f"{type(self.dataset).__name__}"
            )
        if len(self.dataset) == 0:
            raise ValueError("TaskData: `dataset` is empty; give it at least one (image, target) pair")
        check_positive_float("TaskData", "loss_weight", self.loss_weight)
        if self.batch_size is not None:
            check_positive_int("TaskData", "batch_size", self.batch_size)
        for field in ("lr", "head_lr"):
            if getattr(self, field) is not None:
                check_positive_float("TaskData", field, getattr(self, field))
        if self.weight_decay is not None:
            _check_non_negative("TaskData", "weight_decay", self.weight_decay)
        if self.stream is not None and (not isinstance(self.stream, str) or not self.stream):
            raise ValueError(f"TaskData: `stream` should be a non-empty name but the value passed is {self.stream!r}")
        if self.collate is not None and not callable(self.collate):
            raise TypeError(f"TaskData: `collate` must be callable, got {self.collate!r}")

    def collate_fn(self) -> Callable[[list], Any]:
        """The function that batches this task's items."""
        if self.collate is not None:
            return self.collate
        collate = getattr(self.dataset, "collate", None)
        if callable(collate):
            return collate
        from ..tasks import collate_pairs

        return collate_pairs

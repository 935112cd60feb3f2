"""Joint multi-task training: several tasks per step, one routed forward per image shape, PEFT + heads only."""

from __future__ import annotations

import logging
import math
import os
import random
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..model import MultiTaskModel
from .checkpoint import latest_checkpoint, load_task_weights, load_trainer_state, save_checkpoint
from .config import TaskData, TrainConfig
from .distributed import average_gradients, setup
from .logs import RunLogger
from .sampling import TaskStream, sample_tasks
from .schedule import WarmupCosine, param_groups
from .weighting import LossWeighting

_log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A task's loss became NaN or inf; the run stopped before the optimizer step (last checkpoint kept)."""


class Trainer:
    """Trains a set of tasks of a `MultiTaskModel` jointly; the backbone never changes.

    Each optimizer step picks tasks (`TrainConfig.sampling`), draws the next batch of each from its resumable
    stream (tasks sharing a stream, `TaskData.stream`, get the same batch), runs the images of tasks whose image
    shapes match as ONE routed forward (`model.forward_rows`: an image asked by several tasks runs the backbone
    prefix they share once), weights the per-task head losses, and back-propagates; `grad_accum` such
    micro-batches make a step. Only the tasks' `model.trainable_parameters(name)` (and uncertainty weights)
    are optimised, with AdamW (no decay on norms / biases / prompts / SSF / BitFit) and warm-up + cosine; each task
    has parameter groups of its own (its `TaskData.lr` / `head_lr` / `weight_decay`, else the run's).

    Tasks do not influence each other's updates (each one's loss reaches only its own parameters; with
    `clip_scope="task"` clipping is per task too), so a task trained among others on a shared stream ends with the
    weights it gets trained alone on that stream with the same seed (a sweep relies on it).

    Data-parallel (`torchrun --nproc_per_node=W`, or any initialised default process group): each rank draws its
    1/W share of every task's global batch (the per-task batch size is per rank; global = W x that), and the
    gradients and reported losses are averaged across ranks once per step (`training.distributed`). Only rank 0
    writes checkpoints, logs, TensorBoard files and the progress bar; every rank resumes from the same checkpoint.

    Args:
        model: The model; every task in `tasks` must already be added.
        tasks: {task name: TaskData}.
        config: The run configuration.
        out_dir: Where checkpoints (`checkpoints/`), `log.jsonl` and TensorBoard files (`tb/`) go.
    """

    def __init__(
        self, model: MultiTaskModel, tasks: Mapping[str, TaskData], config: TrainConfig, out_dir: str | os.PathLike
    ) -> None:
        if not isinstance(model, MultiTaskModel):
            raise TypeError(f"model must be a MultiTaskModel, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not tasks:
            raise ValueError(f"tasks must name at least one task of the model; tasks: {model.tasks}")
        for name, data in tasks.items():
            model.task(name)  # raises for an unknown task, listing the model's tasks
            if not isinstance(data, TaskData):
                raise TypeError(f"tasks[{name!r}] must be a TaskData(dataset, ...), got {type(data).__name__}")
        self.stream_tasks = _stream_groups(tasks)
        k = config.tasks_per_step or len(self.stream_tasks)
        if k > len(self.stream_tasks):
            raise ValueError(
                f"TrainConfig: `tasks_per_step` is {k} but only {len(self.stream_tasks)} tasks (batch streams) "
                "are trained"
            )
        trainable_backbone = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
        if trainable_backbone:
            raise ValueError(
                f"the backbone must be frozen, but these parameters require grad: {trainable_backbone[:5]}"
            )
        if config.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise NotImplementedError(
                    "grad_checkpointing=True needs MultiTaskModel.set_grad_checkpointing (not in this version)"
                )
            model.set_grad_checkpointing(True)
        self.model, self.config, self.out_dir = model, config, Path(out_dir)
        self.tasks = dict(tasks)
        self.names = list(tasks)
        self.tasks_per_step = k
        self.device = next(model.backbone.parameters()).device
        if config.amp == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"TrainConfig: amp='bf16' but {torch.cuda.get_device_name(self.device)} has no bf16")
        self.dist = setup(self.device)
        self.weighting = LossWeighting(self.names, {n: d.loss_weight for n, d in tasks.items()}, config.loss_weighting)
        self.weighting.to(self.device)
        self._task_params = {n: list(model.trainable_parameters(n)) for n in self.names}
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(config.steps, config.warmup_steps, config.min_lr_ratio)
        )
        self.step = 0
        self.diverged: dict[str, int] = {}  # task -> the step whose loss / gradients were not finite (drop_task)
        self._step_lrs: dict[str, float] = {}
        self.streams = {n: self._stream(n) for n in self.stream_tasks}

    # --- set-up --------------------------------------------------------------------------------------------
    def _param_groups(self) -> list[dict]:
        """Each task's own {peft, head} x {decay, no_decay} groups, named "<task>/peft_decay", ..."""
        cfg = self.config
        groups = []
        for task in self.names:
            data = self.tasks[task]
            module = self.model.task(task)
            names = {id(p): n for n, p in module.named_parameters()}
            named = []
            for p in self.model.trainable_parameters(task):
                name = names[id(p)]
                named.append((name, p, name.startswith("head.")))
            lr = data.lr or cfg.lr
            head_lr = data.head_lr or (data.lr if data.lr is not None else cfg.head_lr or cfg.lr)
            decay = cfg.weight_decay if data.weight_decay is None else data.weight_decay
            groups += param_groups(named, lr, head_lr, decay, prefix=task)
        if self.weighting.mode == "uncertainty":
            groups.append(
                {"name": "loss_weights", "params": list(self.weighting.parameters()), "lr": cfg.lr, "weight_decay": 0}
            )
        return groups

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimizer updates."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _stream(self, name: str, epoch: int = 0, position: int = 0) -> TaskStream:
        data, cfg, world = self.tasks[self.stream_tasks[name][0]], self.config, self.dist.world_size
        bs = (data.batch_size or cfg.batch_size) * world  # global batch: the per-rank batch on each of `world` ranks
        return TaskStream(
            name, data.dataset, bs, data.collate_fn(), cfg.seed, cfg.num_workers, epoch, position, self.dist.rank, world
        )

    # --- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Trainer state (tensors and primitives only; task weights are saved separately as task files)."""
        np_state = np.random.get_state()
        return {
            "step": self.step,
            "tasks": list(self.names),
            "config": self.config.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "weighting": self.weighting.state_dict(),
            "streams": {n: s.state() for n, s in self.streams.items()},
            "diverged": dict(self.diverged),
            "world_size": self.dist.world_size,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                "python": random.getstate(),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["tasks"]) != self.names:
            raise ValueError(f"checkpoint trains tasks {state['tasks']} but this trainer trains {self.names}")
        self.step = int(state["step"])
        self.diverged = {str(t): int(v) for t, v in state.get("diverged", {}).items()}
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule follows this run's config (e.g. more `steps` extend the cosine); same config: same lrs.
        schedule = WarmupCosine(self.config.steps, self.config.warmup_steps, self.config.min_lr_ratio)
        self.scheduler.lr_lambdas = [schedule] * len(self.optimizer.param_groups)
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * schedule(self.scheduler.last_epoch)
        self.weighting.load_state_dict(state["weighting"])
        streams = state["streams"]
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:  # positions count global batches of another size
            warnings.warn(
                f"checkpoint was written by {saved_world} process(es), this run has {self.dist.world_size}: each "
                "task's data stream restarts at its next epoch (data order differs from an uninterrupted run)",
                stacklevel=2,
            )
            streams = {n: {"epoch": streams[n]["epoch"] + 1, "position": 0} for n in self.stream_tasks}
        self.streams = {n: self._stream(n, **streams[n]) for n in self.stream_tasks}
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (atomically; rank 0 only) and return its directory.

        Every rank calls it; all wait until rank 0 has written the checkpoint (None is returned on other ranks).
        """
        path = None
        if self.dist.is_main:
            path = save_checkpoint(
                self.out_dir, self.step, self.model, self.names, self.state_dict(), self.config.keep_checkpoints
            )
        self.dist.barrier()
        return path

    def resume(self) -> Path | None:
        """Load the latest complete checkpoint of `out_dir` (None if there is none: start from scratch)."""
        path = latest_checkpoint(self.out_dir)
        if path is None:
            return None
        state = load_trainer_state(path)
        for task in self.names:
            load_task_weights(self.model, path, task)
        self.load_state_dict(state)
        return path

    # --- training ------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train up to `config.steps` optimizer steps.

        Args:
            resume: Continue from the latest checkpoint in `out_dir` (bit-for-bit on CPU with a fixed seed).

        Returns:
            {"step", "losses" (last step, per task), "loss_weights", "checkpoint", "seconds", "diverged" ({task:
            step}, with `on_nonfinite="drop_task"`)}.

        Raises:
            NonFiniteLossError: A loss was NaN / inf (with `on_nonfinite="drop_task"`: every task's); nothing is
                written for that step, the last checkpoint stays `latest`.
        """
        cfg = self.config
        resumed = self.resume() if resume else None
        if resumed is None:
            self._seed_everything()
        main = self.dist.is_main
        logger = RunLogger(self.out_dir, cfg.tensorboard, resume_step=self.step if resume else None) if main else None
        was_training = self.model.training
        self.model.train()
        self.weighting.train()
        start = time.perf_counter()
        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not (cfg.progress and main), desc="train", dynamic_ncols=True
        )
        last_saved, losses = (self.step if resumed else None), {}
        try:
            while self.step < cfg.steps:
                losses = self._train_step()
                if logger is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    logger.log(self._record(losses, time.perf_counter() - start))
                bar.update(1)
                bar.set_postfix({t: f"{v:.3f}" for t, v in losses.items()}, refresh=False)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()
                    last_saved = self.step
        finally:
            bar.close()
            if logger is not None:
                logger.close()
            self.model.train(was_training)
        final = latest_checkpoint(self.out_dir)
        return {
            "step": self.step,
            "losses": losses,
            "loss_weights": self.weighting.effective_weights(),
            "checkpoint": str(final) if final is not None and last_saved is not None else None,
            "seconds": time.perf_counter() - start,
            "diverged": dict(self.diverged),
        }

    def _seed_everything(self) -> None:
        seed = self.config.seed
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _train_step(self) -> dict[str, float]:
        """One optimizer step (grad_accum micro-batches); returns the mean loss of each task."""
        cfg = self.config
        streams = list(self.stream_tasks)
        sizes = [len(self.tasks[self.stream_tasks[s][0]].dataset) for s in streams]
        drawn = sample_tasks(streams, sizes, self.step, self.tasks_per_step, cfg.sampling, cfg.temperature, cfg.seed)
        drawn = [s for s in drawn if self._active(s)]  # (a stream whose tasks all diverged is not drawn any more)
        chosen = [t for s in drawn for t in self._active(s)]
        self.optimizer.zero_grad(set_to_none=True)
        totals = dict.fromkeys(chosen, 0.0)
        bad: dict[str, str] = {}  # tasks whose loss / gradients were not finite this step -> what was
        for _ in range(cfg.grad_accum):
            losses = self._losses({s: next(self.streams[s]) for s in drawn})
            for task, loss in losses.items():
                value = loss.item()
                if not self.dist.enabled and not math.isfinite(value):  # distributed: checked after averaging
                    self._nonfinite(task, f"loss is {value}", bad)
                totals[task] += value / cfg.grad_accum
            kept = {t: loss for t, loss in losses.items() if t not in bad}
            if kept:
                (self.weighting(kept) / cfg.grad_accum).backward()
        if self.dist.enabled:
            scalars = torch.tensor([totals[t] for t in chosen], dtype=torch.float32, device=self.device)
            averaged = average_gradients(self.parameters(), scalars, self.dist.world_size).tolist()
            totals = dict(zip(chosen, averaged))
            for task, value in totals.items():
                if not math.isfinite(value):
                    self._nonfinite(task, f"loss is {value}", bad)
        if cfg.clip_norm is not None and cfg.clip_scope == "task":
            for task in chosen:
                if task not in bad:
                    norm = torch.nn.utils.clip_grad_norm_(self._task_params[task], cfg.clip_norm)
                    if not torch.isfinite(norm):
                        self._nonfinite(task, f"gradient norm is {norm.item()}", bad)
        elif cfg.on_nonfinite == "drop_task":  # (one global norm cannot say whose gradients were not finite)
            checked = [t for t in chosen if t not in bad and any(p.grad is not None for p in self._task_params[t])]
            grads = [[p.grad for p in self._task_params[t] if p.grad is not None] for t in checked]
            norms = [torch.nn.utils.get_total_norm(g) for g in grads]
            finite = torch.isfinite(torch.stack(norms)).tolist() if norms else []  # (one sync for every task)
            for task, ok in zip(checked, finite, strict=True):
                if not ok:
                    self._nonfinite(task, "gradients are not finite", bad)
        self._drop(bad)
        if cfg.clip_norm is not None and cfg.clip_scope == "global":
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), cfg.clip_norm)
            if not torch.isfinite(norm):
                self._nonfinite(None, f"gradient norm is {norm.item()}", bad)
        self._step_lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {t: v for t, v in totals.items() if t not in bad}

    def _active(self, stream: str) -> list[str]:
        """The tasks of a batch stream still training (not dropped as diverged)."""
        return [t for t in self.stream_tasks[stream] if t not in self.diverged]

    def _nonfinite(self, task: str | None, what: str, bad: dict[str, str]) -> None:
        """A task's loss or gradients were not finite: stop the run, or (drop_task) mark the task for `_drop`."""
        where = f"task {task!r}: " if task is not None else ""
        message = f"{where}{what} at step {self.step + 1}"
        if self.config.on_nonfinite == "stop" or task is None:
            raise NonFiniteLossError(
                f"{message}; training stopped before the optimizer step, the last good checkpoint is "
                f"{latest_checkpoint(self.out_dir)}"
            )
        bad[task] = what

    def _drop(self, bad: Mapping[str, str]) -> None:
        """Take diverged tasks out of training: their gradients of this step are discarded (so their weights stay
        those of the last finite step), and later steps leave them out. Raises once no task is left."""
        for task, what in bad.items():
            for p in self._task_params[task]:
                p.grad = None
            if self.weighting.mode == "uncertainty":
                self.weighting.log_vars[task].grad = None
            self.diverged[task] = self.step + 1
            _log.warning("task %r diverged (%s at step %d): it stops training here", task, what, self.step + 1)
        if bad and len(self.diverged) == len(self.names):
            raise NonFiniteLossError(
                f"every task diverged (the last: {', '.join(bad)} at step {self.step + 1}); training stopped, the "
                f"last good checkpoint is {latest_checkpoint(self.out_dir)}"
            )

    def _losses(self, batches: Mapping[str, tuple[torch.Tensor, Any]]) -> dict[str, torch.Tensor]:
        """Each task's head loss, from {stream: batch}; streams whose images have one shape share one routed
        forward, in which every task of a stream still training runs on that stream's images (rows (image, task
        slot))."""
        groups: dict[tuple, list[str]] = {}
        for stream, (images, _) in batches.items():
            groups.setdefault((tuple(images.shape[1:]), images.dtype), []).append(stream)
        losses: dict[str, torch.Tensor] = {}
        use_amp = self.config.amp == "bf16"
        for streams in groups.values():
            images = torch.cat([batches[s][0] for s in streams]).to(self.device)  # (sum N_s, 3, H, W)
            rows: dict[str, list[tuple[int, int]]] = {}
            offset = 0
            for s in streams:
                n = batches[s][0].shape[0]
                for t in self._active(s):
                    rows[t] = [(offset + i, self.model.slot(t)) for i in range(n)]
                offset += n
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = self.model.forward_rows(images, [r for t in rows for r in rows[t]])
                for s in streams:
                    for t in self._active(s):
                        target = _to_device(batches[s][1], self.device)
                        losses[t] = self.model.task(t).head.loss(out[t][1], target)
        return {t: losses[t] for s in batches for t in self._active(s)}

    def _record(self, losses: Mapping[str, float], seconds: float) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": self.step,
            "loss": dict(losses),
            "lr": dict(self._step_lrs),
            "time": round(seconds, 3),
        }
        if self.weighting.mode == "uncertainty":
            record["loss_weight"] = self.weighting.effective_weights()
        if self.diverged:
            record["diverged"] = dict(self.diverged)
        return record


def _stream_groups(tasks: Mapping[str, TaskData]) -> dict[str, list[str]]:
    """{stream name: its tasks}, in task order; the tasks of one stream must share a dataset and a batch size."""
    groups: dict[str, list[str]] = {}
    for name, data in tasks.items():
        groups.setdefault(data.stream or name, []).append(name)
    for stream, names in groups.items():
        first = tasks[names[0]]
        for other in names[1:]:
            data = tasks[other]
            if data.dataset is not first.dataset or data.batch_size != first.batch_size:
                raise ValueError(
                    f"tasks {names[0]!r} and {other!r} share batch stream {stream!r} and so must share one dataset "
                    f"object and batch size (got batch sizes {first.batch_size} and {data.batch_size})"
                )
            if data.collate is not first.collate:
                raise ValueError(f"tasks {names[0]!r} and {other!r} share batch stream {stream!r} but not `collate`")
    return groups


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value

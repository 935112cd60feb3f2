"""Shared-prefix speed on a family split part by part: several tasks adapted only in the last blocks, every image
asking for all of them, in one call (rows share the frozen prefix) vs one call per task.

Each task is LoRA on the attention input projections of the last `--last` blocks only, so a task changes nothing
before block `depth - last`. One call runs the first `depth - last` blocks once per image and the rest once per
(image, task); one call per task runs every block once per (image, task). With T tasks the block-count floor of
the speed-up is `T * depth / ((depth - last) + T * last)` (2.0x for 3 tasks adapted in the last quarter); the
stem, pooling and heads are not counted. Outputs are checked equal first. Variants are timed interleaved in one
process (each repeat times both, in a rotating order); medians.

    python benchmarks/prefix_sharing.py                        # EVA-02 small (patch 14, 224), batch 8, 3 tasks
    python benchmarks/prefix_sharing.py --model vit_small_patch14_dinov2 --img-size 224
    python benchmarks/prefix_sharing.py --quick                # smoke test: tiny EVA-02
    python benchmarks/prefix_sharing.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import multitask_peft as mtp
from multitask_peft.executor import RowPlan, run_backbone


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="eva02_small_patch14_224", help="timm model (random weights)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--last", type=int, help="blocks adapted, counted from the end (default: a quarter)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--quick", action="store_true", help="tiny EVA-02 (4 blocks, width 64, 56 px), 2 repeats")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[mtp.MultiTaskModel, list[str], int]:
    kwargs: dict[str, Any] = {"img_size": args.img_size}
    if args.quick:
        kwargs.update(embed_dim=64, depth=4, num_heads=2, ref_feat_shape=(4, 4))
    torch.manual_seed(0)
    model = mtp.MultiTaskModel.from_timm(args.model, **kwargs).eval()
    depth = len(model.backbone.model.blocks)
    last = args.last or max(1, depth // 4)
    adapted = tuple(sorted(n for n in model.backbone.attention_inputs() if int(n.split(".")[1]) >= depth - last))
    names = [f"t{k}" for k in range(args.tasks)]
    gen = torch.Generator().manual_seed(1)
    for name in names:
        model.add_task(name, mtp.tasks.Classification(num_classes=10), [mtp.peft.LoRA(r=8, targets=adapted)])
        with torch.no_grad():
            for param in model.trainable_parameters(name):
                param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return model, names, last


def time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.quick:
        args.model, args.img_size, args.batch, args.repeats = "eva02_tiny_patch14_224", 56, 4, 2
    torch.set_num_threads(args.threads)
    model, names, last = build(args)
    host = model.backbone
    depth = len(host.model.blocks)
    split = host.layout.split
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(2))
    slots = [model.slot(n) for n in names]
    rows = [(i, s) for s in slots for i in range(args.batch)]  # task-major: the same order as the separate calls

    def one_call() -> torch.Tensor:
        return run_backbone(host, images, RowPlan(host, rows, model._plans)).pooled

    def per_task() -> torch.Tensor:
        return torch.cat([model.forward_features(images, [s] * args.batch).pooled for s in slots])

    with torch.inference_mode():
        shared, separate = one_call(), per_task()
        diff = (shared - separate).abs().max().item()
        effect = (separate[: args.batch] - separate[args.batch : 2 * args.batch]).abs().max().item()
    print(f"parity: max |one call - one call per task| {diff:.2e}; tasks differ by up to {effect:.2e}")
    if diff > 1e-4 or (len(slots) > 1 and effect < 1e-4):
        raise SystemExit("parity check failed")

    variants = {f"one call, shared prefix ({len(names)} tasks)": one_call, "one call per task": per_task}
    keys = list(variants)
    times: dict[str, list[float]] = {k: [] for k in keys}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for k in keys:
                variants[k]()
        for rep in range(args.repeats):
            for k in keys[rep % 2 :] + keys[: rep % 2]:
                times[k].append(time_call(variants[k]))
            print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {times[k][-1]:.3f}s" for k in keys))
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = med[keys[1]] / med[keys[0]]
    t = len(names)
    floor = t * depth / ((depth - last) + t * last)
    load = os.getloadavg()[0]
    print(
        f"\n{args.model} ({type(host.model).__name__}, {split} split, {depth} blocks) at {args.img_size} px, "
        f"batch {args.batch}, {t} tasks adapted in the last {last} blocks, {torch.get_num_threads()} threads, "
        f"{args.repeats} repeats; 1-min load {load:.2f}"
    )
    print("\n| variant | median s | img x task / s |\n|---|---:|---:|")
    for k in keys:
        print(f"| {k} | {med[k]:.4f} | {args.batch * t / med[k]:.1f} |")
    print(f"\nspeed-up {speedup:.2f}x; block-count floor {floor:.2f}x ({100 * speedup / floor:.0f}% of it)")
    result = {
        "config": {**{k: getattr(args, k) for k in ("model", "img_size", "batch", "repeats", "threads")}},
        "family": type(host.model).__name__,
        "split": split,
        "depth": depth,
        "tasks": t,
        "adapted_last_blocks": last,
        "median_s": med,
        "times_s": times,
        "speedup": speedup,
        "block_floor": floor,
        "parity_max_abs_diff": diff,
        "load_average_end": load,
        "torch": torch.__version__,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

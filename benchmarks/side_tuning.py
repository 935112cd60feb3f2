"""Side tuning's point, measured: training memory and step time of LST and VQT against LoRA on the same task.

Each (backbone, method) trains in a fresh process (so peak memory is its own): a 10-class classification task,
AdamW, `--steps` timed steps after two warm-up steps on random images. Reported per row: trainable parameters,
the activations autograd keeps for the backward pass of one step (exact: `training.saved_activations`), the
process's peak memory over what the model and data took before training (CPU: peak RSS; CUDA:
`max_memory_allocated`), and the median step time. The linear probe is the floor (no PEFT tensors at all).

    python benchmarks/side_tuning.py            # ViT-S/16 and EfficientNet-Lite0 at 224 px, batch 32
    python benchmarks/side_tuning.py --quick    # smoke test: tiny models at 64 px
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

import multitask_peft as mtp
from multitask_peft.training import saved_activations

BACKBONES = {  # name -> (timm name, kwargs, image size)
    "ViT-S/16": ("vit_small_patch16_224", {}, 224),
    "EfficientNet-Lite0": ("tf_efficientnet_lite0", {}, 224),
}
QUICK = {"test_vit": ("test_vit", {"img_size": 64}, 64), "test_efficientnet": ("test_efficientnet", {}, 64)}
METHODS = {
    "linear probe": lambda: [mtp.peft.LinearProbe()],
    "LoRA r=8": lambda: [mtp.peft.LoRA(r=8)],
    "LST (reduction 8)": lambda: [mtp.peft.LST()],
    "VQT (1 query per block)": lambda: [mtp.peft.VQT()],
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny models at 64 px, batch 8, 2 steps")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", nargs=2, metavar=("BACKBONE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps = 8, 2
    if args.batch < 1 or args.steps < 1 or args.threads < 1:
        raise SystemExit("--batch, --steps and --threads must be >= 1")
    return args


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One (backbone, method) training run in this process."""
    torch.set_num_threads(args.threads)
    backbone, method = args.worker
    name, kwargs, size = (QUICK if args.quick else BACKBONES)[backbone]
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = mtp.MultiTaskModel.from_timm(name, **kwargs).to(device)
    try:
        model.add_task("t", mtp.tasks.Classification(num_classes=10), METHODS[method]())
    except ValueError as e:  # (VQT on a CNN)
        return {"backbone": backbone, "method": method, "skipped": str(e)}
    model.train()
    params = list(model.trainable_parameters("t"))
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    slots = [model.slot("t")] * args.batch
    kept = {"bytes": 0}

    def step(record: bool = False) -> None:
        optimizer.zero_grad(set_to_none=True)
        if record:
            with saved_activations(model) as counted:
                _, logits = model(images, slots)["t"]
            kept.update(counted)
        else:
            _, logits = model(images, slots)["t"]
        model.task("t").head.loss(logits, labels).backward()
        optimizer.step()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    step(record=True)
    step()
    times = []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "backbone": backbone,
        "method": method,
        "trainable": sum(p.numel() for p in params),
        "saved_activation_bytes": kept["bytes"],
        "peak_over_model_bytes": max(0, peak - before),
        "step_s": statistics.median(times),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    rows = []
    common = ["--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
    common += ["--device", args.device] + (["--quick"] if args.quick else [])
    for backbone in QUICK if args.quick else BACKBONES:
        for method in METHODS:
            cmd = [sys.executable, __file__, "--worker", backbone, method, *common]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if "skipped" in row:
                print(f"  {backbone} / {method}: skipped ({row['skipped']})", file=sys.stderr)
                continue
            rows.append(row)
            print(f"  {backbone} / {method}: {row['step_s']:.2f} s per step", file=sys.stderr)
    print(f"\nbatch {args.batch}, {args.device}, {args.threads} thread(s), median of {args.steps} steps\n")
    print("| backbone | method | trainable | activations kept | peak memory over the model | step s | vs LoRA |")
    print("|---|---|---:|---:|---:|---:|---|")
    summary = {}
    for row in rows:
        lora = next(r for r in rows if r["backbone"] == row["backbone"] and r["method"].startswith("LoRA"))
        ratio = (
            f"{lora['peak_over_model_bytes'] / max(row['peak_over_model_bytes'], 1):.1f}x less memory, "
            f"{lora['step_s'] / row['step_s']:.1f}x faster"
        )
        print(
            f"| {row['backbone']} | {row['method']} | {row['trainable'] / 1e6:.2f} M | "
            f"{row['saved_activation_bytes'] / 2**20:.0f} MiB | {row['peak_over_model_bytes'] / 2**20:.0f} MiB | "
            f"{row['step_s']:.2f} | {'' if row is lora else ratio} |"
        )
        if row["method"].startswith(("LST", "VQT")):
            summary[f"{row['backbone']} {row['method'].split()[0]}"] = {
                "memory_x": lora["peak_over_model_bytes"] / max(row["peak_over_model_bytes"], 1),
                "activations_x": lora["saved_activation_bytes"] / max(row["saved_activation_bytes"], 1),
                "speed_x": lora["step_s"] / row["step_s"],
            }
    result = {"rows": rows, "lst_vs_lora": summary, "args": {k: v for k, v in vars(args).items() if k != "worker"}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

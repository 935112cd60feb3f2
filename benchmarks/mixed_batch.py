"""Mixed-task batch throughput on the CPU: frozen backbone vs ours vs HF PEFT's `adapter_names` mixed batch.

All variants share the same frozen weights and the same (randomised) LoRA factors, and are timed interleaved in one
process (each repeat times every variant once, in a rotating order) so that drift hits them all equally.

    python benchmarks/mixed_batch.py                # ViT-S/16 @ 224, batch 32, 8 LoRA tasks r=8, 2 threads
    python benchmarks/mixed_batch.py --quick        # smoke test on timm's tiny `test_vit`
    python benchmarks/mixed_batch.py --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import multitask_peft as mtp

TARGETS = ("qkv", "proj", "fc1", "fc2")  # suffix matches in both libraries (incl. the patch_embed.proj conv)
GOAL_VS_BACKBONE, GOAL_VS_HF = 0.95, 1.15


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224", help="timm ViT name")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="smoke test: test_vit, batch 8, 2 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.repeats = "test_vit", 8, 2
    return args


def build_ours(args: argparse.Namespace) -> tuple[mtp.MultiTaskModel, list[str]]:
    """The multi-task model with `args.tasks` LoRA tasks whose parameters all carry N(0, 0.02) noise."""
    torch.manual_seed(0)
    model = mtp.MultiTaskModel.from_timm(args.model, pretrained=False).eval()
    names = [f"t{k}" for k in range(args.tasks)]
    gen = torch.Generator().manual_seed(1)
    for name in names:
        lora = mtp.peft.LoRA(r=args.rank, targets=TARGETS)
        model.add_task(name, head=mtp.tasks.Classification(num_classes=10), peft=[lora])
        with torch.no_grad():
            for param in model.trainable_parameters(name):
                param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval(), names


def build_hf(model: mtp.MultiTaskModel, plain: nn.Module, names: list[str], rank: int) -> nn.Module:
    """HF PEFT LoRA on a copy of the plain timm model (`plain`), one adapter per task holding our task's factors."""
    from peft import LoraConfig, get_peft_model

    def config() -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS))  # scale 1, as ours (alpha=None)

    peft_model = get_peft_model(copy.deepcopy(plain), config(), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config())
    base = peft_model.base_model.model
    hf_targets = {n for n, m in base.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for name in names:
            adapters = model.task(name).peft["lora"].adapters()
            if set(adapters) != hf_targets:
                raise RuntimeError(
                    f"target sets differ: ours-only {set(adapters) - hf_targets}, HF-only {hf_targets - set(adapters)}"
                )
            for module_name, adapter in adapters.items():
                layer = base.get_submodule(module_name)
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                a.copy_(adapter.lora_a.reshape(a.shape))  # conv: (r, in*kh*kw) -> (r, in, kh, kw)
                b.copy_(adapter.lora_b.reshape(b.shape))  # conv: (out, r) -> (out, r, 1, 1)
    return peft_model.eval()


def lora_flops_per_image(model: mtp.MultiTaskModel, name: str) -> int:
    """Analytic extra FLOPs of one task's LoRA for one image: 2 * r * (in + out) per token / output pixel."""
    host, total = model.backbone, 0
    for module_name, adapter in model.task(name).peft["lora"].adapters().items():
        r, fan_in = adapter.lora_a.shape
        out = adapter.lora_b.shape[0]
        out_shape = host.output_shape(module_name)
        is_conv = isinstance(host.module(module_name), nn.Conv2d)
        positions = math.prod(out_shape[2:]) if is_conv else math.prod(out_shape[:-1])  # output pixels / tokens
        total += 2 * r * (fan_in + out) * positions
    return total


def count_flops(fn: Callable[[], object]) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench(variants: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each variant; each repeat runs every variant once (rotating the order)."""
    keys = list(variants)
    times: dict[str, list[float]] = {k: [] for k in keys}
    with torch.inference_mode():
        for _ in range(warmup):
            for k in keys:
                variants[k]()
        for rep in range(repeats):
            for k in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
                start = time.perf_counter()
                variants[k]()
                times[k].append(time.perf_counter() - start)
            print(f"  repeat {rep + 1}/{repeats}: " + ", ".join(f"{k} {times[k][-1]:.3f}s" for k in keys), flush=True)
    return times


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, names = build_ours(args)
    backbone = model.backbone.plain_copy().eval()
    hf = build_hf(model, backbone, names, args.rank)
    size = model.backbone.model.pretrained_cfg.get("input_size", (3, 224, 224))
    images = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(2))

    # Mixed batch: rows round-robin over the tasks, then shuffled with a fixed seed.
    order = torch.randperm(args.batch, generator=torch.Generator().manual_seed(3)).tolist()
    row_tasks = [names[k % len(names)] for k in order]
    mixed_slots = torch.tensor([model.slot(t) for t in row_tasks], dtype=torch.long)
    one_slots = torch.full((args.batch,), model.slot(names[0]), dtype=torch.long)
    plain_slots = torch.full((args.batch,), -1, dtype=torch.long)

    def hf_single() -> torch.Tensor:
        return hf(images)  # active adapter names[0], unmerged

    with torch.inference_mode():  # parity: same function in both libraries, and the adapters change the output
        ours_out = model.forward_features(images, mixed_slots).pooled
        hf_out = hf(images, adapter_names=row_tasks)
        plain_out = backbone(images)
        parity = (ours_out - hf_out).abs().max().item()
        single = (model.forward_features(images, one_slots).pooled - hf_single()).abs().max().item()
        effect = (ours_out - plain_out).abs().max().item()
        plain_diff = (model.forward_features(images, plain_slots).pooled - plain_out).abs().max().item()
    print(
        f"parity: max |ours - HF| mixed {parity:.2e}, one task {single:.2e}; ours(-1) vs backbone "
        f"{plain_diff:.2e}; adapters move the features by up to {effect:.2e}"
    )
    if max(parity, single, plain_diff) >= 1e-3 or effect < 1e-3:
        raise SystemExit("parity check failed: the comparison would not be fair")

    backbone_flops = count_flops(lambda: backbone(images[:1]))
    analytic = lora_flops_per_image(model, names[0])
    extra = analytic / backbone_flops
    floor = 1 / (1 + extra)

    variants: dict[str, Callable[[], object]] = {
        "frozen backbone (timm)": lambda: backbone(images),
        f"ours, mixed batch ({len(names)} tasks)": lambda: model.forward_features(images, mixed_slots),
        "ours, one task": lambda: model.forward_features(images, one_slots),
        "ours, all rows plain (-1)": lambda: model.forward_features(images, plain_slots),
        f"HF PEFT, adapter_names mixed ({len(names)} tasks)": lambda: hf(images, adapter_names=row_tasks),
        "HF PEFT, one active adapter (unmerged)": hf_single,
    }
    keys = list(variants)
    print(
        f"{args.model} batch {args.batch}, {len(names)} LoRA tasks r={args.rank} on {TARGETS}, "
        f"{torch.get_num_threads()} threads, {args.warmup} warmup + {args.repeats} repeats",
        flush=True,
    )
    times = bench(variants, args.warmup, args.repeats)
    load = os.getloadavg()[0]  # the last minute of the run, this process's own threads included
    busy = load > max(os.cpu_count() or 1, args.threads) + 0.5
    print(
        f"1-min load average at the end: {load:.2f} on {os.cpu_count()} CPUs"
        + (" -- WARNING: other processes competed for the cores, timings are unreliable" if busy else "")
    )
    medians = {k: statistics.median(v) for k, v in times.items()}
    base_s = medians[keys[0]]
    ours, hf_mixed = medians[keys[1]], medians[keys[4]]
    ours_vs_hf, ours_vs_backbone = hf_mixed / ours, base_s / ours

    print("\n| variant | median s/batch | img/s | vs backbone |\n|---|---:|---:|---:|")
    for k in keys:
        print(f"| {k} | {medians[k]:.4f} | {args.batch / medians[k]:.1f} | {base_s / medians[k]:.3f}x |")
    print(f"\nours / HF PEFT (mixed): {ours_vs_hf:.3f}x   HF PEFT mixed vs backbone: {base_s / hf_mixed:.3f}x")
    print(
        f"floor: LoRA adds {100 * extra:.2f}% FLOPs -> ~{floor:.3f}x (backbone {backbone_flops / 1e9:.2f} GFLOP/img;"
        f" LoRA {analytic / 1e6:.1f} MFLOP/img per task, counted analytically)"
    )
    ok_b, ok_h = ours_vs_backbone >= GOAL_VS_BACKBONE, ours_vs_hf >= GOAL_VS_HF
    print(
        f"goal: ours {ours_vs_backbone:.3f}x backbone (>= {GOAL_VS_BACKBONE}: {'met' if ok_b else 'NOT met'}), "
        f"{ours_vs_hf:.3f}x HF PEFT (>= {GOAL_VS_HF}: {'met' if ok_h else 'NOT met'})"
    )

    result: dict[str, Any] = {
        "config": {k: getattr(args, k) for k in ("model", "batch", "tasks", "rank", "threads", "repeats", "warmup")},
        "torch": torch.__version__,
        "load_average_end": load,
        "parity_max_abs_diff": {
            "mixed": parity,
            "one_task": single,
            "plain_rows": plain_diff,
            "adapter_effect": effect,
        },
        "variants": {
            k: {
                "median_s": medians[k],
                "img_per_s": args.batch / medians[k],
                "vs_backbone": base_s / medians[k],
                "times_s": times[k],
            }
            for k in keys
        },
        "ours_vs_hf": ours_vs_hf,
        "ours_vs_backbone": ours_vs_backbone,
        "flops": {
            "backbone_per_image": backbone_flops,
            "lora_per_image": analytic,
            "extra_fraction": extra,
            "floor_vs_backbone": floor,
        },
        "goals_met": {"vs_backbone": ok_b, "vs_hf": ok_h},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

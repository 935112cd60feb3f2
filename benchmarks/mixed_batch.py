"""Mixed-task batch throughput: frozen backbone vs ours vs HF PEFT's `adapter_names` mixed batch.

All variants share the same frozen weights and the same (randomised) LoRA factors, and are timed interleaved in one
process (each repeat times every variant once, in a rotating order) so that drift hits them all equally.

CPU (default): float32, `time.perf_counter`. CUDA (`--device cuda`): ViT-B/16 at 224, batch 64, LoRA r=16, 1 / 8 /
64 distinct tasks; parity is checked in float32 (TF32 off), then every model is cast with `model.to(bfloat16)`
(`--dtype`; not autocast: under autocast the LayerNorm outputs stay float32, so every adapted layer would cast its
input and its stacked adapter weights on every call, which no serving deployment would do). Variants: the frozen
backbone, ours (`MULTITASK_PEFT_KERNELS=auto`: Triton on CUDA), ours on the segmented torch path
(`MULTITASK_PEFT_KERNELS=torch`), HF PEFT's mixed batch, and a loop that runs one adapter's rows at a time (for each
task present: its rows alone through our model, outputs written back in row order: what a single-adapter server
does); CUDA events around each batch, the GPU idle before it, and next to that device time the host time of the call
(`time.perf_counter` around it, before any synchronisation: how long Python takes to enqueue the forward).

`--ranks 4 8 16 32 64` gives the tasks mixed ranks (task k gets ranks[k % len(ranks)]) instead of one `--rank`.
Parity comes first: ours (each backend), HF PEFT's mixed batch and the loop compute the same function (float32).

    python benchmarks/mixed_batch.py                # ViT-S/16 @ 224, batch 32, 8 LoRA tasks r=8, 2 threads
    python benchmarks/mixed_batch.py --quick        # smoke test on timm's tiny `test_vit`
    python benchmarks/mixed_batch.py --json out.json
    python benchmarks/mixed_batch.py --device cuda  # ViT-B/16, batch 64, r=16, 1 / 8 / 64 tasks, bfloat16
    python benchmarks/mixed_batch.py --device cuda --tasks 64 --dtype float16
    python benchmarks/mixed_batch.py --device cuda --tasks 64 --ranks 4 8 16 32 64
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
from multitask_peft import kernels
from multitask_peft.kernels import use_backend as kernel_backend

TARGETS = ("qkv", "proj", "fc1", "fc2")  # suffix matches in both libraries (incl. the patch_embed.proj conv)
GOAL_VS_BACKBONE, GOAL_VS_HF = 0.95, 1.15  # CPU
CUDA_GOAL_OVERHEAD, CUDA_GOAL_VS_HF, CUDA_GOAL_TASKS = 1.10, 3.0, 64  # time vs backbone, speed-up vs HF, at 64 tasks
DEFAULTS = {  # per device: model, batch, task counts, rank, repeats, warmup
    "cpu": ("vit_small_patch16_224", 32, [8], 8, 7, 2),
    "cuda": ("vit_base_patch16_224", 64, [1, 8, 64], 16, 20, 3),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--model", help="timm ViT name (default: vit_small_patch16_224 on cpu, vit_base_patch16_224 on cuda)"
    )
    p.add_argument("--batch", type=int, help="default: 32 on cpu, 64 on cuda")
    p.add_argument("--tasks", type=int, nargs="+", help="distinct tasks per batch, one run each (cpu: 8; cuda: 1 8 64)")
    p.add_argument("--rank", type=int, help="default: 8 on cpu, 16 on cuda")
    p.add_argument("--ranks", type=int, nargs="+", help="mixed ranks: task k gets ranks[k %% len(ranks)] (not --rank)")
    p.add_argument("--dtype", choices=list(DTYPES), help="cuda only (default bfloat16); the cpu runs float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, help="default: 7 on cpu, 20 on cuda")
    p.add_argument("--warmup", type=int, help="default: 2 on cpu, 3 on cuda")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="smoke test: test_vit, batch 8, 2 repeats")
    args = p.parse_args(argv)
    model, batch, tasks, rank, repeats, warmup = DEFAULTS[args.device]
    if args.quick:
        model, batch, repeats = "test_vit", 8, 2
        tasks = [1, 8] if args.device == "cuda" else tasks
    if args.device == "cpu" and args.dtype not in (None, "float32"):
        raise SystemExit(f"--dtype {args.dtype} is for --device cuda; the cpu runs float32")
    args.model, args.batch, args.tasks = args.model or model, args.batch or batch, args.tasks or tasks
    args.rank, args.repeats = args.rank or rank, args.repeats or repeats
    if args.ranks and min(args.ranks) < 1:
        raise SystemExit("--ranks must be positive")
    args.warmup = warmup if args.warmup is None else args.warmup
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def task_ranks(args: argparse.Namespace, num_tasks: int) -> list[int]:
    """The LoRA rank of each task: `--ranks` in rotation, else `--rank` for all."""
    ranks = args.ranks or [args.rank]
    return [ranks[k % len(ranks)] for k in range(num_tasks)]


def build_ours(args: argparse.Namespace, num_tasks: int) -> tuple[mtp.MultiTaskModel, list[str]]:
    """The multi-task model with `num_tasks` LoRA tasks whose parameters all carry N(0, 0.02) noise."""
    torch.manual_seed(0)
    model = mtp.MultiTaskModel.from_timm(args.model, pretrained=False).eval()
    names = [f"t{k}" for k in range(num_tasks)]
    gen = torch.Generator().manual_seed(1)
    for name, rank in zip(names, task_ranks(args, num_tasks)):
        lora = mtp.peft.LoRA(r=rank, targets=TARGETS)
        model.add_task(name, head=mtp.tasks.Classification(num_classes=10), peft=[lora])
        with torch.no_grad():
            for param in model.trainable_parameters(name):
                param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval(), names


def build_hf(model: mtp.MultiTaskModel, plain: nn.Module, names: list[str], ranks: list[int]) -> nn.Module:
    """HF PEFT LoRA on a copy of the plain timm model (`plain`), one adapter per task holding our task's factors."""
    from peft import LoraConfig, get_peft_model

    def config(rank: int) -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS))  # scale 1, as ours (alpha=None)

    peft_model = get_peft_model(copy.deepcopy(plain), config(ranks[0]), adapter_name=names[0])
    for name, rank in zip(names[1:], ranks[1:]):
        peft_model.add_adapter(name, config(rank))
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


def with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with kernel_backend(name):
            return fn()

    return run


def time_call(fn: Callable[[], object], cuda: bool) -> tuple[float, float]:
    """Seconds of one call, (device, host): CUDA events around it with the GPU idle before it, and the host's
    `perf_counter` around the call alone, before any synchronisation (cuda); else perf_counter for both."""
    if not cuda:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        return elapsed, elapsed
    torch.cuda.synchronize()
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    start = time.perf_counter()
    fn()
    host = time.perf_counter() - start
    end_event.record()
    end_event.synchronize()
    return start_event.elapsed_time(end_event) / 1e3, host


def bench(
    variants: dict[str, Callable[[], object]], warmup: int, repeats: int, cuda: bool = False
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per call of each variant, (device, host) times; each repeat runs every variant once (rotating the
    order)."""
    keys = list(variants)
    times: dict[str, list[float]] = {k: [] for k in keys}
    host: dict[str, list[float]] = {k: [] for k in keys}
    show = (lambda s: f"{s * 1e3:.2f}ms") if cuda else (lambda s: f"{s:.3f}s")
    with torch.inference_mode():
        for _ in range(warmup):
            for k in keys:
                variants[k]()
        for rep in range(repeats):
            for k in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
                device_s, host_s = time_call(variants[k], cuda)
                times[k].append(device_s)
                host[k].append(host_s)
            print(f"  repeat {rep + 1}/{repeats}: " + ", ".join(f"{k} {show(times[k][-1])}" for k in keys), flush=True)
    return times, host


def one_task_at_a_time(
    model: mtp.MultiTaskModel, images: torch.Tensor, groups: list[tuple[int, torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """What a single-adapter server does with a mixed batch: for each task present, its rows alone through the
    model (one forward per task), the pooled features written back in row order.

    `groups`: (slot, row indices, the same slot repeated per row), built once, on the images' device."""
    out = None
    for _, rows, slots in groups:
        pooled = model.forward_features(images.index_select(0, rows), slots).pooled
        if out is None:
            out = pooled.new_empty((images.shape[0], *pooled.shape[1:]))
        out.index_copy_(0, rows, pooled)
    return out


def loop_groups(
    model: mtp.MultiTaskModel, row_tasks: list[str], device: torch.device | str
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per task present (first-seen order): its slot, its rows (on `device`) and its slots (on the CPU, where
    `forward_features` reads them)."""
    rows: dict[str, list[int]] = {}
    for i, task in enumerate(row_tasks):
        rows.setdefault(task, []).append(i)
    return [
        (model.slot(t), torch.tensor(r, device=device), torch.full((len(r),), model.slot(t), dtype=torch.long))
        for t, r in rows.items()
    ]


def check_parity(
    model: mtp.MultiTaskModel,
    backbone: nn.Module,
    hf: nn.Module,
    images: torch.Tensor,
    row_tasks: list[str],
    slots: dict[str, torch.Tensor],
    groups: list[tuple[int, torch.Tensor, torch.Tensor]],
) -> dict[str, float]:
    """Same function in both libraries, on both of our kernel paths and in the one-task-at-a-time loop, and the
    adapters change the output (exits if not)."""
    with torch.inference_mode():
        ours_out = model.forward_features(images, slots["mixed"]).pooled
        hf_out = hf(images, adapter_names=row_tasks)
        plain_out = backbone(images)
        parity = (ours_out - hf_out).abs().max().item()
        with kernel_backend("torch"):
            torch_path = (model.forward_features(images, slots["mixed"]).pooled - hf_out).abs().max().item()
        loop = (one_task_at_a_time(model, images, groups) - hf_out).abs().max().item()
        single = (model.forward_features(images, slots["one"]).pooled - hf(images)).abs().max().item()
        effect = (ours_out - plain_out).abs().max().item()
        plain_diff = (model.forward_features(images, slots["plain"]).pooled - plain_out).abs().max().item()
    print(
        f"parity: max |ours - HF| mixed {parity:.2e} ({kernels.backend(images)}), {torch_path:.2e} (torch path), "
        f"one task at a time {loop:.2e}, one task {single:.2e}; ours(-1) vs backbone {plain_diff:.2e}; adapters "
        f"move the features by up to {effect:.2e}"
    )
    if max(parity, torch_path, loop, single, plain_diff) >= 1e-3 or effect < 1e-3:
        raise SystemExit("parity check failed: the comparison would not be fair")
    return {
        "mixed": parity,
        "mixed_torch_path": torch_path,
        "one_task_at_a_time": loop,
        "one_task": single,
        "plain_rows": plain_diff,
        "adapter_effect": effect,
    }


def run(args: argparse.Namespace, num_tasks: int) -> dict[str, Any]:
    """One model with `num_tasks` tasks: parity, then every variant timed; prints its table and goal line."""
    cuda = args.device == "cuda"
    model, names = build_ours(args, num_tasks)
    ranks = task_ranks(args, num_tasks)
    backbone = model.backbone.plain_copy().eval()
    hf = build_hf(model, backbone, names, ranks)
    size = model.backbone.model.pretrained_cfg.get("input_size", (3, 224, 224))
    images = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(2))

    # Mixed batch: rows round-robin over the tasks, then shuffled with a fixed seed.
    order = torch.randperm(args.batch, generator=torch.Generator().manual_seed(3)).tolist()
    row_tasks = [names[k % len(names)] for k in order]
    slots = {
        "mixed": torch.tensor([model.slot(t) for t in row_tasks], dtype=torch.long),
        "one": torch.full((args.batch,), model.slot(names[0]), dtype=torch.long),
        "plain": torch.full((args.batch,), -1, dtype=torch.long),
    }  # slots stay on the CPU: forward_features reads them as Python ints
    groups = loop_groups(model, row_tasks, "cuda" if cuda else "cpu")

    if cuda:  # float32 on the GPU for the parity check (TF32 convolutions off, as on the CPU)
        model, backbone, hf, images = model.cuda(), backbone.cuda(), hf.cuda(), images.cuda()
        model.clear_kernel_cache()  # moved weights: drop the packs of the old storage now
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            parity = check_parity(model, backbone, hf, images, row_tasks, slots, groups)
    else:
        parity = check_parity(model, backbone, hf, images, row_tasks, slots, groups)

    backbone_flops = count_flops(lambda: backbone(images[:1]))
    per_task = {name: lora_flops_per_image(model, name) for name in dict.fromkeys(names)}
    analytic = sum(per_task[t] for t in row_tasks) / len(row_tasks)  # the batch's mean (mixed ranks differ)
    extra = analytic / backbone_flops
    floor = 1 / (1 + extra)

    if cuda:
        dtype = DTYPES[args.dtype]
        model, backbone, hf, images = model.to(dtype), backbone.to(dtype), hf.to(dtype), images.to(dtype)
        model.clear_kernel_cache()  # stacks packed from the float32 weights would survive the cast (same tensor ids)
        with torch.inference_mode(), kernel_backend("auto"):
            impl = kernels.backend(images)
            low = (model.forward_features(images, slots["mixed"]).pooled - hf(images, adapter_names=row_tasks)).abs()
        print(f"{args.dtype}: max |ours ({impl}) - HF| mixed {low.max().item():.2e} (not checked: rounding)")

        def mixed() -> object:
            return model.forward_features(images, slots["mixed"])

        labelled: dict[str, tuple[str, Callable[[], object]]] = {
            "backbone": ("frozen backbone (timm)", lambda: backbone(images)),
            "ours": (f"ours, mixed batch ({len(names)} tasks, {impl})", with_backend("auto", mixed)),
            "ours_torch": (f"ours, mixed batch ({len(names)} tasks, torch path)", with_backend("torch", mixed)),
            "hf_mixed": (
                f"HF PEFT, adapter_names mixed ({len(names)} tasks)",
                lambda: hf(images, adapter_names=row_tasks),
            ),
            "loop": (
                f"ours, one task at a time ({len(groups)} forwards, {impl})",
                with_backend("auto", lambda: one_task_at_a_time(model, images, groups)),
            ),
        }
    else:
        labelled = {
            "backbone": ("frozen backbone (timm)", lambda: backbone(images)),
            "ours": (
                f"ours, mixed batch ({len(names)} tasks)",
                lambda: model.forward_features(images, slots["mixed"]),
            ),
            "ours_one": ("ours, one task", lambda: model.forward_features(images, slots["one"])),
            "ours_plain": ("ours, all rows plain (-1)", lambda: model.forward_features(images, slots["plain"])),
            "hf_mixed": (
                f"HF PEFT, adapter_names mixed ({len(names)} tasks)",
                lambda: hf(images, adapter_names=row_tasks),
            ),
            "hf_one": ("HF PEFT, one active adapter (unmerged)", lambda: hf(images)),  # names[0], unmerged
            "loop": (
                f"ours, one task at a time ({len(groups)} forwards)",
                lambda: one_task_at_a_time(model, images, groups),
            ),
        }
    variants = dict(labelled.values())
    ids = {label: key for key, (label, _) in labelled.items()}
    keys = list(variants)
    ours_key, hf_key = labelled["ours"][0], labelled["hf_mixed"][0]
    rank_text = f"r={args.rank}" if not args.ranks else "r=" + "/".join(map(str, args.ranks)) + " (mixed)"
    print(
        f"{args.model} batch {args.batch}, {len(names)} LoRA tasks {rank_text} on {TARGETS}, "
        + (f"{args.dtype} on {torch.cuda.get_device_name()}" if cuda else f"{torch.get_num_threads()} threads")
        + f", {args.warmup} warmup + {args.repeats} repeats",
        flush=True,
    )
    times, host_times = bench(variants, args.warmup, args.repeats, cuda)
    load = os.getloadavg()[0]  # the last minute of the run, this process's own threads included
    busy = load > max(os.cpu_count() or 1, args.threads) + 0.5
    print(
        f"1-min load average at the end: {load:.2f} on {os.cpu_count()} CPUs"
        + (" -- WARNING: other processes competed for the cores, timings are unreliable" if busy else "")
    )
    medians = {k: statistics.median(v) for k, v in times.items()}
    host_medians = {k: statistics.median(v) for k, v in host_times.items()}
    base_s = medians[keys[0]]
    ours, hf_mixed = medians[ours_key], medians[hf_key]
    ours_vs_hf, ours_vs_backbone = hf_mixed / ours, base_s / ours

    if cuda:
        print("\n| variant | median ms/batch (GPU) | host ms to enqueue | img/s | vs backbone |")
        print("|---|---:|---:|---:|---:|")
        for k in keys:
            print(
                f"| {k} | {medians[k] * 1e3:.2f} | {host_medians[k] * 1e3:.2f} | {args.batch / medians[k]:.1f} | "
                f"{base_s / medians[k]:.3f}x |"
            )
    else:
        print("\n| variant | median s/batch | img/s | vs backbone |\n|---|---:|---:|---:|")
        for k in keys:
            print(f"| {k} | {medians[k]:.4f} | {args.batch / medians[k]:.1f} | {base_s / medians[k]:.3f}x |")
    print(f"\nours / HF PEFT (mixed): {ours_vs_hf:.3f}x   HF PEFT mixed vs backbone: {base_s / hf_mixed:.3f}x")
    print(f"ours (mixed) / one task at a time: {medians[labelled['loop'][0]] / ours:.3f}x")
    if cuda:
        print(f"ours ({impl}) / ours (torch path): {medians[labelled['ours_torch'][0]] / ours:.3f}x")
    print(
        f"floor: LoRA adds {100 * extra:.2f}% FLOPs -> ~{floor:.3f}x (backbone {backbone_flops / 1e9:.2f} GFLOP/img;"
        f" LoRA {analytic / 1e6:.1f} MFLOP/img per task{' (mean over the rows)' if args.ranks else ''}, counted "
        "analytically)"
    )
    if cuda:
        ok_b, ok_h = 1 / ours_vs_backbone <= CUDA_GOAL_OVERHEAD, ours_vs_hf >= CUDA_GOAL_VS_HF
        print(
            f"goal: ours {1 / ours_vs_backbone:.3f}x the backbone's time (<= {CUDA_GOAL_OVERHEAD}: "
            f"{'met' if ok_b else 'NOT met'}), {ours_vs_hf:.3f}x HF PEFT (>= {CUDA_GOAL_VS_HF}: "
            f"{'met' if ok_h else 'NOT met'})"
        )
    else:
        ok_b, ok_h = ours_vs_backbone >= GOAL_VS_BACKBONE, ours_vs_hf >= GOAL_VS_HF
        print(
            f"goal: ours {ours_vs_backbone:.3f}x backbone (>= {GOAL_VS_BACKBONE}: {'met' if ok_b else 'NOT met'}), "
            f"{ours_vs_hf:.3f}x HF PEFT (>= {GOAL_VS_HF}: {'met' if ok_h else 'NOT met'})"
        )

    config = {k: getattr(args, k) for k in ("model", "batch", "tasks", "rank", "threads", "repeats", "warmup")}
    config.update(tasks=num_tasks, ranks=args.ranks, task_ranks=ranks)
    if cuda:
        config.update(device=torch.cuda.get_device_name(), dtype=args.dtype, kernels=impl)
    return {
        "config": config,
        "torch": torch.__version__,
        "load_average_end": load,
        "parity_max_abs_diff": parity,
        "variants": {
            k: {
                "id": ids[k],
                "median_s": medians[k],
                "host_median_s": host_medians[k],
                "img_per_s": args.batch / medians[k],
                "vs_backbone": base_s / medians[k],
                "times_s": times[k],
                "host_times_s": host_times[k],
            }
            for k in keys
        },
        "ours_vs_hf": ours_vs_hf,
        "ours_vs_one_task_at_a_time": medians[labelled["loop"][0]] / ours,
        "ours_vs_backbone": ours_vs_backbone,
        "flops": {
            "backbone_per_image": backbone_flops,
            "lora_per_image": analytic,
            "extra_fraction": extra,
            "floor_vs_backbone": floor,
        },
        "goals_met": {"vs_backbone": ok_b, "vs_hf": ok_h},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """One run per task count; the JSON is that run's dict (one count on the cpu, as before) or {"runs": [...]}."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = []
    for k, num_tasks in enumerate(args.tasks):
        if k:
            print(f"\n--- {num_tasks} tasks ---")
        runs.append(run(args, num_tasks))
    result = runs[0] if args.device == "cpu" and len(runs) == 1 else {"runs": runs}
    if args.device == "cuda":
        goal_run = next((r for r in runs if r["config"]["tasks"] == CUDA_GOAL_TASKS), runs[-1])
        n, met = goal_run["config"]["tasks"], goal_run["goals_met"]
        print(
            f"\ngoal at {n} tasks"
            + ("" if n == CUDA_GOAL_TASKS else f" (no {CUDA_GOAL_TASKS}-task run)")
            + f": within {CUDA_GOAL_OVERHEAD}x of the backbone: {'met' if met['vs_backbone'] else 'NOT met'}; "
            f">= {CUDA_GOAL_VS_HF}x HF PEFT: {'met' if met['vs_hf'] else 'NOT met'}"
        )
        result["goals_met"] = met
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

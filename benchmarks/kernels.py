"""Batched multi-adapter ops vs HF PEFT's per-adapter loop vs the frozen layer alone, per op and shape.

Sweep: rows = images x 197 tokens, hidden sizes of ViT-S/B/L (384 / 768 / 1024; LoRA and scale/shift also at
out = 4 * in, the MLP's fc1), rank or adapter width 4 / 16 / 64, distinct slots per batch 1 / 8 / 64 / 128 (at
most one slot per image). For each config it times

- ours: `kernels.lora_` / `scale_shift_` / `bottleneck_` as dispatched (`MULTITASK_PEFT_KERNELS`, `--backend`):
  Triton on CUDA tensors, the segmented torch path on the CPU;
- loop: HF PEFT's mixed batch (`_mixed_batch_forward`): for each adapter, gather its images by index, compute its
  update, add it back by index (`y[idx] += ...`). The index tensors are built once on the device, so this is a
  lower bound: HF rebuilds them from Python lists in every layer;
- base: the frozen layer alone: `F.linear(x, W, b)` of the adapted Linear(in, out) for LoRA, of the Linear(C, C)
  that a bottleneck adapter follows (attention proj), and for scale/shift an in-place `y.mul_(1.0)` (one read and
  one write of the rows: the least any elementwise pass costs).

Rows are slot-sorted as `forward_features` hands them to every layer: slot s owns a contiguous block of images.
On CUDA, "us" is GPU time from CUDA events, with the L2 cache flushed before every call and a spin kernel queued
in front of it so that the CPU has launched the whole call before the GPU starts it; "host us" is the CPU time of
the call (Python, packing lookups, launches). "loop / ours" divides max(GPU, host) per call: a steady stream of
calls runs at whichever is slower. On the CPU the times are `time.perf_counter`. Medians over repeats; each repeat
times every variant once, in a rotating order.

Floor: floor_time = max(bytes / peak GB/s, flops / peak FLOP/s); "of floor" = floor_time / measured GPU time.
elem = element size, M = rows, W = slots, r = rank (d = adapter width):

    LoRA:        bytes = elem * (M*K + 2*M*N + W*r*(K + N))        flops = 2*M*r*(K + N)
    scale/shift: bytes = elem * (2*M*C + 2*W*C)                    flops = 2*M*C
    bottleneck:  bytes = elem * (3*M*C + W*(2*d*C + d + C))        flops = 4*M*d*C
                 (LoRA with K = N = C and r = d, reading its input z apart from y, plus both biases)

    python benchmarks/kernels.py                           # full sweep: CUDA (bf16) when available, else the CPU
    python benchmarks/kernels.py --ops lora --ranks 16     # a subset
    python benchmarks/kernels.py --quick --threads 1       # a handful of tiny configs (< 1 min on the CPU)
    MULTITASK_PEFT_KERNELS=triton TRITON_INTERPRET=1 python benchmarks/kernels.py --quick --backend triton
        # smoke test of the Triton path on the CPU through Triton's interpreter (its timings mean nothing)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from multitask_peft import kernels
from multitask_peft.kernels.packing import BLOCK_M  # rows per Triton tile

CACHE = kernels.PackCache()  # stacked weights reused across repeats, as a model's layers keep them

OPS = ("lora", "scale_shift", "bottleneck")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# (device name contains, peak GB/s, TFLOP/s fp32 without tensor cores, TFLOP/s 16-bit dense tensor cores); the
# Triton kernels run fp32 with input_precision="ieee", so fp32 is held to the non-tensor peak. First match wins.
PEAKS = (("H200", 4800.0, 67.0, 989.0), ("H100 PCIe", 2000.0, 51.0, 756.0), ("H100", 3350.0, 67.0, 989.0))
DEFAULT_PEAK = PEAKS[-1]  # H100 SXM
GOAL_SLOTS, GOAL_RANK, GOAL_FLOOR_FRACTION, GOAL_VS_LOOP = 64, 16, 0.5, 3.0
L2_FLUSH_BYTES = 256 << 20
LORA_SCALE, ADAPTER_SCALE, ACT = 0.5, 0.5, "gelu"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), help="sets MULTITASK_PEFT_KERNELS")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--images", nargs="+", type=int, default=[8, 64, 128])
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--hidden", nargs="+", type=int, default=[384, 768, 1024])
    p.add_argument("--out-mult", nargs="+", type=int, default=[1, 4], help="LoRA out = mult * in (scale/shift C)")
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 16, 64], help="LoRA rank, bottleneck width")
    p.add_argument("--slots", nargs="+", type=int, default=[1, 8, 64, 128], help="distinct adapters per batch")
    p.add_argument("--repeats", type=int, help="default: 30 on cuda, 5 on cpu")
    p.add_argument("--warmup", type=int, help="default: 5 on cuda (Triton compiles here), 1 on cpu")
    p.add_argument("--peak-gbs", type=float, help="default: by GPU name (H100 SXM: 3350); none on cpu")
    p.add_argument("--peak-tflops", type=float, help="default: by GPU name and dtype (H100: 989 16-bit, 67 fp32)")
    p.add_argument("--no-flush", action="store_true", help="cuda: keep the L2 cache warm between calls")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="smoke test: 4 x 50 rows, 64 channels, rank 8, 3 repeats")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.images, args.tokens, args.hidden, args.ranks, args.slots = [4], 50, [64], [8], [1, 4]
        args.repeats, args.warmup = args.repeats or 3, 1 if args.warmup is None else args.warmup
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (30 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    return args


# --- configs and their cases --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    op: str
    images: int
    tokens: int
    k: int  # in features (channels C for scale/shift and bottleneck)
    n: int  # out features (= k but for LoRA)
    r: int  # LoRA rank / adapter width (0 for scale/shift)
    slots: int

    @property
    def rows(self) -> int:
        return self.images * self.tokens

    def bounds(self) -> list[tuple[int, int]]:
        """(first image, end image) of each slot: contiguous, near-equal blocks."""
        return [(s * self.images // self.slots, (s + 1) * self.images // self.slots) for s in range(self.slots)]


def sweep(op: str, args: argparse.Namespace) -> list[Shape]:
    out = []
    for images in args.images:
        for slots in (s for s in args.slots if s <= images):
            for h in args.hidden:
                if op == "lora":
                    out += [
                        Shape(op, images, args.tokens, h, m * h, r, slots) for m in args.out_mult for r in args.ranks
                    ]
                elif op == "scale_shift":
                    out += [Shape(op, images, args.tokens, m * h, m * h, 0, slots) for m in args.out_mult]
                else:
                    out += [Shape(op, images, args.tokens, h, h, r, slots) for r in args.ranks]
    return out


@dataclass
class Case:
    """One config: the initial output `y0`, ours / loop (update their argument in place), the base op, the floor."""

    shape: Shape
    y0: torch.Tensor  # (M, N)
    ours: Callable[[torch.Tensor], object]
    loop: Callable[[torch.Tensor], object]
    base: Callable[[], object]
    bytes: int
    flops: int
    tiles: int  # Triton row tiles of the launch (entries split into BLOCK_M rows)


def build_case(shape: Shape, dtype: torch.dtype, device: torch.device) -> Case:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(size, generator=gen, device=device) * std).to(dtype)

    m, k, n, r, w, t = shape.rows, shape.k, shape.n, shape.r, shape.slots, shape.tokens
    bounds = shape.bounds()
    index = [torch.arange(i0, i1, device=device) for i0, i1 in bounds]  # images of each slot
    tiles = sum(math.ceil((i1 - i0) * t / BLOCK_M) for i0, i1 in bounds)
    elem = torch.finfo(dtype).bits // 8
    y0 = randn(m, n)

    if shape.op == "lora":
        x = randn(m, k)  # (M, K)
        a = [randn(r, k, std=k**-0.5) for _ in range(w)]  # (r, K) each
        b = [randn(n, r, std=r**-0.5) for _ in range(w)]  # (N, r) each
        segments = [kernels.LoRASegment(i0 * t, i1 * t, a[s], b[s], LORA_SCALE) for s, (i0, i1) in enumerate(bounds)]
        weight, bias = randn(n, k, std=k**-0.5), randn(n)
        x3 = x.view(shape.images, t, k)  # (images, tokens, K)

        def loop(y: torch.Tensor) -> None:
            y3 = y.view(shape.images, t, n)  # (images, tokens, N)
            for idx, a_s, b_s in zip(index, a, b):
                y3[idx] += F.linear(F.linear(x3[idx], a_s), b_s) * LORA_SCALE

        return Case(
            shape, y0, lambda y: kernels.lora_(y, x, segments, CACHE), loop, lambda: F.linear(x, weight, bias),
            elem * (m * k + 2 * m * n + w * r * (k + n)), 2 * m * r * (k + n), tiles,
        )  # fmt: skip

    if shape.op == "scale_shift":
        scale = [1.0 + randn(n, std=0.01) for _ in range(w)]  # (C,) each
        shift = [randn(n, std=0.01) for _ in range(w)]
        segments = [kernels.ScaleShiftSegment(i0 * t, i1 * t, scale[s], shift[s]) for s, (i0, i1) in enumerate(bounds)]
        plain = y0.clone()

        def loop(y: torch.Tensor) -> None:
            y3 = y.view(shape.images, t, n)  # (images, tokens, C)
            for idx, scale_s, shift_s in zip(index, scale, shift):
                y3[idx] = y3[idx] * scale_s + shift_s

        return Case(
            shape, y0, lambda y: kernels.scale_shift_(y, segments, CACHE), loop, lambda: plain.mul_(1.0),
            elem * (2 * m * n + 2 * w * n), 2 * m * n, tiles,
        )  # fmt: skip

    z = randn(m, k)  # (M, C) adapter input (a parallel adapter: not y itself)
    down = [randn(r, k, std=k**-0.5) for _ in range(w)]  # (d, C)
    down_bias = [randn(r, std=0.1) for _ in range(w)]
    up = [randn(k, r, std=r**-0.5) for _ in range(w)]  # (C, d)
    up_bias = [randn(k, std=0.1) for _ in range(w)]
    segments = [
        kernels.BottleneckSegment(i0 * t, i1 * t, down[s], down_bias[s], up[s], up_bias[s], ACT, ADAPTER_SCALE)
        for s, (i0, i1) in enumerate(bounds)
    ]
    weight, bias = randn(k, k, std=k**-0.5), randn(k)
    z3 = z.view(shape.images, t, k)
    act = kernels.ACTIVATIONS[ACT]

    def loop(y: torch.Tensor) -> None:
        y3 = y.view(shape.images, t, k)  # (images, tokens, C)
        for idx, d_s, db_s, u_s, ub_s in zip(index, down, down_bias, up, up_bias):
            y3[idx] += F.linear(act(F.linear(z3[idx], d_s, db_s)), u_s, ub_s) * ADAPTER_SCALE

    return Case(
        shape, y0, lambda y: kernels.bottleneck_(y, z, segments, CACHE), loop, lambda: F.linear(z, weight, bias),
        elem * (3 * m * k + w * (2 * r * k + r + k)), 4 * m * r * k, tiles,
    )  # fmt: skip


# --- timing -------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    device_s: list[float] = field(default_factory=list)  # GPU time (CUDA) or wall time (CPU) per call
    host_s: list[float] = field(default_factory=list)  # CPU time of the call

    @property
    def device(self) -> float:
        return statistics.median(self.device_s)

    @property
    def host(self) -> float:
        return statistics.median(self.host_s)

    @property
    def cost(self) -> float:
        """Time per call in a steady stream: bound by the GPU or by the host, whichever is slower."""
        return max(self.device, self.host)


class Timer:
    """GPU time (CUDA events; L2 flushed, CPU ahead of the GPU) and host time per call; perf_counter on the CPU."""

    def __init__(self, device: torch.device, flush: bool = True) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._l2 = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush else None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1000)
            start.record()
            torch.cuda._sleep(10_000_000)
            end.record()
            end.synchronize()
            self._cycles_per_s = 10_000_000 / (start.elapsed_time(end) / 1e3)

    def run(self, variants: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, Timing]:
        keys = list(variants)
        lead = dict.fromkeys(keys, 0.0)  # seconds of spin queued before a call: > its host time
        for _ in range(warmup):
            for k in keys:
                start = time.perf_counter()
                variants[k]()
                if self.cuda:
                    torch.cuda.synchronize()
                lead[k] = 1.5 * (time.perf_counter() - start) + 20e-6  # the last warm-up call: compiled, cached
        timings = {k: Timing() for k in keys}
        for rep in range(repeats):
            events = {}
            for k in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
                if self.cuda:
                    if self._l2 is not None:
                        self._l2.zero_()
                    torch.cuda._sleep(int(min(lead[k], 0.05) * self._cycles_per_s))
                    events[k] = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                    events[k][0].record()
                start = time.perf_counter()
                variants[k]()
                host = time.perf_counter() - start
                timings[k].host_s.append(host)
                lead[k] = max(lead[k], 1.5 * host + 20e-6)
                if self.cuda:
                    events[k][1].record()
                else:
                    timings[k].device_s.append(host)
            if self.cuda:
                torch.cuda.synchronize()
                for k, (start_event, end_event) in events.items():
                    timings[k].device_s.append(start_event.elapsed_time(end_event) / 1e3)
        return timings


def with_fuse_threshold(fn: Callable[[torch.Tensor], object], value: int) -> Callable[[torch.Tensor], None]:
    """`fn` run with `triton_ops.FUSE_MIN_TILES = value` (0: always fused, 1 << 30: always shrink + expand)."""
    from multitask_peft.kernels import triton_ops

    def run(y: torch.Tensor) -> None:
        saved = triton_ops.FUSE_MIN_TILES
        triton_ops.FUSE_MIN_TILES = value
        try:
            fn(y)
        finally:
            triton_ops.FUSE_MIN_TILES = saved

    return run


# --- one config ---------------------------------------------------------------------------------------------------


def check_parity(case: Case, ours: dict[str, Callable[[torch.Tensor], object]]) -> float:
    """Max |ours - loop| over the ours-variants, after checking the update moves the output at all."""
    expected = case.y0.clone()
    case.loop(expected)
    effect = (expected - case.y0).abs().max().item()
    tol = (1e-4 if case.y0.dtype == torch.float32 else 2e-2) * expected.abs().max().item()
    worst = 0.0
    for name, fn in ours.items():
        got = case.y0.clone()
        fn(got)
        err = (got.float() - expected.float()).abs().max().item()
        if not err <= tol or effect == 0.0:
            raise SystemExit(f"parity failed for {name} on {case.shape}: max |ours - loop| {err:.3e} (tolerance "
                             f"{tol:.3e}), the update moves y by {effect:.3e}")  # fmt: skip
        worst = max(worst, err)
    return worst


def run_case(case: Case, timer: Timer, args: argparse.Namespace, fused: bool) -> dict[str, Any]:
    ours = {"ours": case.ours}
    if fused:  # shrink + expand vs the fused kernel, to pick triton_ops.FUSE_MIN_TILES
        ours["fused"] = with_fuse_threshold(case.ours, 0)
        ours["unfused"] = with_fuse_threshold(case.ours, 1 << 30)
    parity = check_parity(case, ours)
    buffers = {name: case.y0.clone() for name in ours}
    variants: dict[str, Callable[[], object]] = {
        name: (lambda f=fn, y=buffers[name]: f(y)) for name, fn in ours.items()
    }
    loop_buffer = case.y0.clone()
    variants["loop"] = lambda: case.loop(loop_buffer)
    variants["base"] = case.base
    with torch.inference_mode():
        timings = timer.run(variants, args.warmup, args.repeats)
    ours_t, loop_t, base_t = timings["ours"], timings["loop"], timings["base"]
    floor = max(case.bytes / args.peak_bps, case.flops / args.peak_flops) if args.peak_bps else None
    return {
        **{k: getattr(case.shape, k) for k in ("op", "images", "tokens", "rows", "k", "n", "r", "slots")},
        "tiles": case.tiles,
        "bytes": case.bytes,
        "flops": case.flops,
        "parity_max_abs_diff": parity,
        "times": {k: {"device_s": v.device, "host_s": v.host, "device_all": v.device_s} for k, v in timings.items()},
        "loop_over_ours": loop_t.cost / ours_t.cost,
        "ours_over_base": ours_t.device / base_t.device,
        "gbs": case.bytes / ours_t.device / 1e9,
        "tflops": case.flops / ours_t.device / 1e12,
        "floor_s": floor,
        "floor_fraction": floor / ours_t.device if floor else None,
    }


# --- report -------------------------------------------------------------------------------------------------------


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def shape_label(row: dict[str, Any]) -> str:
    return f"{row['images']}x{row['tokens']}"


def print_table(op: str, rows: list[dict[str, Any]], cuda: bool) -> None:
    size = "C" if op == "scale_shift" else "C, d" if op == "bottleneck" else "in -> out, r"
    cols: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("rows", shape_label),
        (size, lambda q: f"{q['n']}" if op == "scale_shift" else f"{q['k']}, {q['r']}" if op == "bottleneck"
         else f"{q['k']} -> {q['n']}, {q['r']}"),
        ("slots", lambda q: str(q["slots"])),
        ("ours us", lambda q: us(q["times"]["ours"]["device_s"])),
    ]  # fmt: skip
    if cuda:
        cols.append(("ours host us", lambda q: us(q["times"]["ours"]["host_s"])))
    cols.append(("loop us", lambda q: us(q["times"]["loop"]["device_s"])))
    if cuda:
        cols.append(("loop host us", lambda q: us(q["times"]["loop"]["host_s"])))
    cols += [
        ("base us", lambda q: us(q["times"]["base"]["device_s"])),
        ("loop / ours", lambda q: f"{q['loop_over_ours']:.2f}x"),
        ("ours / base", lambda q: f"{q['ours_over_base']:.2f}x"),
        ("GB/s", lambda q: f"{q['gbs']:.1f}"),
        ("TFLOP/s", lambda q: f"{q['tflops']:.3f}"),
        ("floor us", lambda q: us(q["floor_s"]) if q["floor_s"] else "-"),
        ("of floor", lambda q: f"{q['floor_fraction']:.2f}" if q["floor_fraction"] else "-"),
    ]
    print(f"\n{op}\n\n| " + " | ".join(h for h, _ in cols) + " |\n|" + "---|" * 3 + "---:|" * (len(cols) - 3))
    for q in rows:
        print("| " + " | ".join(fn(q) for _, fn in cols) + " |")


def fuse_report(rows: list[dict[str, Any]], current: int) -> dict[str, Any]:
    """Fused vs shrink + expand per LoRA config, and the FUSE_MIN_TILES that minimises their summed GPU time."""
    print("\nLoRA: fused kernel vs shrink + expand\n")
    print("| rows | in -> out, r | slots | tiles | fused us | unfused us | unfused / fused | picked now |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for q in rows:
        f, u = q["times"]["fused"]["device_s"], q["times"]["unfused"]["device_s"]
        picked = "fused" if q["tiles"] >= current else "unfused"
        print(f"| {shape_label(q)} | {q['k']} -> {q['n']}, {q['r']} | {q['slots']} | {q['tiles']} | {us(f)} | {us(u)} "
              f"| {u / f:.2f}x | {picked} |")  # fmt: skip

    def total(threshold: int) -> float:
        return sum(q["times"]["fused" if q["tiles"] >= threshold else "unfused"]["device_s"] for q in rows)

    candidates = sorted({0, *(q["tiles"] for q in rows), 1 << 30})
    best = min(candidates, key=total)
    lower = max((c for c in candidates if c < best), default=None)
    meaning = "always fused" if best == 0 else "never fused" if best == 1 << 30 else f"any value in ({lower}, {best}]"
    print(
        f"\nFUSE_MIN_TILES: now {current}: {us(total(current))} us summed over these configs; best {best} "
        f"({meaning}): {us(total(best))} us"
    )
    return {"current": current, "current_total_s": total(current), "best": best, "best_total_s": total(best)}


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    picked = [q for q in rows if q["slots"] == GOAL_SLOTS and q["r"] == GOAL_RANK]
    if not picked:
        print(f"\ngoal: not evaluated (no LoRA config with {GOAL_SLOTS} slots and r={GOAL_RANK} in this sweep)")
        return {}
    worst_floor = min(picked, key=lambda q: q["floor_fraction"] or 0.0)
    worst_loop = min(picked, key=lambda q: q["loop_over_ours"])
    ok_floor = (worst_floor["floor_fraction"] or 0.0) >= GOAL_FLOOR_FRACTION
    ok_loop = worst_loop["loop_over_ours"] >= GOAL_VS_LOOP

    def where(q: dict[str, Any]) -> str:
        return f"{shape_label(q)} rows, {q['k']} -> {q['n']}"

    print(
        f"\ngoal ({GOAL_SLOTS} LoRA tasks, r={GOAL_RANK}, {len(picked)} configs): worst fraction of floor "
        f"{worst_floor['floor_fraction'] or 0.0:.2f} at {where(worst_floor)} (>= {GOAL_FLOOR_FRACTION}: "
        f"{'met' if ok_floor else 'NOT met'}); worst loop / ours {worst_loop['loop_over_ours']:.2f}x at "
        f"{where(worst_loop)} (>= {GOAL_VS_LOOP}x: {'met' if ok_loop else 'NOT met'})"
    )
    return {"floor_fraction": ok_floor, "vs_loop": ok_loop}


def resolve_peaks(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> str:
    """Sets args.peak_bps / args.peak_flops (None on the CPU unless given); returns where they came from."""
    source = "given"
    if device.type == "cuda" and (args.peak_gbs is None or args.peak_tflops is None):
        name = torch.cuda.get_device_name(device)
        match = next((p for p in PEAKS if p[0] in name), None)
        _, gbs, fp32, half = match or DEFAULT_PEAK
        source = f"{match[0]} defaults" if match else f"unknown GPU {name!r}: H100 SXM defaults, pass --peak-*"
        args.peak_gbs = args.peak_gbs or gbs
        args.peak_tflops = args.peak_tflops or (fp32 if dtype == torch.float32 else half)
    args.peak_bps = args.peak_gbs * 1e9 if args.peak_gbs else None
    args.peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else math.inf
    return source if args.peak_gbs else "none on cpu: pass --peak-gbs / --peak-tflops"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend:
        os.environ["MULTITASK_PEFT_KERNELS"] = args.backend
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        torch.cuda.set_device(device)  # events, synchronize and the spin kernel use the current device
    impl = kernels.backend(torch.empty(0, device=device))
    if impl in ("triton", "reference") and not cuda and not args.quick:
        raise SystemExit(f"the {impl} backend on the CPU is for --quick smoke tests only (its timings mean nothing)")
    fused = impl == "triton"
    source = resolve_peaks(args, device, dtype)
    timer = Timer(device, flush=not args.no_flush)
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"device {name}, {args.dtype}, backend {impl}"
        + (" (Triton interpreter: timings are meaningless, smoke test only)" if impl == "triton" and not cuda else "")
        + f"; peaks {args.peak_gbs or '-'} GB/s, {args.peak_tflops or '-'} TFLOP/s ({source}); "
        f"{args.warmup} warmup + {args.repeats} repeats" + (", L2 flushed" if cuda and not args.no_flush else ""),
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {}
    for op in args.ops:
        results[op] = []
        for shape in sweep(op, args):
            case = build_case(shape, dtype, device)
            results[op].append(run_case(case, timer, args, fused and op == "lora"))
            del case
            CACHE.clear()  # the packing cache holds every config's weights alive
        print_table(op, results[op], cuda)

    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("peak_bps", "peak_flops")},
        "device": name,
        "backend": impl,
        "torch": torch.__version__,
        "peaks": {"gbs": args.peak_gbs, "tflops": args.peak_tflops, "source": source},
        "results": results,
    }
    if fused and results.get("lora"):
        from multitask_peft.kernels import triton_ops

        report["fuse_min_tiles"] = fuse_report(results["lora"], triton_ops.FUSE_MIN_TILES)
    if cuda and results.get("lora"):
        report["goals_met"] = goals(results["lora"])
    else:
        print("\ngoal: evaluated on CUDA only")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()

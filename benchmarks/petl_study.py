"""The PETL study's findings measured on a finished sweep (`mtpeft sweep configs/petl_fmnist.yaml`).

Reads the sweep directory (its chosen configuration per method family, `sweep.json`) and measures, on the test
subset the selection never saw:

1. tuned methods: each family's chosen configuration vs full fine-tuning and the linear probe (top-1, PEFT
   parameters, share of full fine-tuning's, PPT), with the issue's goal check;
2. an ensemble of three different PETL families' chosen configurations (mean of probabilities) vs its best member,
   how differently they err (`ensemble_analysis.disagreement`), and its inference time in one routed pass vs its
   members run one after another: for these members (which adapt the backbone from its first block) and for three
   members that leave the early blocks untouched (LoRA on the last stages only; untrained, timing only), where the
   shared prefix saves the early blocks;
3. robustness: clean vs corrupted top-1 (the corruption suite of `mtpeft eval --shift`) for the probe, full
   fine-tuning, every PETL family and WiSE at its best alpha (chosen on the held-out training images, clean and
   corrupted averaged; WiSE toward the probe's head) for full fine-tuning and the best PETL configuration.

    python benchmarks/petl_study.py runs/petl_fmnist                 # writes runs/petl_fmnist/petl_study.{json,md}
    python benchmarks/petl_study.py runs/petl_fmnist --max-images 500 --severities 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import multitask_peft as mtp
from multitask_peft.ensemble_analysis import disagreement
from multitask_peft.robustness import _Spread, mean_corrupted
from multitask_peft.run_config import HOLDOUT
from multitask_peft.rundir import RunDirectory
from multitask_peft.tasks import evaluate_tasks
from multitask_peft.tasks.data import CORRUPTIONS

BASELINES = ("probe", "full")
GOAL_RATIO, GOAL_MARGIN = 0.05, 4.0


def top1(model: mtp.MultiTaskModel, tasks: list[str], dataset: Any) -> dict[str, float]:
    metrics = evaluate_tasks(model, tasks, dataset, batch_size=64, progress=False)
    return {t: float(metrics[t]["top1"]) for t in tasks}


def timing(model: mtp.MultiTaskModel, members: list[str], ensemble: str, images: torch.Tensor, repeats: int) -> dict:
    """Median seconds of the ensemble in one pass vs its members one `predict` call after another."""
    model.predict(images, [ensemble])  # warm-up
    one, apart = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(images, [ensemble])
        one.append(time.perf_counter() - start)
        start = time.perf_counter()
        for m in members:
            model.predict(images, [m])
        apart.append(time.perf_counter() - start)
    a, b = statistics.median(one), statistics.median(apart)
    return {"one_pass_s": a, "members_apart_s": b, "speedup": b / a}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--max-images", type=int, default=1000, help="test images for the robustness runs")
    p.add_argument("--severities", default="3", help="corruption severities (comma-separated)")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="WiSE alphas to choose from")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats (median)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = RunDirectory(args.sweep_dir)
    sweep = json.loads((args.sweep_dir / "sweep.json").read_text())["tasks"]
    model = run.load_model()
    chosen = {family: r["best"] for family, r in sweep.items()}  # the base tasks are the method families
    rows = {r["name"]: r for r in (c for family in sweep.values() for c in family["configs"])}
    spec = run.config.tasks[chosen["probe"]].data
    test = spec.dataset(spec.eval_split, train=False, backbone=model.data_config)
    held = spec.dataset(HOLDOUT, train=False, backbone=model.data_config)
    out: dict[str, Any] = {"sweep": str(args.sweep_dir), "test_images": len(test), "chosen": chosen}

    # 1. tuned methods on the test subset
    names = list(chosen.values())
    clean = top1(model, names, test)
    full_params = rows[chosen["full"]]["peft_params"]
    table = []
    for family, name in chosen.items():
        r = rows[name]
        table.append(
            {
                "family": family,
                "config": name,
                "settings": r["settings"],
                "holdout": r["holdout"],
                "top1": clean[name],
                "peft_params": r["peft_params"],
                "share_of_full": r["peft_params"] / full_params,
                "ppt": mtp.ppt(clean[name], r["peft_params"]),
            }
        )
    out["tuned"] = table
    petl = [t for t in table if t["family"] not in BASELINES]
    best = max(petl, key=lambda t: t["top1"])
    by = {t["family"]: t for t in table}
    out["goal"] = {
        "best_petl": best["config"],
        "vs_full_points": 100 * (best["top1"] - by["full"]["top1"]),
        "share_of_full": best["share_of_full"],
        "vs_probe_points": 100 * (best["top1"] - by["probe"]["top1"]),
    }

    # 2. ensemble of three different PETL families (their chosen configurations, best three by held-out metric)
    trio = [t["config"] for t in sorted(petl, key=lambda t: -t["holdout"])[:3]]
    model.add_ensemble("trio", trio, mode="mean_prob")
    out["ensemble"] = disagreement(model, "trio", test, progress=False)
    out["ensemble"].pop("metrics", None)
    images = torch.stack([test[i][0] for i in range(32)])
    out["ensemble_timing_early"] = timing(model, trio, "trio", images, args.repeats)
    late = []
    for k, r in enumerate((2, 4, 8)):  # LoRA on the last two stages only: the first blocks stay shared
        name = f"late{k}"
        model.add_task(
            name, mtp.tasks.Classification(num_classes=10), [mtp.peft.LoRA(r=r, targets=r"blocks\.[56]\..*conv_pw")]
        )
        late.append(name)
    model.add_ensemble("late", late)
    out["ensemble_timing_late"] = timing(model, late, "late", images, args.repeats)

    # 3. robustness: clean vs corrupted, WiSE at its best alpha (chosen on held-out images)
    severities = [int(s) for s in args.severities.split(",")]
    corruptions = CORRUPTIONS.names()
    alphas = [float(a) for a in args.alphas.split(",")]
    wise: dict[str, Any] = {}
    for source in ("full", best["family"]):
        variants = []
        for k, alpha in enumerate(alphas):
            variant = f"{source}-wise{k}"
            model.add_wise(variant, chosen[source], alpha, reference=chosen["probe"])
            variants.append(variant)
        small = _Spread(held, min(len(held), args.max_images))
        c, s = top1(model, variants, small), mean_corrupted(model, variants, small, corruptions, severities)
        pick = max(range(len(alphas)), key=lambda k: c[variants[k]] + s[variants[k]])
        wise[source] = {"alphas": alphas, "holdout_clean": [c[v] for v in variants],
                        "holdout_shifted": [s[v] for v in variants], "best_alpha": alphas[pick],
                        "task": variants[pick]}  # fmt: skip
    out["wise"] = wise
    subset = _Spread(test, min(len(test), args.max_images))
    rob_tasks = [*names, *(w["task"] for w in wise.values())]
    clean_sub = top1(model, rob_tasks, subset)
    shifted = mean_corrupted(model, rob_tasks, subset, corruptions, severities)
    labels = {chosen[f]: f for f in chosen} | {
        w["task"]: f"WiSE {src} (alpha {w['best_alpha']:g})" for src, w in wise.items()
    }
    out["robustness"] = {
        "images": len(subset),
        "corruptions": corruptions,
        "severities": severities,
        "rows": [
            {
                "what": labels[t],
                "task": t,
                "clean": clean_sub[t],
                "corrupted": shifted[t],
                "relative": shifted[t] / clean_sub[t] if clean_sub[t] else None,
            }  # fmt: skip
            for t in rob_tasks
        ],
    }
    (args.sweep_dir / "petl_study.json").write_text(json.dumps(out, indent=2) + "\n")
    text = markdown(out)
    (args.sweep_dir / "petl_study.md").write_text(text)
    print(text)


def markdown(out: dict[str, Any]) -> str:
    lines = [
        f"Test subset: {out['test_images']} images.",
        "",
        "| family | chosen | settings | held-out | test top-1 | PEFT params | % of full FT | PPT |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for t in out["tuned"]:
        settings = ", ".join(f"{k}={v}" for k, v in t["settings"].items())
        lines.append(
            f"| {t['family']} | {t['config']} | {settings} | {100 * t['holdout']:.2f} % | {100 * t['top1']:.2f} % | "
            f"{t['peft_params']:,} | {100 * t['share_of_full']:.2f} % | {t['ppt']:.3f} |"
        )
    g = out["goal"]
    lines += [
        "",
        f"Best PETL ({g['best_petl']}): {g['vs_full_points']:+.2f} points vs full fine-tuning with "
        f"{100 * g['share_of_full']:.2f} % of its parameters; {g['vs_probe_points']:+.2f} points over the probe.",
        "",
    ]
    e = out["ensemble"]
    acc = ", ".join(f"{m} {100 * v:.2f} %" for m, v in e["accuracy"].items())
    lines += [
        f"Ensemble of {', '.join(e['members'])} (mean of probabilities): {100 * e['ensemble_accuracy']:.2f} % vs "
        f"best member {e['best_member']} ({acc}): {100 * e['gain_over_best']:+.2f} points. Members disagree on "
        f"{100 * e['mean_pairwise_disagreement']:.2f} % of images (mean over pairs); different mistakes on "
        f"{100 * e['different_mistakes']:.2f} %; oracle {100 * e['oracle']:.2f} %.",
        "",
        "| ensemble inference, 32 images | one pass | members one after another | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for key, what in (
        ("ensemble_timing_early", "members adapt from block 0"),
        ("ensemble_timing_late", "members adapt the last stages only"),
    ):
        t = out[key]
        lines.append(
            f"| {what} | {1e3 * t['one_pass_s']:.0f} ms | {1e3 * t['members_apart_s']:.0f} ms | {t['speedup']:.2f}x |"
        )
    r = out["robustness"]
    lines += [
        "",
        f"Robustness ({r['images']} test images; {len(r['corruptions'])} corruptions at severity "
        f"{', '.join(map(str, r['severities']))}):",
        "",
        "| model | clean | corrupted | corrupted / clean |",
        "|---|---:|---:|---:|",
    ]
    for row in r["rows"]:
        rel = f"{row['relative']:.3f}" if row["relative"] is not None else "n/a"
        lines.append(f"| {row['what']} | {100 * row['clean']:.2f} % | {100 * row['corrupted']:.2f} % | {rel} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""The WiSE curve of a run: each task at weight-space coefficients alpha, in distribution and under corruptions.

```
RUN_DIR/
  wise.json          per task: the alphas, the metric clean and under shift at each, the best alpha of each
  wise.md            the table
  figures/wise.png   per task: the metric against alpha, clean and under shift
```

`mtpeft eval RUN --wise 0:1:0.1 [--wise-reference PROBE] [--corruptions ...] [--severities 3] [--max-images N]`
calls `evaluate_wise` then `write_wise`. Every (task, alpha) is a task of its own for the evaluation
(`MultiTaskModel.add_wise`, removed afterwards), so all alphas of the tasks that share an evaluation dataset run in
one pass per batch with the shared backbone prefix. "Under shift" is the mean over the corruption grid
(`multitask_peft.robustness`; default: every corruption at severity 3).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .report import FIGURES_DIR, _figure, _save, require_matplotlib
from .robustness import _eval_groups, _primary, _primary_metrics, _Spread, check_grid, mean_corrupted

if TYPE_CHECKING:
    from .model import MultiTaskModel
    from .run_config import RunConfig

JSON_FILE = "wise.json"
MARKDOWN_FILE = "wise.md"
FIGURE_FILE = f"{FIGURES_DIR}/wise.png"
DEFAULT_SEVERITIES = (3,)


def parse_alphas(text: str) -> list[float]:
    """ "start:stop:step" (stop included) or a comma list ("0,0.5,1") -> alphas in [0, 1], ascending, distinct."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            count = math.floor((stop - start) / step + 1e-9) + 1
            values = [round(start + k * step, 10) for k in range(count)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"--wise takes start:stop:step (e.g. 0:1:0.1) or a comma list of alphas (e.g. 0,0.5,1), got {text!r}"
        ) from None
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if not values or bad:
        raise ValueError(f"WiSE alphas must lie in [0, 1], got {text!r}")
    return sorted(set(values))


def evaluate_wise(
    model: MultiTaskModel,
    config: RunConfig,
    alphas: Sequence[float],
    tasks: Sequence[str] | None = None,
    reference: str | None = None,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = DEFAULT_SEVERITIES,
    max_images: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Each task's primary metric at every alpha, on its evaluation split clean and under corruptions.

    Args:
        model: The run's model (`RunDirectory.load_model()`); it is left with the tasks it had.
        config: The run's config (the tasks' evaluation data).
        alphas: Coefficients in [0, 1] (`parse_alphas`).
        tasks: Tasks to sweep (default: every task whose methods have a WiSE form and, given a `reference`, whose
            head is like the reference's).
        reference: A linear-probe task of the same label space that alpha = 0 becomes (None: a zero head).
        corruptions: Names in `CORRUPTIONS` for the shifted metric (None: all; [] skips the shifted metric).
        severities: Severities of the shifted metric.
        max_images: At most this many images per task, spread over its split.
        seed: Base seed of the per-image corruption seeds.
        batch_size: Images per `model.predict` call.
        progress: A tqdm bar over the evaluations.

    Returns:
        {"alphas", "reference", "corruptions", "severities", "max_images", "eval_time_s", "tasks": {task: {"metric",
        "num_images", "clean": [per alpha], "shifted": [per alpha] or None, "best_alpha_clean",
        "best_alpha_shifted"}}}.
    """
    values = [float(a) for a in alphas]
    if not values or any(not 0.0 <= a <= 1.0 for a in values):
        raise ValueError(f"WiSE alphas must be a non-empty list in [0, 1], got {list(alphas)!r}")
    names, levels = check_grid("wise", corruptions, severities, max_images, seed)
    if reference is not None:
        model.wise_task(reference, 1.0, reference)  # the reference itself must be a frozen-backbone task
    if tasks is None:  # every task with a WiSE form (and, given a reference, a head like its)
        tasks = [t for t in config.tasks if t != reference and _sweepable(model, t, reference)]
    else:
        for t in tasks:
            model.task(t)  # unknown: ValueError listing the tasks
    if not tasks:
        raise ValueError(f"no task to sweep alpha for: tasks {model.tasks} have no WiSE form or are the reference")
    for t in tasks:
        model.wise_task(t, 1.0, reference)  # every error (method, reference) before any evaluation
    groups = [(spec, [t for t in members if t in tasks]) for spec, members in _eval_groups(config)]
    groups = [(spec, members) for spec, members in groups if members]
    start = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    added: list[str] = []
    bar = tqdm(total=len(groups) * (1 + len(names) * len(levels)), desc="wise", unit="eval", disable=not progress)
    try:
        for spec, members in groups:
            variants: dict[str, list[str]] = {}
            for t in members:
                variants[t] = []
                for k, alpha in enumerate(values):
                    name = _free_name(model, f"{t}-wise{k:02d}")
                    model.add_wise(name, t, alpha, reference)
                    added.append(name)
                    variants[t].append(name)
            every = [v for vs in variants.values() for v in vs]
            dataset = spec.dataset(spec.eval_split, train=False, backbone=model.data_config)
            if max_images is not None and max_images < len(dataset):
                dataset = _Spread(dataset, max_images)
            clean = _primary_metrics(model, every, dataset, batch_size)
            bar.update()
            shifted = mean_corrupted(model, every, dataset, names, levels, seed, batch_size, on_cell=bar.update)
            for t, vs in variants.items():
                clean_t = [clean[v] for v in vs]
                shifted_t = [shifted[v] for v in vs] if names else None
                rows[t] = {
                    "metric": _primary(model, t),
                    "num_images": len(dataset),
                    "clean": clean_t,
                    "shifted": shifted_t,
                    "best_alpha_clean": values[max(range(len(vs)), key=lambda k: clean_t[k])],
                    "best_alpha_shifted": None
                    if shifted_t is None
                    else values[max(range(len(vs)), key=lambda k: shifted_t[k])],
                }
    finally:
        bar.close()
        for name in added:
            model.remove_task(name)
    return {
        "backbone": config.backbone.name,
        "alphas": values,
        "reference": reference,
        "corruptions": names,
        "severities": levels,
        "max_images": max_images,
        "seed": seed,
        "eval_time_s": round(time.perf_counter() - start, 1),
        "tasks": {t: rows[t] for t in tasks if t in rows},
    }


def _sweepable(model: MultiTaskModel, task: str, reference: str | None) -> bool:
    try:
        model.wise_task(task, 1.0, reference)
    except ValueError:
        return False
    return True


def _free_name(model: MultiTaskModel, name: str) -> str:
    k = 0
    candidate = name
    while candidate in model.tasks:
        k += 1
        candidate = f"{name}-{k}"
    return candidate


def format_wise(report: dict[str, Any], figure: str | None = None) -> str:
    """wise.md: what was run, then per task its metric at every alpha, clean and under shift."""
    ref = report["reference"] or "a zero head"
    shift = (
        f"mean over {len(report['corruptions'])} corruptions at severity {', '.join(map(str, report['severities']))}"
        if report["corruptions"]
        else "not measured"
    )
    lines = [
        f"# WiSE curve: {report['backbone']}",
        "",
        f"alpha = 1: the task; alpha = 0: the frozen backbone with the head of {ref}. Under shift: {shift}.",
    ]
    if figure is not None:
        lines += ["", f"![metric against alpha]({figure})"]
    for task, row in report["tasks"].items():
        best = f"best alpha: {row['best_alpha_clean']:g} clean"
        if row["shifted"] is not None:
            best += f", {row['best_alpha_shifted']:g} under shift"
        lines += [
            "",
            f"## {task}: {row['metric']} on {row['num_images']} images ({best})",
            "",
            "| alpha | clean | under shift |",
            "|---|---|---|",
        ]
        for k, alpha in enumerate(report["alphas"]):
            shifted = "" if row["shifted"] is None else f"{100 * row['shifted'][k]:.2f} %"
            lines.append(f"| {alpha:g} | {100 * row['clean'][k]:.2f} % | {shifted} |")
    return "\n".join(lines) + "\n"


def plot_wise(report: dict[str, Any], path: Path) -> None:
    """One panel per task: the metric against alpha, clean (solid) and under shift (dashed), best alphas marked."""
    tasks = list(report["tasks"].items())
    cols = min(3, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig = _figure(4.4 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    alphas = report["alphas"]
    for ax, (name, row) in zip(axes, tasks):
        ax.plot(alphas, [100 * v for v in row["clean"]], marker=".", label="clean")
        ax.axvline(row["best_alpha_clean"], color="C0", alpha=0.3)
        if row["shifted"] is not None:
            ax.plot(alphas, [100 * v for v in row["shifted"]], marker=".", linestyle="--", label="under shift")
            ax.axvline(row["best_alpha_shifted"], color="C1", alpha=0.3, linestyle="--")
        ax.set(title=name, xlabel="alpha (0: reference, 1: task)", ylabel=f"{row['metric']} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    fig.suptitle(f"WiSE ({report['backbone']})")
    _save(fig, path)


def write_wise(report: dict[str, Any], out: str | os.PathLike) -> list[Path]:
    """wise.json, wise.md and figures/wise.png in the run directory `out` (the figure needs matplotlib)."""
    out = Path(out)
    (out / JSON_FILE).write_text(json.dumps(report, indent=2) + "\n")
    written, figure = [out / JSON_FILE, out / MARKDOWN_FILE], None
    try:
        require_matplotlib()
    except ImportError as e:
        warnings.warn(f"{e}; {MARKDOWN_FILE} is written without its figure", stacklevel=2)
    else:
        (out / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
        plot_wise(report, out / FIGURE_FILE)
        figure = FIGURE_FILE
        written.append(out / FIGURE_FILE)
    (out / MARKDOWN_FILE).write_text(format_wise(report, figure))
    return written

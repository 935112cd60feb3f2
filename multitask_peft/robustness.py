"""Robustness under distribution shift: a run's tasks evaluated clean and under a corruption suite (ImageNet-C style).

```
RUN_DIR/
  robustness.json          per task: metric, clean, every (corruption, severity), mean corrupted, relative robustness
  robustness.md            the summary table, then a corruption x severity table per task
  figures/robustness.png   per task: the metric against severity, one line per corruption (severity 0 = clean)
```

`mtpeft eval RUN --shift corruptions` calls `evaluate_robustness` then `write_robustness`. The corruptions are
`multitask_peft.tasks.data.CORRUPTIONS` (parameters in `tasks/data/corruptions.py`), applied to each task's
evaluation split through `Corrupted` (un-normalise, corrupt under a per-image seed, normalise; boxes and masks
move with the pixels where a corruption moves them). Tasks that share an evaluation dataset are evaluated in one
pass per batch (`tasks.evaluate_tasks`). Relative robustness is mean corrupted metric / clean metric.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Subset
from tqdm.auto import tqdm

from .config import check_positive_int
from .report import FIGURES_DIR, _figure, _save, require_matplotlib
from .tasks.data import CORRUPTIONS, SEVERITIES, Corrupted, check_corruption_names, check_severities

if TYPE_CHECKING:
    from .model import MultiTaskModel
    from .run_config import DataSpec, RunConfig

SHIFTS = ("corruptions",)
JSON_FILE = "robustness.json"
MARKDOWN_FILE = "robustness.md"
FIGURE_FILE = f"{FIGURES_DIR}/robustness.png"


class _Spread(Subset):
    """`count` items spread evenly over a dataset (evaluation splits are often sorted by class), keeping the
    dataset's `collate`, `class_names`, `mean` / `std`."""

    def __init__(self, dataset: Any, count: int) -> None:
        n = len(dataset)
        indices = [round(i * (n - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]
        super().__init__(dataset, indices)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _eval_groups(config: RunConfig) -> list[tuple[DataSpec, list[str]]]:
    """The run's tasks grouped by evaluation dataset (same source, root, task, size, split and class names), so
    that each group is one pass per batch."""
    groups: dict[tuple, tuple[DataSpec, list[str]]] = {}
    for name, task in config.tasks.items():
        spec = task.data
        names = tuple(spec.class_names) if spec.class_names is not None else None
        key = (spec.source, spec.root, spec.task, spec.image_size, spec.eval_split, names)
        groups.setdefault(key, (spec, []))[1].append(name)
    return list(groups.values())


def evaluate_robustness(
    model: MultiTaskModel,
    config: RunConfig,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    max_images: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every task of a run on its evaluation split, clean and under every (corruption, severity).

    Args:
        model: The run's model with its tasks (`RunDirectory.load_model()`).
        config: The run's config (where each task's evaluation data is).
        corruptions: Names in `CORRUPTIONS` (None: all).
        severities: Severities in 1..5.
        max_images: At most this many images per task, spread evenly over its split (None: all).
        seed: Base seed of the per-image corruption seeds (`Corrupted`).
        batch_size: Images per `model.predict` call.
        progress: Show a tqdm bar over the (dataset, corruption, severity) grid.

    Returns:
        {"shift", "backbone", "corruptions", "severities", "seed", "max_images", "eval_time_s", "tasks": {task:
        {"head", "metric", "num_images", "clean", "mean_corrupted", "relative_robustness" (None when clean is 0),
        "per_corruption": {corruption: mean over severities}, "corrupted": {corruption: {"severity": value}}}}}.
        Values are the task's primary metric (as in report.json), fractions in [0, 1].
    """
    names, levels = check_grid("robustness", corruptions, severities, max_images, seed)
    mean, std = model.data_config.mean, model.data_config.std
    groups = _eval_groups(config)
    start = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(groups) * (1 + len(names) * len(levels)), desc="robustness", unit="eval", disable=not progress)
    for spec, tasks in groups:
        dataset = spec.dataset(spec.eval_split, train=False, backbone=model.data_config)
        if max_images is not None and max_images < len(dataset):
            dataset = _Spread(dataset, max_images)
        label = tasks[0] if len(tasks) == 1 else f"{len(tasks)} tasks"
        bar.set_postfix_str(f"{label}: clean", refresh=False)
        clean = _primary_metrics(model, tasks, dataset, batch_size)
        bar.update()
        corrupted: dict[str, dict[str, dict[str, float]]] = {t: {} for t in tasks}
        for corruption in names:
            for severity in levels:
                bar.set_postfix_str(f"{label}: {corruption} {severity}", refresh=False)
                shifted = Corrupted(dataset, corruption, severity, mean, std, seed)
                for t, value in _primary_metrics(model, tasks, shifted, batch_size).items():
                    corrupted[t].setdefault(corruption, {})[str(severity)] = value
                bar.update()
        for t in tasks:
            head = model.task(t).head_config
            rows[t] = _row(head.head_type, _primary(model, t), len(dataset), clean[t], corrupted[t])
    bar.close()
    tasks_in_order = {t: rows[t] for t in config.tasks}
    return {
        "shift": "corruptions",
        "backbone": config.backbone.name,
        "corruptions": names,
        "severities": levels,
        "seed": seed,
        "max_images": max_images,
        "eval_time_s": round(time.perf_counter() - start, 1),
        "tasks": tasks_in_order,
    }


def check_grid(
    owner: str, corruptions: Sequence[str] | None, severities: Sequence[int], max_images: int | None, seed: int
) -> tuple[list[str], list[int]]:
    """The corruption grid's options checked: (corruption names, None = all, [] = none; severities)."""
    names = (
        [] if corruptions == [] else check_corruption_names(CORRUPTIONS.names() if corruptions is None else corruptions)
    )
    levels = check_severities(severities)
    if max_images is not None:
        check_positive_int(owner, "max_images", max_images)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{owner}: `seed` should be an int but the value passed is {seed!r}")
    return names, levels


def mean_corrupted(
    model: MultiTaskModel,
    tasks: list[str],
    dataset: Any,
    corruptions: Sequence[str],
    severities: Sequence[int],
    seed: int = 0,
    batch_size: int = 32,
    on_cell: Any = None,
) -> dict[str, float]:
    """{task: its primary metric averaged over the (corruption, severity) grid}, one pass per grid cell for all
    `tasks`; `on_cell()` after each cell (a progress bar)."""
    mean, std = model.data_config.mean, model.data_config.std
    total = dict.fromkeys(tasks, 0.0)
    for corruption in corruptions:
        for severity in severities:
            shifted = Corrupted(dataset, corruption, severity, mean, std, seed)
            for t, value in _primary_metrics(model, tasks, shifted, batch_size).items():
                total[t] += value / (len(corruptions) * len(severities))
            if on_cell is not None:
                on_cell()
    return total


def _primary(model: MultiTaskModel, task: str) -> str:
    from .outputs import output_kind

    return output_kind(model.task(task).head_config).primary_metric


def _primary_metrics(model: MultiTaskModel, tasks: list[str], dataset: Any, batch_size: int) -> dict[str, float]:
    """{task: its primary metric on `dataset`}, clipped at 0 as `run.evaluate_run` reports it (detection mAP is -1
    without ground truth); one `evaluate_tasks` pass for all of `tasks`."""
    from .tasks import evaluate_tasks

    metrics = evaluate_tasks(model, tasks, dataset, batch_size, progress=False)
    return {t: max(0.0, float(metrics[t][_primary(model, t)])) for t in tasks}


def _row(head: str, metric: str, num_images: int, clean: float, corrupted: dict[str, dict[str, float]]) -> dict:
    values = [v for by_severity in corrupted.values() for v in by_severity.values()]
    mean_corrupted = sum(values) / len(values)
    return {
        "head": head,
        "metric": metric,
        "num_images": num_images,
        "clean": clean,
        "mean_corrupted": mean_corrupted,
        "relative_robustness": mean_corrupted / clean if clean > 0 else None,
        "per_corruption": {c: sum(v.values()) / len(v) for c, v in corrupted.items()},
        "corrupted": corrupted,
    }


# --- robustness.md and the figure -------------------------------------------------------------------------------------
def _percent(value: float) -> str:
    return f"{100 * value:.2f} %"


def format_summary(report: dict[str, Any]) -> str:
    """What was run, then per task: head, metric, images, clean, mean corrupted, relative robustness (markdown)."""
    limit = "all" if report["max_images"] is None else f"at most {report['max_images']}"
    lines = [
        f"# Robustness under corruptions: {report['backbone']}",
        "",
        f"{len(report['corruptions'])} corruptions ({', '.join(report['corruptions'])}) at severities "
        f"{', '.join(map(str, report['severities']))}; seed {report['seed']}; images per task: {limit}. Relative "
        "robustness = mean corrupted metric / clean metric.",
        "",
        "| task | head | metric | images | clean | mean corrupted | relative robustness |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["tasks"].items():
        relative = "n/a (clean is 0)" if row["relative_robustness"] is None else f"{row['relative_robustness']:.3f}"
        lines.append(
            f"| {name} | {row['head']} | {row['metric']} | {row['num_images']} | {_percent(row['clean'])} | "
            f"{_percent(row['mean_corrupted'])} | {relative} |"
        )
    return "\n".join(lines)


def format_robustness(report: dict[str, Any], figure: str | None = None) -> str:
    """robustness.md: `format_summary`, the figure (a path relative to the run, when given), then a corruption x
    severity table per task."""
    levels = report["severities"]
    lines = [format_summary(report)]
    if figure is not None:
        lines += ["", f"![robustness: metric against severity per corruption]({figure})"]
    for name, row in report["tasks"].items():
        lines += [
            "",
            f"## {name}: {row['metric']} (clean {_percent(row['clean'])})",
            "",
            "| corruption | " + " | ".join(f"severity {s}" for s in levels) + " | mean |",
            "|---" * (len(levels) + 2) + "|",
        ]
        for corruption, by_severity in row["corrupted"].items():
            cells = [_percent(by_severity[str(s)]) for s in levels]
            lines.append(
                f"| {corruption} | " + " | ".join(cells) + f" | {_percent(row['per_corruption'][corruption])} |"
            )
    return "\n".join(lines) + "\n"


def plot_robustness(report: dict[str, Any], path: Path) -> None:
    """One panel per task: its metric against severity, one line per corruption, starting from the clean metric at
    severity 0; the mean corrupted metric as a dashed line."""
    from matplotlib import colormaps

    tasks = list(report["tasks"].items())
    cols = min(3, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig = _figure(4.4 * cols + 2.2, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    colors = colormaps["tab10"]
    styles = ("-", "--", ":")
    levels = [0, *report["severities"]]
    for ax, (name, row) in zip(axes, tasks):
        for k, (corruption, by_severity) in enumerate(row["corrupted"].items()):
            values = [row["clean"], *(by_severity[str(s)] for s in report["severities"])]
            style = styles[(k // 10) % len(styles)]
            ax.plot(levels, values, marker=".", color=colors(k % 10), linestyle=style, label=corruption)
        ax.axhline(row["mean_corrupted"], color="black", linestyle="--", linewidth=1, label="mean corrupted")
        ax.set(title=f"{name}: {row['metric']}", xlabel="severity (0 = clean)", ylabel=row["metric"])
        ax.set_xticks(levels)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    fig.suptitle(f"robustness under corruptions ({report['backbone']})")
    _save(fig, path)


def write_robustness(report: dict[str, Any], out: str | os.PathLike) -> list[Path]:
    """Write robustness.json, robustness.md and figures/robustness.png into the run directory `out`; returns the
    paths written. Without matplotlib (the `report` extra) the figure is left out with a warning naming the extra.
    """
    out = Path(out)
    written = [out / JSON_FILE]
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    figure = None
    try:
        require_matplotlib()
    except ImportError as e:
        warnings.warn(f"{e}; {MARKDOWN_FILE} is written without its figure", stacklevel=2)
    else:
        (out / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
        plot_robustness(report, out / FIGURE_FILE)
        figure = FIGURE_FILE
        written.append(out / FIGURE_FILE)
    (out / MARKDOWN_FILE).write_text(format_robustness(report, figure))
    written.insert(1, out / MARKDOWN_FILE)
    return written

"""A run's report with figures: training curves, prediction galleries and confusion matrices, beside report.md.

```
RUN_DIR/
  report.md            the metrics table, then each task's figures (relative links into figures/)
  report.html          the same, self-contained (figures inlined as base64 PNG data URIs): open it in a browser
  figures/<task>_curves.png      loss and learning rate per logged step (+ the eval metric, when evaluated twice)
  figures/<task>_gallery.png     a few validation images: ground truth beside the prediction
  figures/<task>_confusion.png   classification tasks: counts and rows normalised per true class
```

`run.write_report` calls `write_report_files` after training and from `mtpeft eval RUN`, so the figures always
show the weights the metrics were measured on. Plots are drawn with matplotlib (the `report` extra); without it
the report is written without figures and a warning names the extra. Boxes, masks and class colours are drawn by
`multitask_peft.visualize`, as `mtpeft predict` draws them.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import importlib.util
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .visualize import class_color, class_text, draw_detections, draw_mask, painted_classes

if TYPE_CHECKING:
    from .model import MultiTaskModel
    from .run_config import RunConfig

FIGURES_DIR = "figures"
MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"
#: Validation images per gallery: classification crops are small, so more of them fit in one row.
GALLERY_SIZE = {"classification": 6, "detection": 4, "segmentation": 4}
#: Predicted boxes below this score are left out of the gallery (the metric still counts them).
BOX_SCORE_THRESHOLD = 0.4
MAX_BOXES = 10
#: The figures drawn per task, `figures/<task>_<kind>.png`.
TASK_FIGURES = ("curves", "gallery", "confusion")
#: Gallery images are upscaled (nearest) to this side, so that box labels and small garments stay readable.
DISPLAY_SIDE = 256
MATPLOTLIB_MISSING = (
    "report figures need matplotlib, which the `report` extra installs: pip install 'multitask-peft[report]' "
    "(from a checkout: pip install -e '.[report]'; the `demo` and `dev` extras include it)"
)


@dataclasses.dataclass(frozen=True)
class FigureFile:
    """One written figure: its title and its path relative to the run directory (what report.md links)."""

    title: str
    path: str


# --- drawing helpers (torchvision.utils) ------------------------------------------------------------------------------
def to_uint8(
    image: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """A normalised float (3, H, W) model input back to the uint8 (3, H, W) image it came from."""
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return (image.detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)


def upscale(image: torch.Tensor, side: int = DISPLAY_SIDE) -> tuple[torch.Tensor, float]:
    """uint8 (3, H, W) -> (3, H * s, W * s) with s = side / max(H, W) (nearest), and s (to scale boxes too)."""
    scale = side / max(image.shape[-2:])
    size = [round(image.shape[-2] * scale), round(image.shape[-1] * scale)]
    return torch.nn.functional.interpolate(image[None].float(), size=size, mode="nearest")[0].to(torch.uint8), scale


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith('x') else 's'}"


# --- figures ----------------------------------------------------------------------------------------------------------
def require_matplotlib() -> None:
    """Raise ImportError naming the extra to install when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(MATPLOTLIB_MISSING)


def _figure(width: float, height: float) -> Any:
    # The object API with the Agg canvas, not pyplot: no global figure state, no GUI backend, safe in a server.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, format="png")


def read_curves(log: Sequence[Mapping[str, Any]], task: str) -> dict[str, Any]:
    """A task's curves from log.jsonl records: {"loss": [(step, value)], "lr": {group: [(step, value)]},
    "eval": {metric: [(step, value)]}}.

    Learning rates are per optimizer group: the task's own "<task>/<group>" groups (shown without the prefix), and
    groups without a task prefix (logs of older runs, shared by the tasks). Evaluations are records with an `eval`
    key, {"step": s, "eval": {task: {metric: value}}}.
    """
    loss: list[tuple[int, float]] = []
    lr: dict[str, list[tuple[int, float]]] = {}
    evals: dict[str, list[tuple[int, float]]] = {}
    for record in log:
        step = int(record.get("step", 0))
        if task in record.get("loss", {}):
            loss.append((step, float(record["loss"][task])))
            for group, value in record.get("lr", {}).items():
                owner, sep, short = group.rpartition("/")
                if not sep or owner == task:
                    lr.setdefault(short, []).append((step, float(value)))
        for metric, value in record.get("eval", {}).get(task, {}).items():
            if isinstance(value, (int, float)):
                evals.setdefault(metric, []).append((step, float(value)))
    return {"loss": loss, "lr": lr, "eval": evals}


def plot_curves(curves: Mapping[str, Any], task: str, metric: str, path: Path) -> bool:
    """Loss and learning rate against the step (+ `metric` when the log holds two or more evaluations of it).
    Returns False (nothing written) when the log has no loss of the task."""
    if not curves["loss"]:
        return False
    evals = curves["eval"].get(metric, [])
    panels = 3 if len(evals) >= 2 else 2
    fig = _figure(4.2 * panels, 3.2)
    axes = fig.subplots(1, panels)
    steps, values = zip(*curves["loss"])
    axes[0].plot(steps, values, marker="." if len(steps) < 30 else None, color="tab:blue")
    axes[0].set(title=f"{task}: training loss", xlabel="step", ylabel="loss")
    # groups with the same schedule (decay / no-decay) draw as one line
    same: dict[tuple, list[str]] = {}
    for group, points in curves["lr"].items():
        same.setdefault(tuple(points), []).append(group)
    for points, groups in same.items():
        steps, values = zip(*points)
        axes[1].plot(steps, values, label=", ".join(groups))
    axes[1].set(title="learning rate (shared by the tasks)", xlabel="step", ylabel="lr")
    axes[1].yaxis.set_major_formatter("{x:.1e}")  # no offset text under the title
    if len(same) > 1:  # one line needs no legend (every group on one schedule)
        axes[1].legend(fontsize="small")
    if panels == 3:
        steps, values = zip(*evals)
        axes[2].plot(steps, values, marker="o", color="tab:green")
        axes[2].set(title=f"eval {metric}", xlabel="step", ylabel=metric)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps
    _save(fig, path)
    return True


def _eval_samples(dataset: Any, count: int) -> list[int]:
    """Indices spread evenly over the dataset (eval splits are often sorted by class)."""
    n = len(dataset)
    if n <= count:
        return list(range(n))
    return [round(i * (n - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]


def _denormalizer(dataset: Any, model: MultiTaskModel) -> tuple[Any, Any]:
    mean = getattr(dataset, "mean", None)
    std = getattr(dataset, "std", None)
    if mean is None or std is None:
        mean, std = model.data_config.mean, model.data_config.std
    return mean, std


def plot_gallery(
    model: MultiTaskModel,
    task: str,
    kind: str,
    dataset: Any,
    class_names: Sequence[str] | None,
    path: Path,
    ignore_index: int = 255,
) -> bool:
    """Ground truth beside the prediction on a few validation images of the task (classification: the label
    against the truth; detection: boxes; segmentation: masks). Returns False for an output kind it cannot draw."""
    if kind not in GALLERY_SIZE or len(dataset) == 0:
        return False
    items = [dataset[i] for i in _eval_samples(dataset, GALLERY_SIZE[kind])]
    images = torch.stack([torch.as_tensor(image) for image, _ in items])  # (N, 3, H, W)
    device = next(model.parameters()).device
    results = model.predict(images.to(device), [task])[task]
    mean, std = _denormalizer(dataset, model)
    shown = [upscale(to_uint8(image, mean, std)) for image in images]
    n = len(items)
    if kind == "classification":
        fig = _figure(2.2 * n, 2.7)
        axes = fig.subplots(1, n, squeeze=False)[0]
        for ax, (image, _), (_, target), result in zip(axes, shown, items, results):
            truth, pred = int(target), int(result["label"])
            ax.imshow(image.permute(1, 2, 0).numpy())
            title = f"truth: {class_text(truth, class_names)}\npred: {class_text(pred, class_names)} "
            ax.set_title(title + f"({result['score']:.2f})", fontsize=9, color="green" if truth == pred else "red")
        fig.suptitle(f"{task}: predictions on validation images (green: right, red: wrong)", fontsize=10)
    else:
        fig = _figure(2.6 * n, 5.6 if kind == "detection" else 6.0)
        axes = fig.subplots(2, n, squeeze=False)
        present: set[int] = set()
        for col, ((image, scale), (_, target), result) in enumerate(zip(shown, items, results)):
            if kind == "detection":
                truth = draw_detections(
                    image, torch.as_tensor(target["boxes"]) * scale, None, target["labels"], class_names
                )
                keep = result["scores"] >= BOX_SCORE_THRESHOLD
                boxes, labels, scores = (result[k][keep][:MAX_BOXES].cpu() for k in ("boxes", "labels", "scores"))
                pred = draw_detections(image, boxes * scale, scores, labels, class_names)
                notes = (
                    _plural(len(target["labels"]), "box"),
                    f"{_plural(len(labels), 'box')} scoring >= {BOX_SCORE_THRESHOLD}",
                )
            else:
                skip = [ignore_index] + [k for k, name in enumerate(class_names or ()) if name == "background"]
                size = image.shape[-2:]
                masks = [torch.as_tensor(m).long().cpu() for m in (target, result["mask"])]
                masks = [torch.nn.functional.interpolate(m[None, None].float(), size=size)[0, 0].long() for m in masks]
                truth, pred = (draw_mask(image, m, class_names, alpha=0.5, skip=skip) for m in masks)
                present |= {k for m in masks for k in painted_classes(m, class_names, skip)}
                notes = ("ground truth", "prediction")
            for row, (drawn, note) in enumerate(zip((truth, pred), notes)):
                axes[row, col].imshow(drawn.permute(1, 2, 0).numpy())
                axes[row, col].set_title(note, fontsize=9)
        axes[0, 0].set_ylabel("ground truth")
        axes[1, 0].set_ylabel("prediction")
        if present:
            from matplotlib.patches import Patch

            colors = {k: [c / 255 for c in class_color(k)] for k in sorted(present)}
            handles = [Patch(color=color, label=class_text(k, class_names)) for k, color in colors.items()]
            fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)), fontsize="small")
        fig.suptitle(f"{task}: ground truth (top) and prediction (bottom) on validation images", fontsize=10)
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path)
    return True


class ConfusionCounter:
    """Counts (true class, predicted class) pairs batch by batch: an `evaluate(..., on_batch=)` hook, so that the
    confusion matrix comes from the same pass as the metrics (no second pass over the eval split).

    Args:
        num_classes: Classes of the head; `counts[true, predicted]` is (num_classes, num_classes) int64.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    @classmethod
    def for_head(cls, head_config: Any) -> ConfusionCounter | None:
        """A counter for a classification head, None for other output kinds."""
        if getattr(head_config, "output_kind", None) != "classification":
            return None
        return cls(head_config.num_classes)

    def __call__(self, results: Sequence[Mapping[str, Any]], targets: Any) -> None:
        preds = torch.tensor([int(r["label"]) for r in results], dtype=torch.int64)
        truth = torch.as_tensor(targets, dtype=torch.int64).reshape(-1).cpu()
        self.counts.view(-1).index_add_(0, truth * self.num_classes + preds, torch.ones_like(truth))


def plot_confusion(counts: torch.Tensor, task: str, class_names: Sequence[str] | None, path: Path) -> None:
    """Counts, and rows normalised per true class (each row sums to 1: the recall of every class on the diagonal)."""
    c = counts.shape[0]
    names = [class_text(k, class_names) for k in range(c)]
    rows = counts.sum(1, keepdim=True)
    normalised = counts.double() / rows.clamp(min=1)
    side = max(4.0, 0.45 * c + 2.0)
    fig = _figure(2 * side + 1.0, side)
    axes = fig.subplots(1, 2)
    for ax, matrix, title, fmt in (
        (axes[0], counts.double(), "counts", "{:.0f}"),
        (axes[1], normalised, "normalised per true class", "{:.2f}"),
    ):
        top = float(matrix.max()) or 1.0
        im = ax.imshow(matrix.numpy(), cmap="Blues", vmin=0, vmax=top)
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_xticks(range(c), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(c), names, fontsize=8)
        ax.set(xlabel="predicted", ylabel="true", title=f"{task}: {title}")
        if c <= 20:
            for i in range(c):
                for j in range(c):
                    value = float(matrix[i, j])
                    if value:
                        color = "white" if value > top / 2 else "black"
                        ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=7, color=color)
    accuracy = float(counts.diag().sum()) / max(1, int(counts.sum()))
    fig.suptitle(f"{task}: confusion matrix on {int(counts.sum())} validation images (accuracy {accuracy:.4f})")
    _save(fig, path)


def write_figures(
    model: MultiTaskModel, config: RunConfig, report: Mapping[str, Any], out: str | os.PathLike
) -> dict[str, list[FigureFile]]:
    """Draw every task's figures into `out/figures/`; returns {task: [figures]} in report order. Confusion
    matrices are drawn from the report's counts (`confusion` of a classification task, see `ConfusionCounter`).

    Task figures (`<task>_curves.png`, `_gallery.png`, `_confusion.png`) in `figures/` that this call did not write
    (a task since removed) are deleted, so the folder matches the report; other figures (`robustness.png` of
    `mtpeft eval --shift`) are kept.

    Raises:
        ImportError: matplotlib is missing (the message names the extra).
    """
    require_matplotlib()
    from .outputs import output_kind
    from .training.logs import read_log

    out = Path(out)
    folder = out / FIGURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    log = read_log(out) if (out / "log.jsonl").is_file() else []
    figures: dict[str, list[FigureFile]] = {}
    for name, task in config.tasks.items():
        head = model.task(name).head_config
        curves, gallery, confusion = (
            FigureFile(title, f"{FIGURES_DIR}/{name}_{suffix}.png")
            for suffix, title in (
                ("curves", "training curves"),
                ("gallery", "predictions on validation images"),
                ("confusion", "confusion matrix"),
            )
        )
        files = figures[name] = []
        if plot_curves(read_curves(log, name), name, output_kind(head).primary_metric, out / curves.path):
            files.append(curves)
        class_names = None
        if head.output_kind in GALLERY_SIZE:
            dataset = task.data.dataset(task.data.eval_split, train=False, backbone=model.data_config)
            class_names = getattr(dataset, "class_names", None)
            ignore_index = getattr(head, "ignore_index", 255)
            if plot_gallery(model, name, head.output_kind, dataset, class_names, out / gallery.path, ignore_index):
                files.append(gallery)
        counts = report["tasks"].get(name, {}).get("confusion")
        if counts is not None:  # counted by `evaluate_run` in its pass over the eval split
            plot_confusion(torch.tensor(counts), name, class_names, out / confusion.path)
            files.append(confusion)
    written = {out / f.path for files in figures.values() for f in files}
    for stale in folder.glob("*.png"):
        if stale not in written and stale.stem.rpartition("_")[2] in TASK_FIGURES:
            stale.unlink()
    return figures


# --- report.md and report.html ----------------------------------------------------------------------------------------
def _format_metrics(metrics: Mapping[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
        elif isinstance(value, (int, str)):
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def format_analysis(analysis: Mapping[str, Any]) -> str:
    """One line on how differently an ensemble's members err (`ensemble_analysis.disagreement`)."""
    members = ", ".join(f"{t} {v:.4f}" for t, v in analysis["accuracy"].items())
    return (
        f"top-1 of the members: {members}; ensemble {analysis['ensemble_accuracy']:.4f} "
        f"({analysis['gain_over_best']:+.4f} over {analysis['best_member']}); oracle (any member right) "
        f"{analysis['oracle']:.4f}; different mistakes (some members wrong, not all) "
        f"{analysis['different_mistakes']:.4f}; mean pairwise disagreement {analysis['mean_pairwise_disagreement']:.4f}"
    )


def format_markdown(report: Mapping[str, Any], table: str, figures: Mapping[str, Sequence[FigureFile]]) -> str:
    """report.md: the metrics table (`run.format_report`), then each task's metrics and figures (an ensemble's: how
    differently its members err)."""
    lines = [table]
    for name, row in report["tasks"].items():
        lines += ["", f"## {name}", "", f"{row['head']}, {'+'.join(row['methods'])}: {_format_metrics(row['metrics'])}"]
        if "analysis" in row:
            lines += ["", format_analysis(row["analysis"])]
        for figure in figures.get(name, ()):
            lines += ["", f"![{name}: {figure.title}]({figure.path})"]
    return "\n".join(lines)


def _table_html(table: str) -> str:
    """The markdown of `run.format_report` (paragraph lines, then one pipe table) as HTML."""
    parts, rows = [], []
    for line in table.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                rows.append(cells)
        elif line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
    if rows:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return "\n".join(parts)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1em 0; }
img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


def format_html(
    report: Mapping[str, Any], table: str, figures: Mapping[str, Sequence[FigureFile]], out: str | os.PathLike
) -> str:
    """report.html: what report.md shows, in one file (figures read from `out` and inlined as data URIs)."""
    title = f"multitask-peft run report: {report['backbone']}"
    body = [f"<h1>{html.escape(title)}</h1>", _table_html(table)]
    for name, row in report["tasks"].items():
        body.append(f'<h2 id="{html.escape(name)}">{html.escape(name)}</h2>')
        summary = f"{row['head']}, {'+'.join(row['methods'])}: {_format_metrics(row['metrics'])}"
        body.append(f"<p>{html.escape(summary)}</p>")
        if "analysis" in row:
            body.append(f"<p>{html.escape(format_analysis(row['analysis']))}</p>")
        for figure in figures.get(name, ()):
            data = base64.b64encode((Path(out) / figure.path).read_bytes()).decode("ascii")
            alt = html.escape(f"{name}: {figure.title}")
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'
            )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def write_report_files(
    report: Mapping[str, Any],
    table: str,
    out: str | os.PathLike,
    model: MultiTaskModel | None = None,
    config: RunConfig | None = None,
) -> dict[str, list[FigureFile]]:
    """Write report.md and report.html into `out`, with the figures (`write_figures`) when `model` and `config`
    are given; returns the figures written.

    A missing matplotlib is a warning that names the extra, not an error: the run (minutes of training) still
    ends with its metrics written.
    """
    out = Path(out)
    figures: dict[str, list[FigureFile]] = {}
    if model is not None and config is not None:
        try:
            require_matplotlib()
        except ImportError as e:
            warnings.warn(f"{e}; report.md and report.html are written without figures", stacklevel=2)
        else:
            figures = write_figures(model, config, report, out)
    (out / MARKDOWN_FILE).write_text(format_markdown(report, table, figures) + "\n")
    (out / HTML_FILE).write_text(format_html(report, table, figures, out))
    return figures


def read_report(out: str | os.PathLike) -> dict[str, Any] | None:
    """The run's report.json, or None when there is none yet."""
    path = Path(out) / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None

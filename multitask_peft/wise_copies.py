"""WiSE copies of tasks: a task's change of the backbone scaled by alpha, its head moved toward a reference.

`wise_copy` builds one (what `MultiTaskModel.wise_task` returns); `WiseCopies` keeps the few that per-call alphas
(`predict(..., alpha=)`, a served request's `alpha`) use, attached under hidden slots: not in `model.tasks`, not in
the model's parameters or state dict, rebuilt when the weights they came from change and dropped with their task.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import nn

from .routing import PLAIN_SLOT

if TYPE_CHECKING:
    from .model import MultiTaskModel, Task


def check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"WiSE alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def wise_copy(model: MultiTaskModel, name: str, alpha: float, reference: str | None = None) -> Task:
    """Task `name` of `model` at coefficient `alpha`, detached (see `MultiTaskModel.wise_task`)."""
    alpha = check_alpha(alpha)
    task = model.task(name)
    refused = [c for c in task.peft_configs if not c.wise]
    if refused:
        raise ValueError(f"task {name!r}: {refused[0].method} has no WiSE form: {refused[0].wise_refusal}")
    ref_state = _reference_head(model, name, reference)
    wise = copy.deepcopy(task)
    wise.slot = PLAIN_SLOT
    with torch.no_grad():
        for method in wise.peft.values():
            method.wise_(alpha, model.backbone)
        for key, tensor in wise.head.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            if ref_state is not None:
                tensor.copy_(ref_state[key] + alpha * (tensor - ref_state[key]))
            elif isinstance(tensor, nn.Parameter):  # zeros reference: parameters only (buffers are statistics)
                tensor.mul_(alpha)
    return wise


def _reference_head(model: MultiTaskModel, name: str, reference: str | None) -> dict[str, torch.Tensor] | None:
    if reference is None:
        return None
    ref, task = model.task(reference), model.task(name)
    changes = [c.method for c in ref.peft_configs if c.method != "linear_probe"]
    if changes:
        raise ValueError(
            f"WiSE reference {reference!r} must leave the backbone frozen (a linear-probe task), but it uses {changes}"
        )
    mine, theirs = task.head.state_dict(), ref.head.state_dict()
    same = type(ref.head_config) is type(task.head_config) and mine.keys() == theirs.keys()
    if not same or any(mine[k].shape != theirs[k].shape for k in mine):
        raise ValueError(
            f"WiSE reference {reference!r} must have a head like task {name!r}'s (same type, classes and shapes); "
            f"got {ref.head_config!r} for {task.head_config!r}"
        )
    return {k: v.detach() for k, v in theirs.items()}


class WiseCopies:
    """The WiSE copies per-call alphas run, attached to the model under hidden slots (least recently used first out).

    A copy is keyed by (task, alpha, reference) and stamped with the identity and tensor versions of the task and
    the reference it was made from; an optimizer step or a loaded state changes a version, so the next call makes
    a fresh copy.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._copies: OrderedDict[tuple, tuple[tuple, Task]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._copies)

    def get(self, model: MultiTaskModel, name: str, alpha: float, reference: str | None) -> str:
        """The hidden name of the copy for (name, alpha, reference), made and attached if needed."""
        key = (name, check_alpha(alpha), reference)
        stamp = _stamp(model, name, reference)
        hit = self._copies.get(key)
        if hit is not None and hit[0] == stamp:
            self._copies.move_to_end(key)
            return hit[1].name
        if hit is not None:
            self._remove(model, key)
        wise = wise_copy(model, name, alpha, reference)
        wise.name = f"{name}@{key[1]:g}" + (f"~{reference}" if reference else "")  # never a task name (`@`)
        model._attach_slot(wise)
        self._copies[key] = (stamp, wise)
        while len(self._copies) > self.capacity:
            self._remove(model, next(iter(self._copies)))
        return wise.name

    def task(self, hidden: str) -> Task:
        for _, wise in self._copies.values():
            if wise.name == hidden:
                return wise
        raise ValueError(f"unknown task {hidden!r}")

    def drop(self, model: MultiTaskModel, name: str) -> None:
        """Drop the copies made from task `name` or toward its head."""
        for key in [k for k in self._copies if name in (k[0], k[2])]:
            self._remove(model, key)

    def _remove(self, model: MultiTaskModel, key: tuple) -> None:
        _, wise = self._copies.pop(key)
        model._detach_slot(wise)


def _stamp(model: MultiTaskModel, name: str, reference: str | None) -> tuple:
    tasks = [model.task(name)] + ([model.task(reference)] if reference is not None else [])
    device = next(model.backbone.parameters()).device  # (`model.to(...)` moves tensors without a new version)
    return (device, *((id(t), tuple(v._version for v in [*t.parameters(), *t.buffers()])) for t in tasks))

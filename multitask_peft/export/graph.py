"""The traceable multi-task forward (`MultiTaskGraph`) and its conversion to an ONNX model proto.

The graph takes `images` (N, 3, H, W), normalised, and returns every listed task's outputs for every image (the
heads' tensor forms). It runs the executor's one part loop with a `StackedPlan`: the backbone parts before the first
part any listed task changes run once per image; there the batch fans out task-major (N rows per task) and each
adapted layer applies every task's adapters to its block of rows (symbolic block sizes, so the batch dimension
stays dynamic). An ensemble listed among the tasks is one more output, combined in the graph from its members' class
logits (`multitask_peft.ensemble`); members run once, and are outputs only when listed themselves.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import ensemble as ensembles
from ..executor import StackedPlan, run_backbone
from ..heads import Features, Head


class MultiTaskGraph(nn.Module):
    """The traceable multi-task forward of `model` for `tasks` (tasks and ensembles) at a fixed image size (what
    gets exported).

    Calling it in PyTorch gives the graph's outputs: a tuple in the order of `output_names`.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[str],
        image_size: tuple[int, int],
        merged: bool = False,
        output_prefixes: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.task_names = list(tasks)
        self.output_prefixes = list(output_prefixes) if output_prefixes is not None else list(self.task_names)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.ensembles = {t: model.ensemble(t) for t in self.task_names if t in model.ensembles}
        if self.ensembles and merged:
            raise ValueError(
                f"{list(self.ensembles)} are ensembles: a merged graph folds one task into the weights; export "
                "ensembles in the multi-task graph (merge=False)"
            )
        # the tasks that run: the listed ones and the members of listed ensembles, each once
        members = {t: e.members for t, e in self.ensembles.items()}
        self.run_names = list(dict.fromkeys(m for t in self.task_names for m in members.get(t, (t,))))
        self.slots = tuple(model.slot(t) for t in self.run_names)
        for name in self.run_names:
            if type(model.task(name).head).export_outputs is Head.export_outputs:
                raise ValueError(f"task {name!r}: head {type(model.task(name).head).__name__} has no ONNX form")
        host = model.backbone
        if merged:
            if len(self.task_names) != 1:
                raise ValueError(f"a merged graph holds one task, got {self.task_names}")
            # a registered submodule, so that copies and casts of the graph (fp16) carry it
            self.plain = model.merged_backbone(self.task_names[0])  # raises for methods that cannot be folded
            self.plan = StackedPlan(self.plain, self.slots, branch_at=0)
        else:
            plans = [model.slot_plan(t) for t in self.run_names]
            for name, plan in zip(self.run_names, plans, strict=True):
                unsupported = [c.method for c in model.task(name).peft_configs if not c.onnx]
                if unsupported or plan.prompts is not None or plan.backbone is not None:
                    raise ValueError(
                        f"task {name!r} cannot be exported to ONNX: method {', '.join(unsupported) or '?'} has no "
                        "ONNX form in the multi-task graph (prompt tokens / a private backbone); export the other "
                        "tasks, or this one alone with merge=True"
                    )
            sides = {s: p.side for s, p in zip(self.slots, plans, strict=True) if p.side is not None}
            self.plan = StackedPlan(host.model, self.slots, min(p.first_position for p in plans), sides)
        self.eval()
        self.output_names = self._trace_names()

    def _trace_names(self) -> list[str]:
        names = []
        with torch.no_grad():
            images = torch.zeros(1, 3, *self.image_size, device=device_of(self.model))
            for prefix, fields in zip(self.output_prefixes, self._forward(images), strict=True):
                names += [f"{prefix}.{field}" for field in fields]
        return names

    def _forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        features = run_backbone(self.model.backbone, images, self.plan)  # task-major rows
        num_tasks = len(self.slots)
        raw = {}
        for k, name in enumerate(self.run_names):
            feats = Features(
                [m.unflatten(0, (num_tasks, -1))[k] for m in features.maps],  # (N, C_l, H_l, W_l) each
                features.pooled.unflatten(0, (num_tasks, -1))[k],  # (N, D)
            )
            raw[name] = self.model.task(name).head(feats)
        results = []
        for name in self.task_names:
            if name in self.ensembles:
                ens = self.ensembles[name]
                heads = [self.model.task(m).head for m in ens.members]
                logits = [h.class_logits(raw[m], self.image_size) for h, m in zip(heads, ens.members, strict=True)]
                results.append(ensembles.tensor_form(ens, logits))  # (N, C, ...) each -> the kind's tensor form
            else:
                head = self.model.task(name).head
                results.append(head.export_outputs(raw[name], self.image_size))
        return results

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for fields in self._forward(images) for t in fields.values())


def device_of(model: nn.Module) -> torch.device:
    return next(model.backbone.model.parameters()).device


class Fp16Wrapper(nn.Module):
    """Half-precision copy of the graph with float32 inputs and float outputs at the boundary."""

    def __init__(self, graph: MultiTaskGraph) -> None:
        super().__init__()

        self.inner = copy.deepcopy(graph).half()  # (not `graph`: that name is taken in the traced module)
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.inner(images.half())
        return tuple(o.float() if o.is_floating_point() else o for o in outs)


def to_onnx(
    graph: MultiTaskGraph,
    image_size: tuple[int, int],
    dynamic_batch: bool,
    opset: int | None,
    fp16: bool,
    optimize: bool,
) -> Any:
    example = torch.zeros(2 if dynamic_batch else 1, 3, *image_size, device=device_of(graph.model))
    module: nn.Module = graph if not fp16 else Fp16Wrapper(graph)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            input_names=["images"],
            output_names=graph.output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            optimize=optimize,
            verbose=False,
            custom_translation_table=_onnx_translations(graph),
        )
    return program.model_proto


def _onnx_translations(graph: MultiTaskGraph) -> dict[Any, Any]:
    """ONNX forms (onnxscript functions) of the custom ops the graph's heads use (`Head.onnx_translations`)."""
    table = {}
    for name in graph.run_names:
        table.update(graph.model.task(name).head.onnx_translations())
    return table


def save_onnx(onnx_model: Any, path: Path) -> None:
    import onnx

    large = onnx_model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: weights go to a side file
    onnx.save_model(onnx_model, str(path), save_as_external_data=large, location=path.name + ".data")

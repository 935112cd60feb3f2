"""The one backbone part loop, shared by eager inference, training and ONNX export.

`run_backbone(host, images, plan)` runs the backbone part by part (`layouts`) over *streams* of rows, each under its
own routing: it asks the plan, before every part and before the pooling step, which streams exist now (rows branch
off there), inserts / replaces / strips prompt tokens in prompt streams, runs the part (checkpointed if asked),
collects the feature maps the layout offers, pools, and has the plan put the rows back in the requested order.
Side networks (LST, VQT: `SlotPlan.side`) change nothing inside the parts: the loop keeps what they read of the
parts they name (`plan.tap`: only their tasks' rows), and at the end each turns its task's rows of those outputs
into that task's features (`plan.take` / `plan.put`). What differs between the callers is only the plan:

- `RowPlan` (eager inference and training): rows are (image, slot) pairs with Python-int segments. The main stream
  runs the shared frozen backbone with its multi-adapter layers; rows whose tasks add prompt tokens run in a stream
  per prompt length (their sequences are longer); rows of a full-fine-tune task run through that task's private
  backbone copy. Every stream is sorted by slot, so each adapted layer sees one contiguous segment per slot. Shared
  prefix: a row (image i, slot s) is carried by the plain row (i, -1) until the first backbone part that s changes;
  there it branches off (a copy of the plain activation). The plain row is dropped once no requested row of that
  image still needs it. With `share_prefix=False` every row carries its own slot from the input on.
- `StackedPlan` (ONNX export): every listed task runs on every image. One stream: the images as they come until
  the first part any task changes, then the batch repeated task-major (N rows per task) under a `StackedRouting`
  whose block sizes stay symbolic, so the traced graph keeps a dynamic batch dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbone import BackboneHost
from .heads import Features
from .layouts import PartFn
from .peft.base import PromptTokens, SideNetwork, attention_log_scale
from .routing import PLAIN_SLOT, Routing, StackedRouting

Row = tuple[int, int]  # (image index, slot)


@dataclass(frozen=True)
class SlotPlan:
    """What the executor needs to know about a task slot."""

    first_position: int  # first backbone position the task changes (layout.num_positions: none)
    prompts: PromptTokens | None = None
    backbone: nn.Module | None = None  # a private backbone (full fine-tuning)
    side: SideNetwork | None = None  # a side network reading part outputs (LST, VQT)


@dataclass
class Stream:
    """Rows that run through one module together.

    Attributes:
        model: The backbone module the rows run through (the shared one, a private copy, or a merged copy).
        rows: The plan's description of the rows (`RowPlan`: (image, slot) pairs in row order).
        x: (R, ...) the rows' activation.
        routing: The routing the stream's adapted layers read.
        prompts: Prompt tokens per row in this stream (0: none); `prompt_slots` gives each segment's prompts.
    """

    model: nn.Module
    rows: Any
    x: torch.Tensor | None = None
    routing: Routing | StackedRouting | None = None
    prompts: int = 0
    prompt_slots: dict[int, PromptTokens] = field(default_factory=dict)


class Plan(Protocol):
    """How rows are laid out, where they branch off and how they come back together (see the module docstring)."""

    def start(self, images: torch.Tensor) -> list[Stream]:
        """The streams entering the first part."""

    def branch(self, position: int, streams: list[Stream]) -> list[Stream]:
        """The streams running position `position` (a part, or the pooling step at `len(parts)`)."""

    def assemble(self, captures: list[tuple[Any, torch.Tensor]], key: Any = None) -> torch.Tensor:
        """One tensor in the plan's output row order from the (stream rows, tensor) pairs captured at one point
        (with a side `key`: only the rows of that side's task)."""

    def sides(self) -> dict[Any, SideNetwork]:
        """The side networks of the tasks the plan runs, by a key `assemble`, `take` and `put` understand."""

    def tap(self, stream: Stream) -> tuple[Any, torch.Tensor] | None:
        """What side networks need of a stream's activation after a part they read: (rows, tensor) or None."""

    def take(self, x: torch.Tensor, key: Any) -> torch.Tensor:
        """The rows of a side's task from a tensor in output row order."""

    def put(self, x: torch.Tensor, key: Any, rows: torch.Tensor) -> torch.Tensor:
        """`x` (output row order) with the rows of a side's task replaced by `rows` (out of place)."""


def run_backbone(host: BackboneHost, images: torch.Tensor, plan: Plan, checkpointing: bool = False) -> Features:
    """Backbone features of the rows `plan` describes, in its output order.

    Args:
        host: The backbone host (its parts, levels, pooling and routing context).
        images: (N, 3, H, W), normalised.
        plan: `RowPlan` or `StackedPlan`.
        checkpointing: With autograd on, recompute every part's activations in the backward pass.
    """
    checkpointing = checkpointing and torch.is_grad_enabled()
    layout = host.layout
    num_parts = len(layout.parts)
    levels_at: dict[int, list[int]] = {}
    for k, lvl in enumerate(layout.levels):
        levels_at.setdefault(lvl.position, []).append(k)
    captures: list[list[tuple[Any, torch.Tensor]]] = [[] for _ in layout.levels]
    sides = plan.sides()
    taps: dict[int, list[tuple[Any, torch.Tensor]]] = {p: [] for side in sides.values() for p in side.positions}
    streams = plan.start(images)
    for p in range(num_parts):
        streams = plan.branch(p, streams)
        part = layout.parts[p]
        for stream in streams:
            bias = None
            if stream.prompts:
                stream.x = _prompt_step(stream, p, num_parts, layout.num_prefix_tokens)
                if 0 < p < num_parts - 1:
                    bias = _prompt_bias(stream, layout.num_prefix_tokens)
            args = (part.fn, stream.model, stream.x, stream.routing, host, bias)
            # (a checkpointed recomputation is routed too: `_run_part` enters the routing itself)
            out = checkpoint(_run_part, *args, use_reentrant=False) if checkpointing else _run_part(*args)
            stream.x, maps_out = out if part.maps else (out, ())
            for k in levels_at.get(p, ()):
                tap = layout.levels[k].tap
                captures[k].append((stream.rows, stream.x if tap is None else maps_out[tap]))
            if p in taps and not stream.prompts:  # (a task with a side network has no prompt tokens)
                tapped = plan.tap(stream)
                if tapped is not None:
                    taps[p].append(tapped)
    pooled = []
    for stream in plan.branch(num_parts, streams):
        with host.router.use(stream.routing):
            pooled.append((stream.rows, layout.pool(stream.model, stream.x)))  # (R, D)
    image_size = (images.shape[-2], images.shape[-1])
    maps = [layout.to_map(lvl, plan.assemble(c), image_size) for lvl, c in zip(layout.levels, captures, strict=True)]
    features = Features(maps, plan.assemble(pooled))
    for key, side in sides.items():  # side networks: from their tasks' rows of the tapped parts to their features
        own = Features([plan.take(m, key) for m in features.maps], plan.take(features.pooled, key))
        new = side.side_features([plan.assemble(taps[p], key) for p in side.positions], own, host, image_size)
        maps = [m if n is o else plan.put(m, key, n) for m, n, o in zip(features.maps, new.maps, own.maps, strict=True)]
        pooled = features.pooled if new.pooled is own.pooled else plan.put(features.pooled, key, new.pooled)
        features = Features(maps, pooled)
    return features


def _run_part(
    fn: PartFn,
    model: nn.Module,
    x: torch.Tensor,
    routing: Routing | StackedRouting,
    host: BackboneHost,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One backbone part under its routing (a block of a prompt stream may take an additive attention mask)."""
    with host.router.use(routing):
        return fn(model, x) if attn_mask is None else fn(model, x, attn_mask=attn_mask)


def _prompt_bias(stream: Stream, num_prefix: int) -> torch.Tensor | None:
    """(R, 1, 1, T) additive attention mask scaling the attention paid to each segment's prompt keys by its
    prompts' `attention_scale()` (log(scale) on those keys; -inf at 0), or None where every scale is 1."""
    segments = stream.routing.segments
    scales = [stream.prompt_slots[seg.slot].attention_scale() for seg in segments]
    if all(s == 1.0 for s in scales):
        return None
    x = stream.x
    bias = x.new_zeros(x.shape[0], 1, 1, x.shape[1])
    for seg, scale in zip(segments, scales, strict=True):
        keys = slice(num_prefix, num_prefix + stream.prompts)
        bias[seg.start : seg.end, ..., keys] = attention_log_scale(scale)
    return bias


def _prompt_step(stream: Stream, p: int, num_parts: int, num_prefix: int) -> torch.Tensor:
    """Insert (before the first block), replace (VPT-deep) or strip (before the final part) prompt tokens."""
    x = stream.x  # (R, T, C)
    n = stream.prompts
    if p == num_parts - 1:
        return torch.cat([x[:, :num_prefix], x[:, num_prefix + n :]], dim=1)
    if p == 0:
        return x
    unit = p - 1
    segments = stream.routing.segments
    pieces = [stream.prompt_slots[seg.slot].tokens(unit) for seg in segments]  # (P, C) or None each
    if all(t is None for t in pieces):
        return x
    prompts = [
        x[s.start : s.end, num_prefix : num_prefix + n] if t is None else t.to(x.dtype).expand(s.end - s.start, -1, -1)
        for s, t in zip(segments, pieces)
    ]  # (rows of the segment, P, C) each
    if unit == 0:  # insert
        return torch.cat([x[:, :num_prefix], torch.cat(prompts), x[:, num_prefix:]], dim=1)
    return torch.cat([x[:, :num_prefix], torch.cat(prompts), x[:, num_prefix + n :]], dim=1)


# --- eager rows ----------------------------------------------------------------------------------------------------


def _gather(source: torch.Tensor, index: list[int]) -> torch.Tensor:
    if index == list(range(source.shape[0])):
        return source
    return source.index_select(0, torch.tensor(index, dtype=torch.long, device=source.device))


_MAIN = ("main",)


class RowPlan:
    """Eager rows: (image, slot) pairs, sorted by slot in every stream, with Python-int segments.

    Args:
        host: The backbone host (its shared module and layout).
        rows: The requested (image, slot) rows, in output order (duplicates are run once).
        slots: Each task slot's plan (first changed position, prompts, private backbone).
        share_prefix: Carry a row on its image's plain row until the first part its task changes.
    """

    def __init__(
        self, host: BackboneHost, rows: Sequence[Row], slots: dict[int, SlotPlan], share_prefix: bool = True
    ) -> None:
        self.host = host
        self.rows = list(dict.fromkeys((int(i), int(s)) for i, s in rows))
        self.slots = slots
        never = host.layout.num_positions + 1
        self.start_at = {
            s: (never if s == PLAIN_SLOT else slots[s].first_position if share_prefix else 0) for _, s in self.rows
        }
        self._streams: dict[tuple, Stream] = {}
        self._side_rows: tuple[set[int], set[int]] | None = None
        self._index: dict[int, torch.Tensor] = {}

    def start(self, images: torch.Tensor) -> list[Stream]:
        main = Stream(self.host.model, [(i, PLAIN_SLOT) for i in range(images.shape[0])], images)
        self._streams = {_MAIN: main}
        return [main]

    def _key(self, slot: int) -> tuple:
        plan = self.slots[slot]
        if plan.backbone is not None:
            return ("private", slot)
        if plan.prompts is not None:
            return ("prompts", plan.prompts.num_tokens)
        return _MAIN

    def branch(self, position: int, streams: list[Stream]) -> list[Stream]:
        branching = [r for r in self.rows if r[1] != PLAIN_SLOT and self.start_at[r[1]] == position]
        if position > 0 and not branching:
            return streams
        main = self._streams[_MAIN]
        source, where = main.x, {r: k for k, r in enumerate(main.rows)}  # every new row comes from the main stream
        still_shared = {i for i, s in self.rows if self.start_at[s] > position}
        new_rows = {key: list(stream.rows) for key, stream in self._streams.items()}
        new_rows[_MAIN] = [r for r in main.rows if r[1] != PLAIN_SLOT or r[0] in still_shared]
        for r in branching:
            key = self._key(r[1])
            if key not in self._streams:
                plan = self.slots[r[1]]
                prompts = plan.prompts.num_tokens if plan.prompts is not None else 0
                self._streams[key] = Stream(plan.backbone or self.host.model, [], prompts=prompts)
                new_rows[key] = []
            new_rows[key].append(r)
        for key, rows in new_rows.items():
            stream = self._streams[key]
            rows = sorted(rows, key=lambda r: (r[1], r[0]))
            if key == _MAIN:  # kept rows come from themselves, branching rows from their image's plain row
                index = [where[r] if r in where else where[(r[0], PLAIN_SLOT)] for r in rows]
                stream.x = _gather(source, index) if rows else None
            else:
                old = {r: k for k, r in enumerate(stream.rows)}
                added = [r for r in rows if r not in old]
                if added:
                    fresh = _gather(source, [where[(i, PLAIN_SLOT)] for i, _ in added])
                    combined = fresh if stream.x is None else torch.cat([stream.x, fresh])
                    lookup = {**old, **{r: len(old) + k for k, r in enumerate(added)}}
                    stream.x = _gather(combined, [lookup[r] for r in rows])
            stream.rows = rows
            stream.routing = Routing.from_sorted_slots([s for _, s in rows])
            if stream.prompts:
                stream.prompt_slots = {s: self.slots[s].prompts for _, s in rows}
        self._streams = {k: st for k, st in self._streams.items() if st.rows or k == _MAIN}
        return [st for st in self._streams.values() if st.rows]

    def assemble(self, captures: list[tuple[Any, torch.Tensor]], key: Any = None) -> torch.Tensor:
        """Rows in request order (with a slot `key`: that slot's), each from its own branch or, before it
        branched, its image's plain row."""
        where: dict[Row, int] = {}
        offset = 0
        for rows, _ in captures:
            for k, r in enumerate(rows):
                where[r] = offset + k
            offset += len(rows)
        wanted = self.rows if key is None else [r for r in self.rows if r[1] == key]
        index = [where[r] if r in where else where[(r[0], PLAIN_SLOT)] for r in wanted]
        tensors = [t for _, t in captures]
        return _gather(tensors[0] if len(tensors) == 1 else torch.cat(tensors), index)

    def sides(self) -> dict[Any, SideNetwork]:
        slots = dict.fromkeys(s for _, s in self.rows if s != PLAIN_SLOT)
        return {s: self.slots[s].side for s in slots if self.slots[s].side is not None}

    def tap(self, stream: Stream) -> tuple[Any, torch.Tensor] | None:
        """The rows of side tasks and the plain rows still carrying them (nothing else is kept for the sides)."""
        if self._side_rows is None:
            sides = set(self.sides())
            self._side_rows = sides, {i for i, s in self.rows if s in sides}
        sides, images = self._side_rows
        keep = [k for k, (i, s) in enumerate(stream.rows) if s in sides or (s == PLAIN_SLOT and i in images)]
        if not keep:
            return None
        return [stream.rows[k] for k in keep], _gather(stream.x, keep)

    def _positions(self, slot: int, device: torch.device) -> torch.Tensor:
        index = self._index.get(slot)
        if index is None or index.device != device:
            rows = [k for k, r in enumerate(self.rows) if r[1] == slot]
            index = self._index[slot] = torch.tensor(rows, dtype=torch.long, device=device)
        return index

    def take(self, x: torch.Tensor, key: Any) -> torch.Tensor:
        return x.index_select(0, self._positions(key, x.device))

    def put(self, x: torch.Tensor, key: Any, rows: torch.Tensor) -> torch.Tensor:
        return x.index_copy(0, self._positions(key, x.device), rows.to(x.dtype))


# --- traced graphs -------------------------------------------------------------------------------------------------


class StackedPlan:
    """Every task of `slots` on every image, task-major (row k * N + i: image i, task k), for a traced graph.

    Args:
        module: The backbone module to run (the host's shared one, or a merged single-task copy).
        slots: Task slots in output order.
        branch_at: The first position any of them changes: the batch fans out before it
            (`layout.num_positions`: never, the plain features are repeated at the end).
    """

    def __init__(
        self,
        module: nn.Module,
        slots: Sequence[int],
        branch_at: int,
        sides: dict[int, SideNetwork] | None = None,
    ) -> None:
        self.module = module
        self.slots = tuple(slots)
        self.branch_at = branch_at
        self._sides = {self.slots.index(s): side for s, side in (sides or {}).items()}  # by task index

    def start(self, images: torch.Tensor) -> list[Stream]:
        return [Stream(self.module, "shared", images, StackedRouting((PLAIN_SLOT,)))]

    def branch(self, position: int, streams: list[Stream]) -> list[Stream]:
        if position != self.branch_at:
            return streams
        (stream,) = streams
        return [Stream(self.module, "fanned", torch.cat([stream.x] * len(self.slots)), StackedRouting(self.slots))]

    def assemble(self, captures: list[tuple[Any, torch.Tensor]], key: Any = None) -> torch.Tensor:
        ((rows, x),) = captures
        if key is not None:  # task `key`'s rows (N, ...)
            return self.take(x, key) if rows == "fanned" else x
        return x if rows == "fanned" else torch.cat([x] * len(self.slots))

    def sides(self) -> dict[Any, SideNetwork]:
        return dict(self._sides)

    def tap(self, stream: Stream) -> tuple[Any, torch.Tensor] | None:
        return stream.rows, stream.x

    def take(self, x: torch.Tensor, key: Any) -> torch.Tensor:
        return x.unflatten(0, (len(self.slots), -1))[key]

    def put(self, x: torch.Tensor, key: Any, rows: torch.Tensor) -> torch.Tensor:
        blocks = list(x.unflatten(0, (len(self.slots), -1)).unbind(0))
        blocks[key] = rows.to(x.dtype)
        return torch.cat(blocks)

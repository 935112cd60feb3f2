"""Runs the backbone for a batch of (image, task slot) rows: sort by slot, share prefixes, fan out, collect features.

Rows of the live batch are kept in *streams*: the main stream runs the shared frozen backbone with its
multi-adapter layers; rows whose tasks add prompt tokens run in a stream per prompt length (their sequences
are longer), and rows of a full-fine-tune task run through that task's private backbone copy. Every stream is
sorted by slot, so each adapted layer sees one contiguous segment per slot.

Shared prefix: a row (image i, slot s) is carried by the plain row (i, -1) until the first backbone part that
s changes; there it branches off (a copy of the plain activation). The plain row is dropped once no requested
row of that image still needs it. With `share_prefix=False` every row carries its own slot from the input on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbone import BackboneHost
from .heads import Features
from .layouts import PartFn
from .peft.base import PromptTokens
from .routing import PLAIN_SLOT, Routing

Row = tuple[int, int]  # (image index, slot)


@dataclass(frozen=True)
class SlotPlan:
    """What the executor needs to know about a task slot."""

    first_position: int  # first backbone position the task changes (layout.num_positions: none)
    prompts: PromptTokens | None = None
    backbone: nn.Module | None = None  # a private backbone (full fine-tuning)


@dataclass
class _Stream:
    model: nn.Module
    num_prompts: int = 0
    rows: list[Row] = field(default_factory=list)
    x: torch.Tensor | None = None
    routing: Routing | None = None


def _gather(source: torch.Tensor, index: list[int]) -> torch.Tensor:
    if index == list(range(source.shape[0])):
        return source
    return source.index_select(0, torch.tensor(index, dtype=torch.long, device=source.device))


def run_backbone(
    host: BackboneHost,
    images: torch.Tensor,  # (N, 3, H, W)
    rows: Sequence[Row],
    plans: dict[int, SlotPlan],
    share_prefix: bool = True,
    checkpointing: bool = False,
) -> Features:
    """Backbone features for each requested (image, slot) row, in the order given.

    With `checkpointing` (and autograd on) every part's activations are recomputed in the backward pass.
    """
    checkpointing = checkpointing and torch.is_grad_enabled()
    layout = host.layout
    num_parts = len(layout.parts)
    never = layout.num_positions + 1
    rows = list(dict.fromkeys((int(i), int(s)) for i, s in rows))
    start = {s: (never if s == PLAIN_SLOT else plans[s].first_position if share_prefix else 0) for _, s in rows}
    main_key = ("main",)
    streams: dict[tuple, _Stream] = {main_key: _Stream(host.model)}

    def key_of(slot: int) -> tuple:
        plan = plans[slot]
        if plan.backbone is not None:
            return ("private", slot)
        if plan.prompts is not None:
            return ("prompts", plan.prompts.num_tokens)
        return main_key

    level_at = {lvl.position: k for k, lvl in enumerate(layout.levels)}
    captures: list[list[tuple[list[Row], torch.Tensor]]] = [[] for _ in layout.levels]
    pooled: list[tuple[list[Row], torch.Tensor]] = []

    for p in range(num_parts + 1):
        main = streams[main_key]
        branching = [r for r in rows if r[1] != PLAIN_SLOT and start[r[1]] == p]
        if p == 0 or branching:
            # The source of every new row: raw images at the input, else the main stream's rows.
            if p == 0:
                source = images
                position = {(i, PLAIN_SLOT): i for i in range(images.shape[0])}
            else:
                source = main.x
                position = {r: k for k, r in enumerate(main.rows)}
            still_shared = {r[0] for r in rows if start[r[1]] > p}
            new_rows: dict[tuple, list[Row]] = {k: list(st.rows) for k, st in streams.items()}
            if p == 0:
                new_rows[main_key] = [(i, PLAIN_SLOT) for i in sorted(still_shared)]
            else:
                new_rows[main_key] = [r for r in main.rows if r[1] != PLAIN_SLOT or r[0] in still_shared]
            for r in branching:
                key = key_of(r[1])
                if key not in streams:
                    plan = plans[r[1]]
                    prompts = plan.prompts.num_tokens if plan.prompts is not None else 0
                    streams[key] = _Stream(plan.backbone or host.model, prompts)
                    new_rows[key] = []
                new_rows[key].append(r)
            for key, stream_rows in new_rows.items():
                stream = streams[key]
                stream_rows = sorted(stream_rows, key=lambda r: (r[1], r[0]))
                if key == main_key:  # kept rows come from themselves, branching rows from their image's plain row
                    index = [position[r] if r in position else position[(r[0], PLAIN_SLOT)] for r in stream_rows]
                    stream.x = _gather(source, index) if stream_rows else None
                else:
                    old = {r: k for k, r in enumerate(stream.rows)}
                    added = [r for r in stream_rows if r not in old]
                    if added:
                        fresh = _gather(source, [position[(i, PLAIN_SLOT)] for i, _ in added])
                        combined = fresh if stream.x is None else torch.cat([stream.x, fresh])
                        lookup = {**old, **{r: len(old) + k for k, r in enumerate(added)}}
                        stream.x = _gather(combined, [lookup[r] for r in stream_rows])
                stream.rows = stream_rows
                stream.routing = Routing.from_sorted_slots([s for _, s in stream_rows])
            for key in [k for k, st in streams.items() if not st.rows and k != main_key]:
                del streams[key]

        if p == num_parts:  # pool
            for stream in streams.values():
                if stream.rows:
                    with host.router.use(stream.routing):
                        pooled.append((stream.rows, layout.pool(stream.model, stream.x)))
            break

        for stream in streams.values():
            if not stream.rows:
                continue
            if stream.num_prompts:
                stream.x = _prompt_step(stream, p, num_parts, layout.num_prefix_tokens, plans)
            if checkpointing:
                stream.x = checkpoint(
                    _run_part, layout.parts[p].fn, stream.model, stream.x, host, stream.routing, use_reentrant=False
                )
            else:
                stream.x = _run_part(layout.parts[p].fn, stream.model, stream.x, host, stream.routing)
            if p in level_at:
                captures[level_at[p]].append((stream.rows, stream.x))

    image_size = (images.shape[-2], images.shape[-1])
    maps = [layout.to_map(_assemble(c, rows), image_size) for c in captures]
    return Features(maps, _assemble(pooled, rows))


def _run_part(fn: PartFn, model: nn.Module, x: torch.Tensor, host: BackboneHost, routing: Routing) -> torch.Tensor:
    """One backbone part under its routing (entered here, so a checkpointed recomputation is routed too)."""
    with host.router.use(routing):
        return fn(model, x)


def _prompt_step(stream: _Stream, p: int, num_parts: int, num_prefix: int, plans: dict[int, SlotPlan]) -> torch.Tensor:
    """Insert (before the first block), replace (VPT-deep) or strip (before the final part) prompt tokens."""
    x = stream.x  # (R, T, C)
    n = stream.num_prompts
    if p == num_parts - 1:
        return torch.cat([x[:, :num_prefix], x[:, num_prefix + n :]], dim=1)
    if p == 0:
        return x
    unit = p - 1
    pieces, changed = [], False
    for seg in stream.routing.segments:
        tokens = plans[seg.slot].prompts.tokens(unit)  # (P, C) or None
        if tokens is None:
            pieces.append(None)
        else:
            changed = True
            pieces.append(tokens.to(x.dtype).unsqueeze(0).expand(seg.end - seg.start, -1, -1))
    if not changed:
        return x
    if unit == 0:  # insert
        prompts = torch.cat(pieces)
        return torch.cat([x[:, :num_prefix], prompts, x[:, num_prefix:]], dim=1)
    prompts = torch.cat(
        [
            x[s.start : s.end, num_prefix : num_prefix + n] if t is None else t
            for s, t in zip(stream.routing.segments, pieces)
        ]
    )
    return torch.cat([x[:, :num_prefix], prompts, x[:, num_prefix + n :]], dim=1)


def _assemble(captures: list[tuple[list[Row], torch.Tensor]], rows: list[Row]) -> torch.Tensor:
    """Rows in request order, each from its own branch or, before it branched, its image's plain row."""
    where: dict[Row, int] = {}
    offset = 0
    for cap_rows, _ in captures:
        for k, r in enumerate(cap_rows):
            where[r] = offset + k
        offset += len(cap_rows)
    index = [where[r] if r in where else where[(r[0], PLAIN_SLOT)] for r in rows]
    tensors = [t for _, t in captures]
    combined = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    return _gather(combined, index)

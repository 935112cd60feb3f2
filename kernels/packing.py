"""Segments -> stacked operands for the Triton kernels (weights stacked by entry, rows split into tiles).

An entry is one row range (one slot's segment); a LoRA entry may hold several column slices (the q / k / v
factors of one adapter on a fused qkv projection). Ranks and slice counts are zero-padded to the largest in the
launch, so padded terms add exact zeros. Segments that cannot share a launch (different output widths, or two
updates of the same rows and columns) go to separate launches, applied in the given order.

Without autograd, stacked weights and tiles are cached in the caller's `PackCache` (keyed on the tensors' identity
and version, so an in-place update of a weight invalidates its entry), which makes repeated batches launch-only.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .segmented import BottleneckSegment, LoRASegment, ScaleShiftSegment

BLOCK_M = 64  # keep equal to triton_kernels.BLOCK_M
CACHE_BYTES = 1 << 30  # stacked weights kept for reuse, least recently used dropped first


@dataclass(frozen=True)
class LowRankPack:
    """Operands of one low-rank launch (LoRA: no biases, identity activation; bottleneck adapter: J = 1).

    Attributes:
        down: (W, J, R, K) (LoRA A, adapter down-projection)
        up: (W, J, N, R) (LoRA B, adapter up-projection)
        cols: (W, J) int32 first output column of each slice
        nslices: (W,) int32 slices in use per entry
        scale: (W,) fp32
        down_bias: (W, R) or None
        up_bias: (W, N) or None
        act: activation between the two projections
    """

    ranges: tuple[tuple[int, int], ...]
    down: torch.Tensor
    up: torch.Tensor
    cols: torch.Tensor
    nslices: torch.Tensor
    scale: torch.Tensor
    down_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    act: str


@dataclass(frozen=True)
class ScaleShiftPack:
    ranges: tuple[tuple[int, int], ...]
    scale: torch.Tensor | None  # (W, C)
    shift: torch.Tensor | None  # (W, C)


class PackCache:
    """Stacked operands kept for reuse while the weights they were built from are unchanged.

    Owned by whoever owns the weights (a model's backbone host has one, shared by its multi-adapter layers and
    cleared when tasks attach or detach), so no model can drop or see another's packs. Entries are keyed on a
    launch's layout and the storage, layout and version of its weights; the least recently used are dropped past
    `max_bytes`.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[tuple[torch.Tensor, ...], object, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo: dict) -> PackCache:
        return PackCache(self.max_bytes)  # a copy of the weights has other storage: nothing here applies to it

    def get(self, key: Hashable, tensors: tuple[torch.Tensor, ...], build: Callable[[], object]) -> object:
        """`build()`, memoised on `key` + the storage, layout and version of `tensors` when autograd does not
        record them. An entry holds the tensors' storage, so their addresses cannot be reused while it is cached;
        moving a module (`.to(dtype / device)`) gives its parameters new addresses, an in-place update a new
        version. (Writes through `.data` bump no version: `clear()` after them.) Entries are built outside
        inference mode, so that a pack made under `torch.inference_mode()` can later be saved for a backward pass."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return build()
        full = (key, tuple((t.data_ptr(), t._version, t.shape, t.stride(), t.dtype, t.device) for t in tensors))
        hit = self._entries.get(full)
        if hit is not None:
            self._entries.move_to_end(full)
            return hit[1]
        with torch.inference_mode(False):
            value = build()
        parts = vars(value).values() if not isinstance(value, torch.Tensor) else (value,)
        size = sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
        self._entries[full] = (tuple(t.detach() for t in tensors), value, size)
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            self._bytes -= self._entries.popitem(last=False)[1][2]
        return value

    def clear(self) -> None:
        """Drop every entry (its weights changed, or it should free their memory now)."""
        self._entries.clear()
        self._bytes = 0


def _cached(
    cache: PackCache | None, key: Hashable, tensors: tuple[torch.Tensor, ...], build: Callable[[], object]
) -> object:
    return build() if cache is None else cache.get(key, tensors, build)


def tiles_for(ranges: Sequence[tuple[int, int]], device: torch.device, cache: PackCache | None = None) -> torch.Tensor:
    """(T, 3) int32 tiles of disjoint row ranges: entry w = ranges[w], first row, end row (<= BLOCK_M rows)."""

    def build() -> torch.Tensor:
        tiles = [
            (w, s, min(s + BLOCK_M, end)) for w, (start, end) in enumerate(ranges) for s in range(start, end, BLOCK_M)
        ]
        return torch.tensor(tiles, dtype=torch.int32).view(-1, 3).to(device, non_blocking=True)

    return _cached(cache, ("tiles", tuple(ranges), str(device)), (), build)  # type: ignore[return-value]


def _cast(pack: LowRankPack | ScaleShiftPack, dtype: torch.dtype | None) -> LowRankPack | ScaleShiftPack:
    """The pack with its weights in `dtype` (the activations' dtype), so that launches never cast them again.
    (A low-rank pack's per-entry `scale` stays fp32.)"""
    if dtype is None:
        return pack
    fields = ("scale", "shift") if isinstance(pack, ScaleShiftPack) else ("down", "up", "down_bias", "up_bias")
    return dataclasses.replace(pack, **{f: getattr(pack, f).to(dtype) for f in fields if getattr(pack, f) is not None})


def _launch_groups(segments: Sequence[Any], compatible: Callable[[Any, Any], bool]) -> list[list[Any]]:
    """Segments in order, split into launches of compatible segments over distinct row ranges (a second update of
    the same rows goes to a later launch, so updates of one row apply in the given order)."""
    groups: list[list[Any]] = []
    for seg in segments:
        for group in groups:
            if compatible(group[0], seg) and all((seg.start, seg.end) != (g.start, g.end) for g in group):
                group.append(seg)
                break
        else:
            groups.append([seg])
    return groups


def _check_disjoint(ranges: Sequence[tuple[int, int]]) -> None:
    ordered = sorted(ranges)
    for (a0, a1), (b0, _) in zip(ordered, ordered[1:]):
        if b0 < a1:
            raise ValueError(f"segments must cover disjoint row ranges; got {(a0, a1)} and {b0, _}")


def pack_lora(
    segments: Sequence[LoRASegment], dtype: torch.dtype | None = None, cache: PackCache | None = None
) -> list[LowRankPack]:
    """Group LoRA segments into launches: one entry per row range, its column slices side by side (weights cast
    to `dtype` if given)."""
    launches: list[dict[tuple[int, int], list[LoRASegment]]] = []
    widths: list[int] = []
    for seg in segments:
        if seg.end <= seg.start:
            continue
        rows, n = (seg.start, seg.end), seg.lora_b.shape[0]
        for launch, width in zip(launches, widths, strict=True):
            slices = launch.get(rows, [])
            if width == n and all(seg.col + n <= s.col or s.col + n <= seg.col for s in slices):
                launch.setdefault(rows, []).append(seg)
                break
        else:
            launches.append({rows: [seg]})
            widths.append(n)
    packs = []
    for launch in launches:
        ranges = tuple(launch)
        _check_disjoint(ranges)
        entries = [launch[r] for r in ranges]
        tensors = tuple(t for slices in entries for s in slices for t in (s.lora_a, s.lora_b))
        meta = tuple((s.col, s.scale) for slices in entries for s in slices)
        key = (
            "lora",
            meta,
            tuple(len(e) for e in entries),
            dtype,
        )  # the stacked weights do not depend on the rows: reused across batch layouts
        pack = _cached(cache, key, tensors, lambda e=entries: _cast(_stack_lora(e), dtype))
        packs.append(dataclasses.replace(pack, ranges=ranges))
    return packs  # type: ignore[return-value]


def _stack_lora(entries: list[list[LoRASegment]]) -> LowRankPack:
    """Stacked weights of a launch's entries (row ranges are filled in per call)."""
    first = entries[0][0]
    w, j = len(entries), max(len(e) for e in entries)
    r = max(s.lora_a.shape[0] for e in entries for s in e)
    uniform = all(len(e) == j and all(s.lora_a.shape[0] == r for s in e) for e in entries)
    if uniform:  # one copy kernel each
        down = torch.stack([torch.stack([s.lora_a for s in e]) for e in entries])
        up = torch.stack([torch.stack([s.lora_b for s in e]) for e in entries])
    else:
        k, n = first.lora_a.shape[1], first.lora_b.shape[0]
        down = first.lora_a.new_zeros(w, j, r, k)
        up = first.lora_b.new_zeros(w, j, n, r)
        for i, e in enumerate(entries):
            for jj, s in enumerate(e):
                down[i, jj, : s.lora_a.shape[0]] = s.lora_a
                up[i, jj, :, : s.lora_b.shape[1]] = s.lora_b
    device = first.lora_a.device
    cols = torch.tensor([[s.col for s in e] + [0] * (j - len(e)) for e in entries], dtype=torch.int32)
    nslices = torch.tensor([len(e) for e in entries], dtype=torch.int32)
    scale = torch.tensor([e[0].scale for e in entries], dtype=torch.float32)
    if any(s.scale != e[0].scale for e in entries for s in e):  # per-slice scales: fold them into `up`
        factors = torch.tensor([[s.scale for s in e] + [0.0] * (j - len(e)) for e in entries])
        up = up * factors.to(device=device, dtype=up.dtype)[:, :, None, None]
        scale = torch.ones(w, dtype=torch.float32)
    return LowRankPack((), down, up, cols.to(device), nslices.to(device), scale.to(device), None, None, "identity")


def pack_bottleneck(
    segments: Sequence[BottleneckSegment], dtype: torch.dtype | None = None, cache: PackCache | None = None
) -> list[LowRankPack]:
    """One launch per group of disjoint segments with one activation (J = 1; adapter widths zero-padded)."""
    groups = _launch_groups([s for s in segments if s.end > s.start], lambda a, b: a.act == b.act)
    packs = []
    for group in groups:
        ranges = tuple((s.start, s.end) for s in group)
        _check_disjoint(ranges)
        tensors = tuple(t for s in group for t in (s.down, s.down_bias, s.up, s.up_bias))
        key = ("bottleneck", group[0].act, tuple(s.scale for s in group), dtype)
        pack = _cached(cache, key, tensors, lambda g=group: _cast(_stack_bottleneck(g), dtype))
        packs.append(dataclasses.replace(pack, ranges=ranges))
    return packs  # type: ignore[return-value]


def _stack_bottleneck(group: list[BottleneckSegment]) -> LowRankPack:
    dim = max(s.down.shape[0] for s in group)
    if all(s.down.shape[0] == dim for s in group):
        down = torch.stack([s.down for s in group])[:, None]
        up = torch.stack([s.up for s in group])[:, None]
        down_bias = torch.stack([s.down_bias for s in group])
    else:
        c = group[0].down.shape[1]
        down = group[0].down.new_zeros(len(group), 1, dim, c)
        up = group[0].up.new_zeros(len(group), 1, c, dim)
        down_bias = group[0].down_bias.new_zeros(len(group), dim)
        for i, s in enumerate(group):
            d = s.down.shape[0]
            down[i, 0, :d], up[i, 0, :, :d], down_bias[i, :d] = s.down, s.up, s.down_bias
    device = down.device
    return LowRankPack(
        (),
        down,
        up,
        torch.zeros(len(group), 1, dtype=torch.int32, device=device),
        torch.ones(len(group), dtype=torch.int32, device=device),
        torch.tensor([s.scale for s in group], dtype=torch.float32, device=device),
        down_bias,
        torch.stack([s.up_bias for s in group]),
        group[0].act,
    )


def pack_scale_shift(
    segments: Sequence[ScaleShiftSegment], dtype: torch.dtype | None = None, cache: PackCache | None = None
) -> list[ScaleShiftPack]:
    """One launch per group of disjoint segments (a missing scale is 1, a missing shift 0)."""
    live = [s for s in segments if s.end > s.start and (s.scale is not None or s.shift is not None)]
    groups = _launch_groups(live, lambda a, b: True)
    packs = []
    for group in groups:
        ranges = tuple((s.start, s.end) for s in group)
        _check_disjoint(ranges)
        tensors = tuple(t for s in group for t in (s.scale, s.shift) if t is not None)
        key = ("scale_shift", tuple((s.scale is None, s.shift is None) for s in group), dtype)
        pack = _cached(cache, key, tensors, lambda g=group: _cast(_stack_scale_shift(g), dtype))
        packs.append(dataclasses.replace(pack, ranges=ranges))
    return packs  # type: ignore[return-value]


def _stack_scale_shift(group: list[ScaleShiftSegment]) -> ScaleShiftPack:
    ref = next(t for s in group for t in (s.scale, s.shift) if t is not None)

    def stack(values: list[torch.Tensor | None], fill: float) -> torch.Tensor | None:
        if all(v is None for v in values):
            return None
        return torch.stack([v if v is not None else torch.full_like(ref, fill) for v in values])

    return ScaleShiftPack((), stack([s.scale for s in group], 1.0), stack([s.shift for s in group], 0.0))

"""Segments -> stacked operands for the Triton kernels (weights stacked by entry, rows split into tiles).

An entry is one row range (one slot's segment); a LoRA entry may hold several column slices (the q / k / v
factors of one adapter on a fused qkv projection). Ranks and slice counts are zero-padded to the largest in the
launch, so padded terms add exact zeros. Segments that cannot share a launch (different output widths, or two
updates of the same rows and columns) go to separate launches, applied in the given order.

Two ways to stack:

- With a `PackCache` and no autograd (inference), every distinct adapter gets a fixed index in a persistent,
  append-only stack per operand shape (a pool, as vLLM's `lora_a_stacked` with its active ids): a launch only
  looks up the indices of its entries and builds (or reuses) its row tiles. A new mix of adapters in a batch
  costs no restacking and no host-to-device copy; only an adapter the pool has not seen is written in, once.
- Otherwise (training, or no cache) the launch's own entries are stacked, differentiably, on every call.

Host metadata (slice columns, slice counts, scales, tiles) reaches the device in one pinned, non-blocking copy per
build, so no path makes the host wait for the GPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .segmented import BottleneckSegment, LoRASegment, ScaleShiftSegment

BLOCK_M = 64  # keep equal to triton_kernels.BLOCK_M
CACHE_BYTES = 1 << 30  # stacked weights kept for reuse, least recently used pools dropped first
MAX_TILE_SETS = 4096  # row tilings kept for reuse (one per distinct batch layout and layer shape)
MAX_PLANS = 4096  # packed launches kept for reuse (one per distinct batch layout and layer)


@dataclass(frozen=True)
class LowRankPack:
    """Operands of one low-rank launch (LoRA: no biases, identity activation; bottleneck adapter: J = 1).

    Attributes:
        ranges: row range of each entry of the launch
        entries: index into the stacked weights of each range's entry
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
    entries: tuple[int, ...]
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
    entries: tuple[int, ...]
    scale: torch.Tensor | None  # (W, C)
    shift: torch.Tensor | None  # (W, C)


@dataclass(frozen=True)
class _Entry:
    """One entry before stacking: `key` identifies its weights (and their version, and the launch's dtype);
    `build()` gives its fields at their own sizes in that dtype, and its small per-entry values still on the host
    (called only for an entry that is stacked now, never for one a pool already holds)."""

    key: Hashable
    sources: tuple[torch.Tensor, ...]
    dtype: torch.dtype
    build: Callable[[], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.data_ptr(), t._version, t.shape, t.stride(), t.dtype, t.device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait (pinned + non-blocking on CUDA; torch's pinned
    allocator keeps the staging memory until the copy has run)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _pad_stack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(len(parts), *max shape): `parts` stacked, each zero-padded at the end of every dim."""
    shape = tuple(max(sizes) for sizes in zip(*(p.shape for p in parts), strict=True))
    if all(p.shape == shape for p in parts):
        return torch.stack(list(parts))
    out = parts[0].new_zeros(len(parts), *shape)
    for i, p in enumerate(parts):
        out[(i, *(slice(0, s) for s in p.shape))] = p
    return out


def _stack_entries(entries: Sequence[_Entry], device: torch.device) -> dict[str, torch.Tensor]:
    """Every field of `entries` stacked along a new dim 0 (zero-padded); host metadata moved in one copy each."""
    built = [e.build() for e in entries]
    fields = {name: _pad_stack([t[name] for t, _ in built]) for name in built[0][0]}
    for name in built[0][1]:
        fields[name] = _to_device(_pad_stack([m[name] for _, m in built]), device)
    return fields


class _Pool:
    """Append-only stack of entries of one operand shape: an entry keeps its index until the pool is dropped.
    Capacity doubles, and padded dims (rank, slices) grow, by one device copy of what is there."""

    def __init__(self) -> None:
        self.index: dict[Hashable, int] = {}
        self.sources: list[tuple[torch.Tensor, ...]] = []  # keeps the weights' storage (and addresses) alive
        self.fields: dict[str, torch.Tensor] = {}
        self.count = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    def add(self, entries: Sequence[_Entry], device: torch.device) -> None:
        block = _stack_entries(entries, device)
        n, capacity = len(entries), next(iter(self.fields.values())).shape[0] if self.fields else 0
        for name, new in block.items():
            old = self.fields.get(name)
            shape = new.shape[1:] if old is None else tuple(map(max, old.shape[1:], new.shape[1:]))
            if old is None or self.count + n > capacity or tuple(old.shape[1:]) != tuple(shape):
                grown = new.new_zeros(max(self.count + n, 2 * capacity), *shape)
                if old is not None:
                    grown[(slice(0, self.count), *(slice(0, s) for s in old.shape[1:]))] = old[: self.count]
                self.fields[name] = old = grown
            old[(slice(self.count, self.count + n), *(slice(0, s) for s in new.shape[1:]))] = new
        for i, e in enumerate(entries):
            self.index[e.key] = self.count + i
            self.sources.append(e.sources)
        self.count += n


class PackCache:
    """Stacked operands kept for reuse while the weights they were built from are unchanged.

    Owned by whoever owns the weights (a model's backbone host has one, shared by its multi-adapter layers and
    cleared when tasks attach or detach), so no model can drop or see another's packs. Weights live in pools keyed
    by operand shape and dtype, their entries keyed on the storage, layout and version of the weights (an in-place
    update or a move makes a new entry); the least recently used pools are dropped past `max_bytes`. Row tilings
    are kept separately, the least recently used dropped past `max_tile_sets`.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES, max_tile_sets: int = MAX_TILE_SETS) -> None:
        self.max_bytes, self.max_tile_sets = max_bytes, max_tile_sets
        self._pools: OrderedDict[Hashable, _Pool] = OrderedDict()
        self._tiles: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._plans: OrderedDict[Hashable, list] = OrderedDict()
        self._generation = 0  # bumped whenever a pool changes: plans built across a change are not kept

    def __len__(self) -> int:
        """Stacked entries held (every pool's)."""
        return sum(p.count for p in self._pools.values())

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._pools.values())

    def __deepcopy__(self, memo: dict) -> PackCache:
        return PackCache(self.max_bytes, self.max_tile_sets)  # a copy of the weights has other storage

    def stacked(
        self, pool_key: Hashable, entries: Sequence[_Entry], device: torch.device
    ) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
        """The pool's stacked fields and the index of each of `entries` in them (unseen entries written in,
        outside inference mode, so that a pack made under `torch.inference_mode()` may later serve autograd)."""
        pool = self._pools.get(pool_key)
        if pool is None:
            pool = self._pools[pool_key] = _Pool()
        self._pools.move_to_end(pool_key)
        missing = list({e.key: e for e in entries if e.key not in pool.index}.values())
        if missing:
            # Plans hold a pool's stacked tensors and name weights by address (which the pool keeps taken): a
            # pool that grows or goes drops them all, so no plan outlives the addresses it names.
            self._plans.clear()
            self._generation += 1
            with torch.inference_mode(False):
                pool.add(missing, device)
                while self.nbytes > self.max_bytes and len(self._pools) > 1:
                    self._pools.popitem(last=False)
                if self.nbytes > self.max_bytes and pool.count > len(entries):  # stale versions: start it over
                    pool = self._pools[pool_key] = _Pool()
                    pool.add(list({e.key: e for e in entries}.values()), device)
        return pool.fields, tuple(pool.index[e.key] for e in entries)

    def tiles(self, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        hit = self._tiles.get(key)
        if hit is not None:
            self._tiles.move_to_end(key)
            return hit
        with torch.inference_mode(False):
            tiles = self._tiles[key] = build()
        if len(self._tiles) > self.max_tile_sets:
            self._tiles.popitem(last=False)
        return tiles

    def plan(self, key: Hashable, build: Callable[[], list]) -> list:
        """The packs of a launch layout, memoised on `key`: the layout and the address and version of every weight
        (valid while the pools that hold those weights, and so their addresses, are kept)."""
        hit = self._plans.get(key)
        if hit is not None:
            self._plans.move_to_end(key)
            return hit
        generation = self._generation
        packs = build()
        if generation == self._generation:
            self._plans[key] = packs
            if len(self._plans) > MAX_PLANS:
                self._plans.popitem(last=False)
        return packs

    def clear(self) -> None:
        """Drop every entry (its weights changed, or it should free their memory now)."""
        self._pools.clear()
        self._tiles.clear()
        self._plans.clear()
        self._generation += 1


def tiles_for(
    ranges: Sequence[tuple[int, int]],
    device: torch.device,
    cache: PackCache | None = None,
    entries: Sequence[int] | None = None,
) -> torch.Tensor:
    """(T, 3) int32 tiles of disjoint row ranges: entry index of the range (`entries[w]`, default w), first row,
    end row (<= BLOCK_M rows)."""
    entries = tuple(range(len(ranges))) if entries is None else tuple(entries)

    def build() -> torch.Tensor:
        tiles = [
            (e, s, min(s + BLOCK_M, end))
            for e, (start, end) in zip(entries, ranges, strict=True)
            for s in range(start, end, BLOCK_M)
        ]
        return _to_device(torch.tensor(tiles, dtype=torch.int32).view(-1, 3), device)

    return build() if cache is None else cache.tiles((tuple(ranges), entries, str(device)), build)


def _stacked(
    kind: Hashable, entries: list[_Entry], cache: PackCache | None
) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    """Stacked fields for `entries` and each one's index: from the cache's pool when nothing needs gradients
    through the weights, else the launch's own stack (indices 0..W-1)."""
    device = entries[0].sources[0].device
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for e in entries for t in e.sources)
    if cache is None or needs_grad:
        return _stack_entries(entries, device), tuple(range(len(entries)))
    return cache.stacked((kind, entries[0].dtype, str(device)), entries, device)


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


def _address(t: torch.Tensor | None) -> tuple[int, int] | None:
    return None if t is None else (t.data_ptr(), t._version)


def _planned(
    cache: PackCache | None, key: Callable[[], Hashable], sources: Callable[[], Any], build: Callable[[], list]
) -> list:
    """`build()`, memoised in `cache` on `key()` when autograd records none of `sources()` (the inference path: a
    repeated batch layout then costs one dict lookup per layer instead of regrouping and rekeying its entries)."""
    if cache is None or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources())):
        return build()
    return cache.plan(key(), build)


def pack_lora(
    segments: Sequence[LoRASegment], dtype: torch.dtype | None = None, cache: PackCache | None = None
) -> list[LowRankPack]:
    """Group LoRA segments into launches: one entry per row range, its column slices side by side (weights cast
    to `dtype` if given)."""
    return _planned(
        cache,
        lambda: (
            "lora",
            dtype,
            *((s.start, s.end, _address(s.lora_a), _address(s.lora_b), s.col, s.scale) for s in segments),
        ),
        lambda: (t for s in segments for t in (s.lora_a, s.lora_b)),
        lambda: _pack_lora(segments, dtype, cache),
    )


def _pack_lora(
    segments: Sequence[LoRASegment], dtype: torch.dtype | None, cache: PackCache | None
) -> list[LowRankPack]:
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
        entries = [_lora_entry(launch[r], dtype) for r in ranges]
        first = launch[ranges[0]][0]
        kind = ("lora", first.lora_a.shape[1], first.lora_b.shape[0])
        f, index = _stacked(kind, entries, cache)
        packs.append(
            LowRankPack(ranges, index, f["down"], f["up"], f["cols"], f["nslices"], f["scale"], None, None, "identity")
        )
    return packs


def _lora_entry(slices: list[LoRASegment], dtype: torch.dtype | None) -> _Entry:
    """The slices of one row range: (J, r, K) / (J, N, r) factors; unequal slice scales are folded into `up`."""
    dtype = dtype or slices[0].lora_a.dtype

    def build() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        down = _pad_stack([s.lora_a.to(dtype) for s in slices])
        up = _pad_stack([s.lora_b.to(dtype) for s in slices])
        scale = slices[0].scale
        if any(s.scale != scale for s in slices):
            factors = torch.tensor([s.scale for s in slices], dtype=torch.float32)
            up = up * factors.to(device=up.device, dtype=up.dtype)[:, None, None]
            scale = 1.0
        meta = {
            "cols": torch.tensor([s.col for s in slices], dtype=torch.int32),
            "nslices": torch.tensor(len(slices), dtype=torch.int32),
            "scale": torch.tensor(scale, dtype=torch.float32),
        }
        return {"down": down, "up": up}, meta

    key = ("lora", tuple((_identity(s.lora_a), _identity(s.lora_b), s.col, s.scale) for s in slices), dtype)
    return _Entry(key, tuple(t for s in slices for t in (s.lora_a, s.lora_b)), dtype, build)


def pack_bottleneck(
    segments: Sequence[BottleneckSegment], dtype: torch.dtype | None = None, cache: PackCache | None = None
) -> list[LowRankPack]:
    """One launch per group of disjoint segments with one activation (J = 1; adapter widths zero-padded)."""
    tensors = ("down", "down_bias", "up", "up_bias")
    return _planned(
        cache,
        lambda: (
            "bottleneck",
            dtype,
            *((s.start, s.end, s.act, s.scale, *(_address(getattr(s, t)) for t in tensors)) for s in segments),
        ),
        lambda: (getattr(s, t) for s in segments for t in tensors),
        lambda: _pack_bottleneck(segments, dtype, cache),
    )


def _pack_bottleneck(
    segments: Sequence[BottleneckSegment], dtype: torch.dtype | None, cache: PackCache | None
) -> list[LowRankPack]:
    groups = _launch_groups([s for s in segments if s.end > s.start], lambda a, b: a.act == b.act)
    packs = []
    for group in groups:
        ranges = tuple((s.start, s.end) for s in group)
        _check_disjoint(ranges)
        entries = [_bottleneck_entry(s, dtype) for s in group]
        kind = ("bottleneck", group[0].act, group[0].down.shape[1])
        f, index = _stacked(kind, entries, cache)
        packs.append(
            LowRankPack(
                ranges, index, f["down"], f["up"], f["cols"], f["nslices"], f["scale"], f["db"], f["ub"], group[0].act
            )
        )
    return packs


def _bottleneck_entry(s: BottleneckSegment, dtype: torch.dtype | None) -> _Entry:
    dtype = dtype or s.down.dtype
    sources = (s.down, s.down_bias, s.up, s.up_bias)

    def build() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        tensors = {"down": s.down.to(dtype)[None], "up": s.up.to(dtype)[None]}
        tensors.update(db=s.down_bias.to(dtype), ub=s.up_bias.to(dtype))
        meta = {
            "cols": torch.zeros(1, dtype=torch.int32),
            "nslices": torch.tensor(1, dtype=torch.int32),
            "scale": torch.tensor(s.scale, dtype=torch.float32),
        }
        return tensors, meta

    return _Entry(("bottleneck", tuple(_identity(t) for t in sources), s.scale, dtype), sources, dtype, build)


def pack_scale_shift(
    segments: Sequence[ScaleShiftSegment], dtype: torch.dtype | None = None, cache: PackCache | None = None
) -> list[ScaleShiftPack]:
    """One launch per group of disjoint segments (a missing scale is 1, a missing shift 0)."""
    return _planned(
        cache,
        lambda: ("scale_shift", dtype, *((s.start, s.end, _address(s.scale), _address(s.shift)) for s in segments)),
        lambda: (t for s in segments for t in (s.scale, s.shift)),
        lambda: _pack_scale_shift(segments, dtype, cache),
    )


def _pack_scale_shift(
    segments: Sequence[ScaleShiftSegment], dtype: torch.dtype | None, cache: PackCache | None
) -> list[ScaleShiftPack]:
    live = [s for s in segments if s.end > s.start and (s.scale is not None or s.shift is not None)]
    packs = []
    for group in _launch_groups(live, lambda a, b: True):
        ranges = tuple((s.start, s.end) for s in group)
        _check_disjoint(ranges)
        entries = [_scale_shift_entry(s, dtype) for s in group]
        channels = next(t for t in (group[0].scale, group[0].shift) if t is not None).shape[0]
        f, index = _stacked(("scale_shift", channels), entries, cache)
        packs.append(ScaleShiftPack(ranges, index, f["scale"], f["shift"]))
    return packs


def _scale_shift_entry(s: ScaleShiftSegment, dtype: torch.dtype | None) -> _Entry:
    """Scale and shift both present (1 and 0 where the segment has none), so entries of any kind share a pool."""
    sources = tuple(t for t in (s.scale, s.shift) if t is not None)
    dtype = dtype or sources[0].dtype

    def build() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        ref = sources[0].to(dtype)
        scale = s.scale.to(dtype) if s.scale is not None else torch.ones_like(ref)
        shift = s.shift.to(dtype) if s.shift is not None else torch.zeros_like(ref)
        return {"scale": scale, "shift": shift}, {}

    key = ("scale_shift", *(None if t is None else _identity(t) for t in (s.scale, s.shift)), dtype)
    return _Entry(key, sources, dtype, build)

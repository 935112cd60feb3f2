"""Per-forward routing metadata: which rows of the batch belong to which task slot.

Rows are sorted by slot once, at the entry of a forward pass, so that every adapted layer sees one contiguous
segment per slot. The `Routing` built for that sorted batch is handed to the layers through the model's
`RoutingContext` (one object shared by all layers of a model, set once per executed backbone part, like vLLM's
LoRA batch metadata); no per-call hooks are installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

PLAIN_SLOT = -1


@dataclass(frozen=True, eq=False)
class Segment:
    """Rows `start:end` of the (sorted) batch all belong to task slot `slot` (>= 0). Bounds are symbolic ints
    while a graph is traced, so segments are kept in lists in row order, never hashed."""

    slot: int
    start: int
    end: int


@dataclass(frozen=True)
class Routing:
    """Segments of a slot-sorted batch whose row counts are Python ints (eager inference and training).

    Attributes:
        num_rows: Rows of the batch (images, or image x task pairs once fanned out).
        segments: One entry per slot >= 0 present, in row order; rows of slot -1 are not listed.
    """

    num_rows: int
    segments: tuple[Segment, ...]

    #: Layers may apply the batched forms (the ops of `multitask_peft.kernels`, in place at inference).
    batched: ClassVar[bool] = True

    @classmethod
    def from_sorted_slots(cls, slots: Sequence[int]) -> Routing:
        segments: list[Segment] = []
        start = 0
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[start]:
                if slots[start] != PLAIN_SLOT:
                    segments.append(Segment(int(slots[start]), start, i))
                start = i
        if any(b.slot <= a.slot for a, b in zip(segments, segments[1:])):
            raise ValueError(f"slots must be sorted ascending, got {list(slots)}")
        return cls(len(slots), tuple(segments))

    def segments_for(self, x: torch.Tensor) -> tuple[Segment, ...]:
        """Segments along dim 0 of `x`, whose leading dim is `num_rows` times a whole number of rows per item
        (e.g. the windows of a Swin block)."""
        n = x.shape[0]
        if self.num_rows == 0 or n % self.num_rows:
            raise RuntimeError(
                f"adapted layer got a tensor with leading dim {n}, not a multiple of the routed batch ({self.num_rows})"
            )
        per_item = n // self.num_rows
        if per_item == 1:
            return self.segments
        return tuple(Segment(s.slot, s.start * per_item, s.end * per_item) for s in self.segments)


@dataclass(frozen=True)
class StackedRouting:
    """Routing of a traced graph (ONNX export): the batch is `len(slots)` equal blocks, block k all of slot
    `slots[k]`. Block sizes stay symbolic (dynamic batch): the segments' bounds are computed from the tensor's
    leading dim, and layers apply the out-of-place `compose` forms (traceable), never the in-place batched ops."""

    slots: tuple[int, ...]

    batched: ClassVar[bool] = False

    def segments_for(self, x: torch.Tensor) -> tuple[Segment, ...]:
        torch._check(x.shape[0] % len(self.slots) == 0, lambda: f"{x.shape[0]} rows are not {len(self.slots)} blocks")
        block = x.shape[0] // len(self.slots)  # symbolic while tracing
        return tuple(Segment(s, k * block, (k + 1) * block) for k, s in enumerate(self.slots) if s != PLAIN_SLOT)


class RoutingContext:
    """Holds the routing of the part being executed; shared by every multi-adapter layer of one model.

    A model instance runs one forward at a time (like a vLLM worker); serving serialises forwards per model.
    """

    def __init__(self) -> None:
        self._current: Routing | StackedRouting | None = None

    @property
    def current(self) -> Routing | StackedRouting:
        if self._current is None:
            raise RuntimeError(
                "an adapted backbone layer ran outside MultiTaskModel.forward_features/predict; "
                "call the model, not its backbone modules, or use model.merged_backbone(task) for a plain module"
            )
        return self._current

    @contextlib.contextmanager
    def use(self, routing: Routing | StackedRouting) -> Iterator[None]:
        previous, self._current = self._current, routing
        try:
            yield
        finally:
            self._current = previous

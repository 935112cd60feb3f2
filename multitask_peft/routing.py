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

import torch

PLAIN_SLOT = -1


@dataclass(frozen=True)
class Segment:
    """Rows `start:end` of the (sorted) batch all belong to task slot `slot` (>= 0)."""

    slot: int
    start: int
    end: int


@dataclass(frozen=True)
class Routing:
    """Segments of a slot-sorted batch.

    Attributes:
        num_rows: Rows of the batch (images, or image x task pairs once fanned out).
        segments: One entry per slot >= 0 present, in row order; rows of slot -1 are not listed.
    """

    num_rows: int
    segments: tuple[Segment, ...]

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

    def scaled(self, rows_per_item: int) -> tuple[Segment, ...]:
        """Segments in units of tensor rows when every batch item spans `rows_per_item` rows (e.g. Swin windows)."""
        if rows_per_item == 1:
            return self.segments
        return tuple(Segment(s.slot, s.start * rows_per_item, s.end * rows_per_item) for s in self.segments)

    def segments_for(self, x: torch.Tensor) -> tuple[Segment, ...]:
        """Segments along dim 0 of `x`, whose leading dim is `num_rows` times a whole number of rows per item."""
        n = x.shape[0]
        if self.num_rows == 0 or n % self.num_rows:
            raise RuntimeError(
                f"adapted layer got a tensor with leading dim {n}, not a multiple of the routed batch ({self.num_rows})"
            )
        return self.scaled(n // self.num_rows)


@dataclass(frozen=True)
class StackedRouting:
    """Routing of a traced graph (ONNX export): the batch is `len(slots)` equal blocks, block k all of slot
    `slots[k]`. Block sizes stay symbolic (dynamic batch), so layers split with tensor ops, not Python ints."""

    slots: tuple[int, ...]


def sort_by_slot(slots: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Stable sort of row slots.

    Returns:
        The permutation `order` (rows in slot order are `x[order]`) and the sorted slots as Python ints.
    """
    order = torch.sort(slots, stable=True).indices
    return order, slots[order].tolist()


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

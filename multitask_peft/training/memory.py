"""What a training step keeps for its backward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def saved_activations(model: nn.Module) -> Iterator[dict[str, int]]:
    """Counts the bytes autograd saves for the backward pass of what runs inside the block, the model's own
    parameters and buffers excluded (they are held anyway): `with saved_activations(model) as kept: loss = ...`,
    then `kept["bytes"]`. Each storage is counted once."""
    weights = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}
    result = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(saved.values())

"""Which tasks a step trains, and each task's infinite, seeded, resumable stream of batches.

Everything here is a pure function of (seed, task, step / epoch, position), so a resumed run draws exactly the
batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from `parts` (stable across processes and Python versions, unlike `hash`)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def task_probabilities(sizes: Sequence[int], sampling: str, temperature: float = 2.0) -> torch.Tensor:
    """Sampling probability of each task: uniform ("round_robin"), ~ size, or ~ size ** (1 / temperature)."""
    n = torch.tensor([float(s) for s in sizes], dtype=torch.float64)
    if sampling == "round_robin":
        weights = torch.ones_like(n)
    elif sampling == "proportional":
        weights = n
    elif sampling == "temperature":
        weights = n ** (1.0 / temperature)
    else:
        raise ValueError(f"sampling must be one of round_robin, proportional, temperature; got {sampling!r}")
    return weights / weights.sum()


def sample_tasks(
    names: Sequence[str], sizes: Sequence[int], step: int, k: int, sampling: str, temperature: float, seed: int
) -> list[str]:
    """The `k` distinct tasks step `step` trains, in the order of `names`; deterministic in (seed, step).

    "round_robin" cycles through the tasks (step s takes tasks s*k .. s*k+k-1 modulo the count); "proportional"
    and "temperature" draw without replacement with the probabilities of `task_probabilities`.
    """
    count = len(names)
    if not 1 <= k <= count:
        raise ValueError(f"tasks per step must be in [1, {count}] for tasks {list(names)}, got {k}")
    if k == count:
        return list(names)
    if sampling == "round_robin":
        picked = {(step * k + j) % count for j in range(k)}
    else:
        probs = task_probabilities(sizes, sampling, temperature)
        gen = torch.Generator().manual_seed(stable_seed(seed, "tasks", step))
        picked = set(torch.multinomial(probs, k, replacement=False, generator=gen).tolist())
    return [name for i, name in enumerate(names) if i in picked]


class _SeededItems(Dataset):
    """Items of one epoch, each fetched under its own torch seed (augmentation independent of worker / resume)."""

    def __init__(self, dataset: Any, order: list[int], seed: int) -> None:
        self.dataset, self.order, self.seed = dataset, order, seed

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> Any:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG untouched
            torch.manual_seed(stable_seed(self.seed, k))
            return self.dataset[self.order[k]]


class TaskStream:
    """An endless stream of batches of one task's dataset, reshuffled every epoch, resumable.

    Epoch `e` visits the dataset in a permutation drawn from a generator seeded by (seed, task, e), cut into
    `len // batch_size` full batches (one short batch if the dataset is smaller than a batch). `state()` is
    the position (epoch, batches consumed); a stream built with that position continues with the same batches.
    Each item is fetched under a seed of its own, so random augmentations also repeat exactly.

    Data-parallel: `batch_size` is the GLOBAL batch; rank r of `world_size` yields the r-th of `world_size` equal
    consecutive slices of each global batch, so the union over ranks of their k-th batches is exactly the k-th
    batch of a single stream (same items, same item seeds). Positions count global batches (same on every rank).

    Args:
        task: Task name (part of the seeds).
        dataset: Map-style dataset of (image, target) pairs.
        batch_size: Batch size.
        collate: Batches a list of items.
        seed: Run seed.
        num_workers: DataLoader workers (0: items are read in this process).
        epoch: Start epoch.
        position: Batches of `epoch` already consumed.
        rank: This process's rank (data-parallel training).
        world_size: Number of processes; the global batch is cut to a multiple of it.
    """

    def __init__(
        self,
        task: str,
        dataset: Any,
        batch_size: int,
        collate: Callable[[list], Any],
        seed: int,
        num_workers: int = 0,
        epoch: int = 0,
        position: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.task, self.dataset, self.collate = task, dataset, collate
        if not 0 <= rank < world_size:
            raise ValueError(f"task {task!r}: rank {rank} outside [0, {world_size})")
        if len(dataset) < world_size:
            raise ValueError(f"task {task!r}: {len(dataset)} items cannot give each of {world_size} ranks one")
        self.batch_size = min(batch_size, len(dataset) // world_size * world_size)  # global batch
        self.local_batch_size = self.batch_size // world_size
        self.rank = rank
        self.seed, self.num_workers = seed, num_workers
        self.batches_per_epoch = len(dataset) // self.batch_size
        if not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"task {task!r}: stream position {position} outside [0, {self.batches_per_epoch})")
        self.epoch, self.position = epoch, position
        self._iter: Any = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def _open_epoch(self) -> None:
        gen = torch.Generator().manual_seed(stable_seed(self.seed, self.task, "epoch", self.epoch))
        order = torch.randperm(len(self.dataset), generator=gen).tolist()
        items = _SeededItems(self.dataset, order, stable_seed(self.seed, self.task, "items", self.epoch))
        bs, local = self.batch_size, self.local_batch_size
        first = self.rank * local  # this rank's slice of each global batch
        batches = [
            list(range(b * bs + first, b * bs + first + local)) for b in range(self.position, self.batches_per_epoch)
        ]
        if self.num_workers == 0:
            self._iter = (self.collate([items[k] for k in batch]) for batch in batches)
        else:
            loader = DataLoader(
                items,
                batch_sampler=batches,
                collate_fn=self.collate,
                num_workers=self.num_workers,
                generator=torch.Generator().manual_seed(stable_seed(self.seed, self.task, "loader", self.epoch)),
            )
            self._iter = iter(loader)

    def __iter__(self) -> TaskStream:
        return self

    def __next__(self) -> Any:
        if self._iter is None:
            self._open_epoch()
        batch = next(self._iter)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._iter = self.epoch + 1, 0, None
        return batch

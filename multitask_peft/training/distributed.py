"""Data-parallel training across processes (`torchrun`): process-group set-up and gradient / loss averaging.

Rank r of W processes trains on its share of every task's global batch (`TaskStream(rank=r, world_size=W)`),
runs its own routed forward / backward, and then `average_gradients` averages the gradients of every trainable
parameter (and the step's losses) across ranks with ONE flattened `all_reduce`. All ranks start from the same
weights and apply the same averaged gradients, so they stay identical without any broadcast.

A manual all-reduce rather than `DistributedDataParallel`: our routed model leaves the parameters of tasks a step
does not train without gradients (DDP would need `find_unused_parameters=True`, a wrapper around a model whose
forward returns per-task dicts, `no_sync` for `grad_accum`, and it would also sync the frozen backbone's
buffers); one all-reduce per optimizer step after all micro-batches is simpler and exact.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands in data-parallel training (rank 0 of 1 when not distributed).

    Args:
        rank: This process's rank.
        world_size: Number of processes.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, logs, TensorBoard files and the progress bar."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device: torch.device) -> DistContext:
    """The data-parallel context of this process, initialising the process group from torchrun's env if needed.

    Uses an already initialised default process group; otherwise, if `WORLD_SIZE` > 1 (as set by `torchrun`),
    initialises one with `init_method="env://"` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): NCCL when the model
    is on CUDA, gloo on CPU. A group initialised here is destroyed at interpreter exit.

    Args:
        device: The device of the model (and of the gradients to average).

    Raises:
        RuntimeError: torchrun-style env vars are incomplete, or the group's backend cannot hold `device` tensors.
        ValueError: The model is on a CUDA device other than `cuda:LOCAL_RANK`.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl" and device.type != "cuda":
            raise RuntimeError(f"the process group uses NCCL but the model is on {device}; use gloo for CPU training")
        return DistContext(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world} but {missing} are not set; launch with `torchrun --nproc_per_node=N ...` "
            "or initialise torch.distributed yourself before building the Trainer"
        )
    backend = "gloo"
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index is not None and device.index != local_rank:
            raise ValueError(
                f"the model is on {device} but this process has LOCAL_RANK={local_rank}; move the model to "
                f"cuda:{local_rank} so that each rank uses its own GPU"
            )
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    dist.init_process_group(backend, init_method="env://")
    atexit.register(_destroy)
    return DistContext(dist.get_rank(), dist.get_world_size())


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: Sequence[torch.nn.Parameter], scalars: torch.Tensor, world_size: int) -> torch.Tensor:
    """Average `params`' gradients and the vector `scalars` across ranks with one flattened all_reduce.

    A missing gradient counts as zeros; a parameter gets a gradient if any rank had one, and keeps `grad=None`
    only if it had none on every rank (so AdamW skips exactly the parameters a single process would skip).

    Args:
        params: The optimised parameters, in the same order on every rank.
        scalars: (K,) values to average as well (e.g. the step's per-task losses).
        world_size: Number of ranks.

    Returns:
        (K,) the averaged `scalars` (float32).
    """
    device = scalars.device
    flat = [
        p.grad.detach().reshape(-1).float()
        if p.grad is not None
        else torch.zeros(p.numel(), dtype=torch.float32, device=device)
        for p in params
    ]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float32, device=device)
    buffer = torch.cat([*flat, has_grad, scalars.float()])  # (sum numel + P + K,)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    buffer /= world_size
    sizes = [p.numel() for p in params]
    grads = buffer[: sum(sizes)].split(sizes)
    flags = buffer[sum(sizes) : sum(sizes) + len(params)]
    for p, g, flag in zip(params, grads, flags.tolist()):
        if flag > 0:
            p.grad = g.view_as(p).to(p.dtype).clone()
    return buffer[sum(sizes) + len(params) :]

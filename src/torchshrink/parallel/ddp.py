"""Helpers that make code run unchanged in one process or under ``torchrun`` (gloo or NCCL).

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init_from_env` starts the process
group from them once, and every helper degrades to the single-process answer without it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env() -> DistInfo:
    """Start the process group if torchrun launched us (gloo on CPU, NCCL on GPU); else one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        log.info("process group started: backend=%s world_size=%d", backend, world_size)
    return current()


def current() -> DistInfo:
    """The DistInfo of this process (single-process when no group is running)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(info: DistInfo) -> torch.device:
    """The device this rank trains on: its own GPU under NCCL, else the CPU."""
    if torch.cuda.is_available() and info.distributed:
        return torch.device("cuda", info.local_rank)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over all ranks (the value itself in one process)."""
    info = current()
    if not info.distributed:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def all_gather_object(value: object) -> list[object]:
    """``value`` from every rank, in rank order (``[value]`` in one process)."""
    info = current()
    if not info.distributed:
        return [value]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: object, src: int = 0) -> object:
    """Rank ``src``'s ``value`` on every rank (``value`` itself in one process): one decision, not
    one per rank (a choice made from timings differs between processes)."""
    if not current().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if current().distributed:
        dist.barrier()

"""The process group of a multi-process run and the data-parallel view of it (Shard): which items a rank takes and
how per-item results come back together.

Under `torchrun` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment) join_environment() joins the group
torchrun describes: gloo for CPU tensors, NCCL for CUDA ones (one backend string, "cpu:gloo,cuda:nccl", so the small
host-side reductions of data parallelism use gloo even on GPUs). A plain process is a group of one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# How long a collective waits for a missing rank before it raises (gloo and NCCL both honour it).
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel job: rank of world_size (0 of 1 without a group)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes."""
        return self.rank == 0

    def take(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every world_size-th from its rank on (strided, so sorted work spreads evenly)."""
        return list(items[self.rank :: self.world_size])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (the tensor itself in a group of one)."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, item: T) -> list[T]:
        """Every rank's item (a picklable object), in rank order."""
        if self.world_size == 1:
            return [item]
        items: list = [None] * self.world_size
        dist.all_gather_object(items, item)
        return items


def environment_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be a positive integer, got {value!r}") from None
    if size < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer, got {value!r}")
    return size


def join_environment(timeout_s: float = DEFAULT_TIMEOUT_S) -> Shard:
    """Join the process group torchrun's environment describes (once per process), or a Shard of one without it."""
    if environment_world_size() == 1:
        return Shard()
    if not dist.is_initialized():
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"WORLD_SIZE is set but {name} is not: start the processes with torchrun")
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Shard(dist.get_rank(), dist.get_world_size())


def local_device(requested: str | None) -> str:
    """The device of this rank: requested as is on CPU; on CUDA, cuda:LOCAL_RANK (one GPU per process)."""
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device

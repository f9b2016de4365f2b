"""Who am I in the (rank, worker) grid? Used to give every process its own stream and its own cases."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.utils.data import get_worker_info


@dataclass(frozen=True)
class Shard:
    rank: int
    world_size: int
    worker: int
    num_workers: int

    @property
    def index(self) -> int:
        """Position of this (rank, worker) among all rank*worker streams."""
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def current_shard(rank: int | None = None, world_size: int | None = None) -> Shard:
    """The calling process's shard; rank/world default to torch.distributed's (or 0/1)."""
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return Shard(rank, world_size, worker, num_workers)


def split_evenly(n: int, parts: int, i: int) -> tuple[int, int]:
    """[start, stop) of part ``i`` when ``n`` items are split into ``parts`` nearly equal runs."""
    base, extra = divmod(n, parts)
    start = i * base + min(i, extra)
    return start, start + base + (1 if i < extra else 0)

"""Data-parallel prompt sweeps under ``torchrun``: each rank a shard, results gathered.

Sweeps over prompt batches (``captum-relp ioi``) are embarrassingly parallel. Under
``torchrun --nproc_per_node N`` every rank loads the model, takes batches
``rank, rank + N, ...`` and the per-batch results are gathered in the original order,
so the outcome equals a single-process run (same batches, same padding). The
process group is created from torchrun's environment (``gloo`` on CPU, ``nccl`` on
GPU) when it does not exist yet.

Example:
    >>> world = DataParallelSweep()  # a single process: one shard, nothing to gather
    >>> world.rank, world.world_size, list(world.shard(range(3)))
    (0, 1, [0, 1, 2])
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import torch


def init_from_env(backend: Optional[str] = None) -> bool:
    """Create the default process group from torchrun's environment variables.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default ``nccl`` when CUDA is available, else ``gloo``.

    Returns:
        True when running with more than one process (a group exists afterwards).

    Example:
        >>> init_from_env()  # not under torchrun
        False
    """
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend)
    return True


def leave_process_group(barrier: bool = True) -> None:
    """Destroy the default process group, after a barrier when every rank finished its work.

    A gloo group left to the interpreter's exit can abort a rank ("terminate called without an
    active exception"), so commands leave it explicitly. Nothing happens without a group.

    Example:
        >>> leave_process_group()  # not under torchrun: no group
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def local_rank() -> int:
    """``LOCAL_RANK`` from torchrun's environment (0 outside torchrun).

    Example:
        >>> isinstance(local_rank(), int)
        True
    """
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str) -> str:
    """``cuda`` becomes ``cuda:<LOCAL_RANK>`` under torchrun; other devices are kept.

    Example:
        >>> rank_device("cpu")
        'cpu'
    """
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{local_rank()}"
    return device


class DataParallelSweep:
    """The current rank's share of a sweep and the gathering of its results.

    Args:
        rank, world_size: Default: from the initialised default process group, else ``0, 1``.

    Example:
        >>> sweep = DataParallelSweep(rank=1, world_size=2)
        >>> list(sweep.shard(range(5)))
        [1, 3]
    """

    def __init__(self, rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
        import torch.distributed as dist

        active = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if active else 0)
        self.world_size = world_size if world_size is not None else (
            dist.get_world_size() if active else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes outputs)."""
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> Sequence[Any]:
        """Items ``rank, rank + world_size, ...``."""
        return items[self.rank::self.world_size]

    def gather(self, mine: List[Any], n_items: int) -> List[Any]:
        """This rank's per-item results (in shard order) -> every item's result, in order.

        All ranks receive the full list (``all_gather_object``); tensors should be on the CPU.
        """
        if self.world_size == 1:
            return list(mine)
        import torch.distributed as dist

        parts: List[Optional[List[Any]]] = [None] * self.world_size
        dist.all_gather_object(parts, list(mine))
        out: List[Any] = [None] * n_items
        for rank, part in enumerate(parts):
            for offset, value in enumerate(part or []):
                out[rank + offset * self.world_size] = value
        return out

    def sum(self, values: Dict[str, float]) -> Dict[str, float]:
        """Per-key sums over ranks (e.g. seconds spent per method)."""
        if self.world_size == 1:
            return dict(values)
        import torch.distributed as dist

        parts: List[Optional[Dict[str, float]]] = [None] * self.world_size
        dist.all_gather_object(parts, dict(values))
        return {key: float(sum(p[key] for p in parts if p)) for key in values}


__all__ = ["DataParallelSweep", "init_from_env", "leave_process_group", "local_rank", "rank_device"]

"""Tensor-parallel state: this process's rank, the world size, and the three collectives we use.

The whole torch.distributed world is one tensor-parallel group (no pipeline parallelism), so
rank == tp rank. Every collective is a no-op at world size 1, which keeps single-device runs free
of any torch.distributed dependency.

`shard` lets a weight loader read only this rank's part of a checkpoint tensor: it accepts a
loaded `torch.Tensor` or a lazy safetensors slice (`safe_open(...).get_slice(name)`), so a rank
of a large model never materialises the other ranks' rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def get_tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_tp_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _active() -> bool:
    return get_tp_size() > 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over ranks, in place."""
    if _active():
        dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (rank order)."""
    if not _active():
        return x
    parts = [torch.empty_like(x) for _ in range(get_tp_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `x` on every rank with rank `src`'s value, in place."""
    if _active():
        dist.broadcast(x, src=src)
    return x


def full_shape(loaded: Any) -> list[int]:
    """Shape of a checkpoint tensor or lazy safetensors slice."""
    return list(loaded.shape) if isinstance(loaded, torch.Tensor) else list(loaded.get_shape())


def shard(loaded: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """Rows [start, start + size) of `loaded` along `dim`, reading only those from disk."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = tuple([slice(None)] * dim + [slice(start, start + size)])
    return loaded[index]


def materialize(loaded: Any) -> torch.Tensor:
    """The whole tensor (for replicated parameters)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]

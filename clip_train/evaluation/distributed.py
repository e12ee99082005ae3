"""Splitting evaluation work over ranks and gathering the results in order.

Each of W ranks embeds a contiguous slice of the N items (`rank_range`: sizes differ by at most one, so
no rank waits much on another); the slices are padded to a common length, all-gathered, and the padding
dropped again (`gather_rows`), giving every rank the same (N, D) tensor in the original item order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

AllGather = Callable[[Tensor], Tensor]
"""Takes this rank's tensor (same shape on every rank), returns (world, *shape) with rank r's at index r."""


def rank_range(n: int, rank: int, world: int) -> range:
    """The items [start, stop) that `rank` of `world` handles: contiguous, sizes ⌈n/W⌉ or ⌊n/W⌋."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, world) with world >= 1, got rank {rank} of {world}")
    if n < 0:
        raise ValueError(f"the number of items must be >= 0, got {n}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def gather_rows(local: Tensor, n: int, rank: int, world: int, all_gather: AllGather | None) -> Tensor:
    """Every rank's `rank_range` slice of N rows, concatenated in rank order → (N, ...) on every rank.

    `local` holds this rank's rows (len(rank_range(n, rank, world)) of them). With world == 1 it is
    returned as is and `all_gather` is not needed."""
    expected = len(rank_range(n, rank, world))
    if local.shape[0] != expected:
        raise ValueError(f"rank {rank} of {world} holds {local.shape[0]} rows, expected {expected} of {n}")
    if world == 1:
        return local
    if all_gather is None:
        raise ValueError(f"gathering over {world} ranks needs an all_gather function")
    longest = len(rank_range(n, 0, world))
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    stacked = all_gather(padded)  # (world, longest, ...)
    if stacked.shape[:2] != (world, longest):
        raise ValueError(
            f"all_gather returned shape {tuple(stacked.shape)}, expected ({world}, {longest}, ...)"
        )
    return torch.cat([stacked[r, : len(rank_range(n, r, world))] for r in range(world)])


def torch_all_gather(tensor: Tensor) -> Tensor:
    """`AllGather` over torch.distributed's default process group."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def gather_embeddings(
    local: Tensor, n: int, rank: int, world: int, all_gather: AllGather | None, device: torch.device
) -> Tensor:
    """`gather_rows` of CPU features, exchanged on `device` (NCCL needs GPU tensors); returns CPU (N, D)."""
    if world == 1:
        return local
    return gather_rows(local.to(device), n, rank, world, all_gather).cpu()

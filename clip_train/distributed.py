"""Collectives for the contrastive loss: an all-gather that carries gradients, and rank helpers.

Why the gradient of a gathered tensor is summed across ranks
------------------------------------------------------------
With data parallelism over W ranks, rank r holds the embeddings e_r of its own n samples and computes
its share L_r of the loss: its rows against the columns of every rank (so L_r depends on all e_s through
the gather). Shares are normalised so that the full-batch loss is their mean, L = (1/W) Σ_r L_r.

The model parameters θ are the same on every rank, and θ reaches the loss only through the embeddings, so

    dL/dθ = Σ_r (∂L/∂e_r)(∂e_r/∂θ),   with   ∂L/∂e_r = (1/W) Σ_s ∂L_s/∂e_r.

Rank r can compute ∂e_r/∂θ only for its own e_r, so it must receive Σ_s ∂L_s/∂e_r — the contributions of
*every* rank's share to *its* embeddings. That is what this backward does: each rank back-propagates its
own L_r to the whole gathered (W·n, D) tensor, the W gradients are summed (an all-reduce, of which each
rank keeps its slice; a reduce-scatter would do the same), and rank r gets Σ_s ∂L_s/∂e_r. Its parameter
gradient is then Σ_s ∂L_s/∂e_r · ∂e_r/∂θ, and DistributedDataParallel's averaging over ranks gives

    (1/W) Σ_r Σ_s ∂L_s/∂e_r · ∂e_r/∂θ = Σ_r ∂L/∂e_r · ∂e_r/∂θ = dL/dθ,

the full-batch gradient. Keeping only the local slice of rank r's own gradient, ∂L_r/∂e_r, as
`torch.distributed.all_gather` (no gradient at all) or a naive slice would, loses every term in which
another rank's share uses e_r as a negative, and the averaged gradient is then wrong, not merely noisy.

A consequence worth knowing (used by gradient caching): after backward, the gradient that lands on rank
r's local embeddings is Σ_s ∂L_s/∂e_r = W · ∂L/∂e_r, i.e. W times the full-batch gradient's slice; DDP's
division by W in the parameter all-reduce is what brings it back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# Room for shapes of up to this many dimensions in the cross-rank shape check.
_MAX_DIMS = 8


def is_distributed() -> bool:
    """True when torch.distributed is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in `group` (default: the world); 1 when not running distributed."""
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in `group` (default: the world); 0 when not running distributed."""
    return dist.get_rank(group) if is_distributed() else 0


def _check_same_shape(tensor: Tensor, group: dist.ProcessGroup | None) -> None:
    """Raise on every rank (not just one, so that no rank is left waiting) if the shapes differ."""
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"all_gather_with_grad supports up to {_MAX_DIMS} dimensions, got {tensor.dim()}")
    meta = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64, device=tensor.device)
    meta[0] = tensor.dim()
    meta[1 : 1 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    metas = [torch.empty_like(meta) for _ in range(dist.get_world_size(group))]
    dist.all_gather(metas, meta, group=group)
    shapes = [tuple(m[1 : 1 + int(m[0])].tolist()) for m in metas]
    if any(s != shapes[0] for s in shapes):
        listing = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
        raise ValueError(
            f"all_gather_with_grad needs the same tensor shape on every rank (equal per-rank batch sizes), "
            f"got {listing}"
        )


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's tensor along dim 0. Backward: sum over ranks, keep our slice."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor, group=group)
        ctx.group = group
        ctx.rows = slice(dist.get_rank(group) * tensor.shape[0], (dist.get_rank(group) + 1) * tensor.shape[0])
        return torch.cat(parts)  # (W·n, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # Σ_s ∂L_s/∂(gathered); see the module docstring. A copy, since autograd owns `grad`. gloo has no
        # reduce-scatter, so all-reduce the (W·n, D) gradient and keep our rows: embeddings are small.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rows], None


def all_gather_with_grad(
    tensor: Tensor, group: dist.ProcessGroup | None = None, check_shapes: bool = True
) -> Tensor:
    """Gather `tensor` from every rank, concatenated along dim 0 in rank order, differentiably.

    Args:
        tensor: (n, ...) this rank's part; every rank must pass the same shape and dtype.
        group: process group (default: the world).
        check_shapes: compare shapes across ranks first (one tiny extra collective) and raise a clear
            `ValueError` on all ranks if they differ, instead of failing inside the collective.

    Returns:
        (W·n, ...) where W is the group's size; rows [r·n, (r+1)·n) are rank r's. The backward pass sums
        the incoming gradient over ranks and returns this rank's rows (see the module docstring for why).
        When not running distributed, or with a single rank, returns `tensor` itself.
    """
    if not is_distributed() or dist.get_world_size(group) == 1:
        return tensor
    if check_shapes:
        _check_same_shape(tensor, group)
    return _AllGatherWithGrad.apply(tensor, group)

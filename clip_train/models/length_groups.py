"""Text encoded in length groups: each caption padded only as far as its group needs.

Captions are padded to the context length (77), but most web alt texts are far shorter, and at 77 tokens the
text tower costs about 40% of ViT-B/32's FLOPs. Trimming a whole batch to its longest caption saves little
(in a batch of a few hundred web captions the longest is nearly always long), so the batch is sorted by
length, cut into a few groups of equal size, each group is padded only to its own longest caption (rounded
up to a multiple of 8, which keeps the number of distinct shapes, and so of `torch.compile` recompilations,
bounded), encoded, and the features are put back in the batch's order.

This is exact: the text tower treats every caption on its own (no batch statistics), and its attention is
causal, so the padding after a caption's end-of-text token never reaches the features read there. Only the
order of floating-point sums inside matrix products may differ with the shapes (fp32 rounding).

The lengths are plain integers computed by the data-loader workers, so planning the groups needs no
device synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

PAD_MULTIPLE = 8


def plan_length_groups(
    lengths: Sequence[int], groups: int, context_length: int, multiple: int = PAD_MULTIPLE
) -> list[tuple[list[int], int]]:
    """(row indices, padded width) for each of `groups` groups: rows sorted by length, split into parts of
    (nearly) equal size, each padded to its longest length rounded up to `multiple`, at most
    `context_length`. Always exactly `groups` groups, empty ones included: under FSDP and ZeRO-3 every call
    of the text tower gathers parameters from all ranks, so every rank must call it equally often."""
    if groups < 1:
        raise ValueError(f"need at least one length group, got {groups}")
    n = len(lengths)
    order = sorted(range(n), key=lambda i: lengths[i])
    plan: list[tuple[list[int], int]] = []
    for g in range(groups):
        rows = order[g * n // groups : (g + 1) * n // groups]
        longest = lengths[rows[-1]] if rows else 1
        if not 0 < longest <= context_length:
            raise ValueError(f"caption length {longest} is outside 1..{context_length} (the context length)")
        plan.append((rows, min(context_length, -(-longest // multiple) * multiple)))
    return plan


def encode_in_length_groups(
    encode: Callable[[Tensor], Tensor], tokens: Tensor, lengths: Sequence[int], groups: int
) -> Tensor:
    """`encode(tokens)` computed group by group (see the module docstring); rows in the order of `tokens`.

    tokens: (B, L) ids; lengths: B integers, each row's length up to and including its end-of-text token."""
    if len(lengths) != tokens.shape[0]:
        raise ValueError(f"{len(lengths)} caption lengths for a batch of {tokens.shape[0]} captions")
    parts, order = [], []
    for rows, width in plan_length_groups(lengths, groups, tokens.shape[1]):
        index = torch.tensor(rows, dtype=torch.long).to(tokens.device, non_blocking=True)
        parts.append(encode(tokens.index_select(0, index)[:, :width]))
        order.extend(rows)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return torch.cat(parts).index_select(0, back.to(tokens.device, non_blocking=True))

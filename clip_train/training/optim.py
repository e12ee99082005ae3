"""AdamW parameter groups and the warm-up + cosine learning-rate schedule of the CLIP paper."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

# Prefixes that wrappers put into parameter names (FSDP units, activation checkpointing, torch.compile).
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A parameter's name with every wrapper's prefix removed, as the unwrapped model names it."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def decayed_parameter_names(model: nn.Module, no_decay_names: Iterable[str] | None = None) -> set[str]:
    """Names of the parameters that get weight decay: weight matrices only.

    CLIP (Radford et al., 2021, section 2.5) applies weight decay to weight matrices only: gains, biases,
    embeddings and the temperature are left alone. `no_decay_names` lists parameters to exempt beyond the
    default rule (every tensor with fewer than 2 dimensions: gains, biases and the temperature). Decide this
    on the unwrapped model: FSDP replaces every parameter by a 1-D view of its shard.
    """
    exempt = set(no_decay_names or ())
    return {
        unwrapped_name(name)
        for name, param in model.named_parameters()
        if param.requires_grad and param.ndim >= 2 and unwrapped_name(name) not in exempt
    }


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_names: Iterable[str] | None = None,
    decayed_names: set[str] | None = None,
) -> list[dict]:
    """Split trainable parameters into a decayed group (weight matrices) and an undecayed one.

    `decayed_names`: the decision made earlier by `decayed_parameter_names` (before a sharded strategy
    changed the parameters' shapes); None decides it now from `model` and `no_decay_names`.
    """
    if decayed_names is None:
        decayed_names = decayed_parameter_names(model, no_decay_names)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if unwrapped_name(name) in decayed_names else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine_lambda(
    warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimiser step `step`: linear warm-up, then cosine decay."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
    fixed_total_steps: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler; call `.step()` after every optimiser step.

    total_steps: the run's length, which the training module passes (from max_steps or max_epochs).
    fixed_total_steps: the steps the cosine spans whatever the run's length, so that a run stopped early
        and resumed with a larger max_steps keeps the learning rate it would have had (with the default,
        None, raising max_steps stretches the cosine and the learning rate jumps back up)."""
    span = total_steps if fixed_total_steps is None else fixed_total_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine_lambda(warmup_steps, span, min_lr_ratio)
    )


def warmup_constant_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then the base learning rate (`total_steps` is accepted for a uniform signature)."""
    if warmup_steps < 0:
        raise ValueError(f"need warmup_steps >= 0, got {warmup_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup_steps if step < warmup_steps else 1.0
    )

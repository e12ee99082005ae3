"""What training under the sharded strategies (DeepSpeed ZeRO, FSDP) needs beyond DDP.

Three things differ from DDP: the strategies refuse 0-dim parameters; outside the wrapped module's own
forward pass a parameter may hold only this rank's shard (FSDP, ZeRO-3), and every forward pass gathers
the shards from all ranks, so evaluation and validation, whose batch counts differ between ranks, run a
plain copy of the model (`unsharded_model`); and under FSDP the training module wraps the model itself
(`wrap_for_fsdp`) rather than letting Lightning wrap the module.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy, StrategyRegistry
from torch import nn

from clip_train.models.modified_resnet import Bottleneck
from clip_train.models.transformer import ResidualAttentionBlock
from clip_train.training.optim import unwrapped_name

SHARDED_STRATEGIES = (DeepSpeedStrategy, FSDPStrategy)


def is_sharded(strategy: Strategy | str) -> bool:
    """DeepSpeed or FSDP, given as an object or as a registered name such as "deepspeed_stage_3"."""
    if isinstance(strategy, str):
        return strategy in StrategyRegistry and is_sharded_class(StrategyRegistry[strategy]["strategy"])
    return isinstance(strategy, SHARDED_STRATEGIES)


def is_sharded_class(strategy_class: type) -> bool:
    return isinstance(strategy_class, type) and issubclass(strategy_class, SHARDED_STRATEGIES)


def promote_scalar_parameters(module: nn.Module) -> list[str]:
    """Give every 0-dim parameter (the temperature, SigLIP's bias) the shape (1,), in place; returns their
    names. DeepSpeed broadcasts each parameter through a byte view, which a 0-dim bf16 tensor cannot take,
    and FSDP refuses 0-dim parameters outright (both seen on an H200 with torch 2.11). Checkpoints written
    this way load back into the 0-dim model (`clip_train.checkpoints` reshapes one-element tensors)."""
    names = []
    for name, param in module.named_parameters():
        if param.dim() == 0:
            param.data = param.data.reshape(1)
            names.append(name)
    return names


class ValidatingDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, with the validation step called directly rather than through the
    engine's forward pass (the trainer=deepspeed_zero* configs use it).

    Validation runs a plain copy of the model (`unsharded_model`), as ranks hold different numbers of
    validation batches. Lightning would still route each validation step through the engine's forward,
    where ZeRO-3's hooks gather parameters from all ranks: the rank with more batches then waits forever
    (seen on CPU processes)."""

    def validation_step(self, *args, **kwargs):
        assert self.lightning_module is not None
        with self.precision_plugin.val_step_context():
            return self.lightning_module.validation_step(*args, **kwargs)


# The modules FSDP shards as units of their own: each residual block of either tower. One unit for the whole
# model would gather every parameter for the forward pass, which is what sharding is meant to avoid.
FSDP_UNITS = frozenset({ResidualAttentionBlock, Bottleneck})


def wrap_for_fsdp(strategy: FSDPStrategy, model: nn.Module) -> nn.Module:
    """`model` wrapped in FSDP with the strategy's settings, one unit per residual block (unless the
    strategy config names its own auto_wrap_policy). Call it from LightningModule.configure_model.

    Why not let Lightning wrap the whole LightningModule, as it does by default: the training step then
    runs inside FSDP's forward pass, and our optimisation is manual, so the backward pass would run inside
    the forward too, which FSDP refuses ("Expects BACKWARD_PRE or BACKWARD_POST state but got
    HandleTrainingState.FORWARD", Lightning issues #19626 and #19685). Wrapping the model inside the module
    keeps forward and backward apart; Lightning leaves a module that already holds FSDP units unwrapped."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, wrap

    if "auto_wrap_policy" in strategy.kwargs:
        return wrap(model)
    return wrap(model, auto_wrap_policy=ModuleWrapPolicy(FSDP_UNITS))


@contextlib.contextmanager
def full_parameters(strategy: Strategy, module: nn.Module) -> Iterator[None]:
    """Every parameter of `module` whole on this rank for the duration (read-only use: changes are not
    written back). A no-op unless the strategy shards parameters (FSDP, DeepSpeed ZeRO stage 3)."""
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(strategy.model, writeback=False, recurse=True):
            yield
    elif deepspeed_stage(strategy) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def shards_parameters(strategy: Strategy) -> bool:
    """Whether parameters live sharded between forward passes: FSDP and DeepSpeed ZeRO stage 3."""
    return isinstance(strategy, FSDPStrategy) or deepspeed_stage(strategy) == 3


@contextlib.contextmanager
def unsharded_model(strategy: Strategy, model: nn.Module) -> Iterator[nn.Module]:
    """The CLIP model to run outside training (evaluation, validation): `model` itself without wrappers,
    or, where the strategy shards parameters, a plain copy of it holding the full parameters.

    Under FSDP and ZeRO-3 every forward pass of the sharded model gathers parameters from all ranks (FSDP's
    units and ZeRO-3's hooks do so even inside `full_parameters`), so ranks running different numbers of
    batches, as evaluation and validation do when their sets split unevenly, would wait on each other
    forever (seen on CPU processes). The copy runs with no collective at all; it costs one more full copy
    of the model on each rank while it lives."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    bare = getattr(model, "_orig_mod", model)
    if isinstance(bare, FullyShardedDataParallel):
        bare = bare.module
    if not shards_parameters(strategy):
        yield bare
        return
    with torch.device(strategy.root_device):
        plain = type(bare)(bare.config).train(bare.training)
    with full_parameters(strategy, model), torch.no_grad():
        whole = {
            unwrapped_name(n): t for n, t in itertools.chain(bare.named_parameters(), bare.named_buffers())
        }
        for name, target in itertools.chain(plain.named_parameters(), plain.named_buffers()):
            target.copy_(whole[name].reshape(target.shape))  # reshape: promoted scalars back to 0-dim
    yield plain


def deepspeed_stage(strategy: Strategy) -> int | None:
    """The ZeRO stage of a DeepSpeed strategy (0 without ZeRO), None for any other strategy."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return None
    return int(strategy.config.get("zero_optimization", {}).get("stage", 0))


@torch.no_grad()
def clamp_master_copy_(strategy: Strategy, param: nn.Parameter, max_value: float) -> None:
    """Clamp DeepSpeed's fp32 master copy of `param` at `max_value` (ZeRO stages 1 and 2).

    Under DeepSpeed the optimiser steps fp32 master copies and then overwrites the model's (bf16)
    parameters from them, so clamping the model's parameter alone is undone at the next step; the master
    copy is clamped here. Under ZeRO-3, DeepSpeed 0.19.8's safe_set_full_fp32_param fails on a
    one-element parameter split over ranks, so nothing is done: there, as under every strategy, the
    model's forward pass clamps the temperature it uses (CLIP.logit_scale_and_bias)."""
    if deepspeed_stage(strategy) not in (1, 2):
        return
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    master = safe_get_full_fp32_param(param)
    if master is not None and bool((master > max_value).any()):
        safe_set_full_fp32_param(param, master.clamp(max=max_value))

"""Exact gradient caching: the parameter gradients equal those of a plain full batch, on 1 and 2 processes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_support import free_port, init_gloo
from torch.nn.parallel import DistributedDataParallel

from clip_train.losses import ContrastiveLoss, SigLipLoss
from clip_train.models import build_model
from clip_train.training.gradient_cache import gradient_cached_step

BATCH = 8


def _model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vit-tiny", **overrides).double()


def _batch(n: int = BATCH, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, 49000, (n, 77), generator=g)
    lengths = torch.randint(3, 20, (n,), generator=g)
    tokens[:, 0] = 49406
    for row, length in enumerate(lengths.tolist()):
        tokens[row, length] = 49407
        tokens[row, length + 1 :] = 0
    return images, tokens


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    inner = getattr(model, "module", model)
    return {name: p.grad.detach().clone() for name, p in inner.named_parameters() if p.grad is not None}


def _full_batch_grads(model, loss_fn, images, tokens) -> tuple[float, dict[str, torch.Tensor]]:
    out = model(images, tokens)
    loss = loss_fn(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias).loss
    loss.backward()
    return loss.item(), _grads(model)


def _assert_same_grads(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-9, msg=name)


@pytest.mark.parametrize("micro_batch_size", [1, 3, 8])
@pytest.mark.parametrize("loss_fn", [ContrastiveLoss(), ContrastiveLoss(chunk_size=3), SigLipLoss()])
def test_gradients_equal_a_plain_full_batch(micro_batch_size, loss_fn):
    overrides = {"init_logit_bias": -10.0, "init_logit_scale": 2.3} if isinstance(loss_fn, SigLipLoss) else {}
    images, tokens = _batch()
    reference = _model(**overrides)
    ref_loss, ref_grads = _full_batch_grads(reference, loss_fn, images, tokens)

    model = _model(**overrides)
    out = gradient_cached_step(model, loss_fn, images, tokens, micro_batch_size)
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-9)
    _assert_same_grads(_grads(model), ref_grads)


def test_patch_dropout_masks_are_replayed():
    """Pass 3 must drop the same patches as pass 1. The reference encodes the micro-batches one after
    another from the same random state, inside one graph, so it draws the same masks."""
    images, tokens = _batch()
    loss_fn = ContrastiveLoss()
    reference = _model(vision={"patch_dropout": 0.5})
    torch.manual_seed(123)
    outs = [reference(i, t) for i, t in zip(images.split(3), tokens.split(3))]
    loss = loss_fn(
        torch.cat([o.image_embeds for o in outs]),
        torch.cat([o.text_embeds for o in outs]),
        outs[0].logit_scale,
    ).loss
    loss.backward()

    model = _model(vision={"patch_dropout": 0.5})
    torch.manual_seed(123)
    gradient_cached_step(model, loss_fn, images, tokens, 3)
    _assert_same_grads(_grads(model), _grads(reference))

    # And the check has teeth: without replaying the random state the gradients differ.
    broken = _model(vision={"patch_dropout": 0.5})
    torch.manual_seed(124)
    gradient_cached_step(broken, loss_fn, images, tokens, 3)
    diffs = [(_grads(broken)[n] - g).abs().max().item() for n, g in _grads(reference).items()]
    assert max(diffs) > 1e-4


def test_bad_arguments_are_named():
    model, (images, tokens) = _model(), _batch()
    with pytest.raises(ValueError, match="micro_batch_size"):
        gradient_cached_step(model, ContrastiveLoss(), images, tokens, 0)
    with pytest.raises(ValueError, match="batch size"):
        gradient_cached_step(model, ContrastiveLoss(), images, tokens[:3], 2)


# ----------------------------------------------------------------------------------------- 2 processes


def _worker(rank: int, world: int, port: int, results) -> None:
    init_gloo(rank, world, port)
    try:
        torch.set_num_threads(1)
        images, tokens = _batch()
        # Reference on this process: the whole batch, no gathering.
        reference = _model()
        _, ref_grads = _full_batch_grads(reference, ContrastiveLoss(gather=False), images, tokens)

        model = DistributedDataParallel(copy.deepcopy(_model()))
        local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        out = gradient_cached_step(
            model, ContrastiveLoss(chunk_size=3), images[local], tokens[local], 2, no_sync=model.no_sync
        )
        grads = _grads(model)
        errors = {
            n: ((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
            for n, g in ref_grads.items()
        }
        results[rank] = (sorted(grads) == sorted(ref_grads), max(errors.values()), out.loss.item())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_the_full_batch():
    world = 2
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, free_port(), results), nprocs=world, join=True)
    for rank in range(world):
        same_names, max_relative_error, _ = results[rank]
        assert same_names
        assert max_relative_error < 1e-5, f"rank {rank}: relative gradient error {max_relative_error}"

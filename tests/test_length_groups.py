"""Text encoded in length groups is exact: the loss and every gradient equal those of full padding."""

from __future__ import annotations

import contextlib
import copy
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from data_support import write_crawler_shards
from gloo_support import free_port, init_gloo
from torch.nn.parallel import DistributedDataParallel

from clip_train.data.webdataset_module import WebDatasetDataModule
from clip_train.losses import ContrastiveLoss
from clip_train.models import build_model
from clip_train.models.length_groups import plan_length_groups
from clip_train.training.gradient_cache import gradient_cached_step

SOT, EOT = 49406, 49407


def web_like_lengths(n: int, seed: int, context: int = 77) -> list[int]:
    """Lengths with a median near 12 tokens and a long tail to the context length, end-of-text included."""
    rng = random.Random(seed)
    return [min(context, max(3, round(rng.lognormvariate(2.5, 0.6)))) for _ in range(n)]


def batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(lengths), 3, 32, 32, generator=g)
    tokens = torch.zeros(len(lengths), 77, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens[row, :length] = torch.randint(1, 49000, (length,), generator=g)
        tokens[row, 0], tokens[row, length - 1] = SOT, EOT
    return images, tokens


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vit-tiny")


def grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    inner = getattr(m, "module", m)
    return {n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.grad is not None}


def loss_and_grads(m, loss_fn, images, tokens, micro_batch_size, text_lengths) -> tuple[float, dict]:
    """One step's loss and parameter gradients: a plain forward and backward, or gradient-cached."""
    if micro_batch_size is None:
        out = m(images, tokens, text_lengths=text_lengths)
        loss = loss_fn(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias).loss
        loss.backward()
    else:
        no_sync = getattr(m, "no_sync", contextlib.nullcontext)
        loss = gradient_cached_step(
            m, loss_fn, images, tokens, micro_batch_size, no_sync=no_sync, text_lengths=text_lengths
        ).loss
    return loss.item(), grads(m)


def assert_same_grads(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, g in expected.items():
        error = ((actual[name] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
        assert error <= 1e-5, (name, error)


def test_the_plan_sorts_pads_to_multiples_of_8_and_keeps_every_row_once():
    lengths = [5, 77, 9, 12, 3, 40, 17, 8]
    plan = plan_length_groups(lengths, groups=4, context_length=77)
    assert [rows for rows, _ in plan] == [[4, 0], [7, 2], [3, 6], [5, 1]]
    assert [width for _, width in plan] == [8, 16, 24, 77]  # 77 is the cap, not a multiple of 8
    # Always as many groups as asked (a sharded text tower is called equally often on every rank).
    assert [rows for rows, _ in plan_length_groups([4, 6], groups=3, context_length=77)] == [[], [0], [1]]
    with pytest.raises(ValueError, match=r"outside 1\.\.77"):
        plan_length_groups([78], groups=1, context_length=77)


@pytest.mark.parametrize(
    "loss_fn", [ContrastiveLoss(), ContrastiveLoss(chunk_size=5)], ids=["plain", "chunked"]
)
@pytest.mark.parametrize("micro_batch_size", [None, 6], ids=["one-pass", "gradient-cached"])
def test_loss_and_gradients_equal_full_padding(loss_fn, micro_batch_size):
    lengths = web_like_lengths(24, seed=0)
    assert max(lengths) > 24 and sorted(lengths)[12] < 20  # a long tail over a short median
    images, tokens = batch(lengths)

    def step(text_lengths):
        return loss_and_grads(model(), loss_fn, images, tokens, micro_batch_size, text_lengths)

    full_loss, full_grads = step(None)
    grouped_loss, grouped_grads = step(lengths)
    assert grouped_loss == pytest.approx(full_loss, rel=1e-5)
    assert_same_grads(grouped_grads, full_grads)
    # And it has teeth: a wrong length cuts a caption short, which changes its features.
    wrong = [max(1, n - 4) for n in lengths]
    assert step(wrong)[0] != pytest.approx(full_loss, rel=1e-5)


def _worker(rank: int, world: int, port: int, micro_batch_size: int | None, results) -> None:
    init_gloo(rank, world, port)
    try:
        torch.set_num_threads(1)
        # Each rank's captions have other lengths (rank 1's are all short): nothing may wait for another.
        lengths = web_like_lengths(8, seed=rank) if rank == 0 else [4] * 8
        images, tokens = batch(lengths, seed=rank)
        out = {
            name: loss_and_grads(
                DistributedDataParallel(copy.deepcopy(model())),
                ContrastiveLoss(),
                images,
                tokens,
                micro_batch_size,
                text_lengths,
            )
            for name, text_lengths in (("full", None), ("grouped", lengths))
        }
        assert out["grouped"][0] == pytest.approx(out["full"][0], rel=1e-5)
        assert_same_grads(out["grouped"][1], out["full"][1])
        results[rank] = True
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("micro_batch_size", [None, 3], ids=["one-pass", "gradient-cached"])
def test_two_processes_with_different_lengths_match_full_padding(micro_batch_size):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), micro_batch_size, results), nprocs=2, join=True)
    assert dict(results) == {0: True, 1: True}


def test_the_data_module_gives_each_captions_length_and_names_a_sample_without_end_of_text(tmp_path):
    shards = write_crawler_shards(tmp_path / "shards", [6, 6], image_size=40)

    def first_batch(tokenizer=None):
        dm = WebDatasetDataModule(
            train_shards=shards,
            batch_size=4,
            num_workers=0,
            image_size=32,
            context_length=77,
            tokenizer=tokenizer,
        )
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    _, tokens, info = first_batch()
    assert info["text_lengths"] == ((tokens == EOT).int().argmax(dim=1) + 1).tolist()
    assert all(isinstance(n, int) for n in info["text_lengths"])

    def without_end_of_text(captions: list[str]) -> torch.Tensor:
        out = torch.zeros(len(captions), 77, dtype=torch.long)
        out[:, 0], out[:, 1] = SOT, EOT
        out[1, 1] = 500  # the second caption has none
        return out

    without_end_of_text.eot_token_id, without_end_of_text.vocab_size = EOT, 49408
    with pytest.raises(ValueError, match=r"samples \['[^']+'\] have no end-of-text token"):
        first_batch(without_end_of_text)

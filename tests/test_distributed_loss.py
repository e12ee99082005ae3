"""The losses across 2 real processes (gloo on loopback) equal the single-process full-batch ones.

All scenarios run in one `torch.multiprocessing.spawn` (starting processes is the slow part); each rank
saves what it measured and the tests below check it. A small fp64 model of two MLP towers and a learnable
log scale (and bias, for SigLIP) stands in for CLIP; every parameter's gradient is compared after
data-parallel averaging, by real DistributedDataParallel or by an explicit all-reduce mean.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from gloo_support import free_port, init_gloo
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clip_train.distributed import all_gather_with_grad, rank, world_size
from clip_train.losses import ContrastiveLoss, NonFiniteInputError, SigLipLoss

WORLD = 2
PER_RANK = 6
INPUT_DIM, EMBED_DIM = 5, 4
TOLERANCE = 1e-6


class TwoTowers(nn.Module):
    """Two little MLP towers giving L2-normalised embeddings, a learnable log scale and optional bias."""

    def __init__(self, with_bias: bool) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(INPUT_DIM, 8), nn.Tanh(), nn.Linear(8, EMBED_DIM))
        self.text = nn.Sequential(nn.Linear(INPUT_DIM, 8), nn.Tanh(), nn.Linear(8, EMBED_DIM))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0 if with_bias else 1 / 0.07)))
        self.bias = nn.Parameter(torch.tensor(-10.0)) if with_bias else None

    def forward(self, images: torch.Tensor, texts: torch.Tensor):
        image = F.normalize(self.image(images), dim=-1)  # (n, EMBED_DIM)
        text = F.normalize(self.text(texts), dim=-1)
        return image, text, self.log_scale.exp(), self.bias


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(WORLD * PER_RANK, INPUT_DIM, generator=g, dtype=torch.float64)
    texts = images + 0.5 * torch.randn(WORLD * PER_RANK, INPUT_DIM, generator=g, dtype=torch.float64)
    return images, texts


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / world_size()


def _model_gradients(make_loss, with_bias: bool, use_ddp: bool) -> dict[str, float]:
    """Largest differences between the 2-process run and the one-process full batch."""
    torch.manual_seed(0)
    model = TwoTowers(with_bias).double()
    reference = copy.deepcopy(model)
    images, texts = _batch()

    full = make_loss(gather=False)(*reference(images, texts))
    full.loss.backward()

    rows = slice(rank() * PER_RANK, (rank() + 1) * PER_RANK)
    net = DistributedDataParallel(model) if use_ddp else model
    out = make_loss(gather=True)(*net(images[rows], texts[rows]))
    out.loss.backward()
    if not use_ddp:  # what DDP does: average the gradients over ranks
        for p in model.parameters():
            p.grad = _mean_over_ranks(p.grad)

    grads = dict(model.named_parameters())
    return {
        "loss": abs(_mean_over_ranks(out.loss) - full.loss).item(),
        "grads": max((grads[n].grad - p.grad).abs().max().item() for n, p in reference.named_parameters()),
        "image_to_text_accuracy": abs(
            _mean_over_ranks(out.image_to_text_accuracy) - full.image_to_text_accuracy
        ).item(),
        "text_to_image_accuracy": abs(
            _mean_over_ranks(out.text_to_image_accuracy) - full.text_to_image_accuracy
        ).item(),
        "loss_differs_between_ranks": float(abs(out.loss.item() - _mean_over_ranks(out.loss).item()) > 1e-9),
        "num_params": float(len(grads)),
    }


def _embedding_gradients(make_loss) -> dict[str, float]:
    """Rank r's local embedding gradient is W times the full-batch gradient's rows (see distributed.py)."""
    g = torch.Generator().manual_seed(2)
    image = F.normalize(torch.randn(WORLD * PER_RANK, EMBED_DIM, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(WORLD * PER_RANK, EMBED_DIM, generator=g, dtype=torch.float64), dim=1)
    scale = torch.tensor(20.0, dtype=torch.float64)
    full_image, full_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    want = torch.autograd.grad(
        make_loss(gather=False)(full_image, full_text, scale).loss, [full_image, full_text]
    )
    rows = slice(rank() * PER_RANK, (rank() + 1) * PER_RANK)
    local_image, local_text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
    got = torch.autograd.grad(
        make_loss(gather=True)(local_image, local_text, scale).loss, [local_image, local_text]
    )
    return {"grads": max((gt - WORLD * w[rows]).abs().max().item() for gt, w in zip(got, want))}


def _gather_alone() -> dict[str, float]:
    t = (torch.arange(6, dtype=torch.float64).reshape(2, 3) + 100 * rank()).requires_grad_()
    gathered = all_gather_with_grad(t)
    expected = torch.cat([torch.arange(6, dtype=torch.float64).reshape(2, 3) + 100 * r for r in range(WORLD)])
    weights = torch.randn(gathered.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (gathered * weights * (rank() + 1)).sum().backward()  # rank r's share weighs rows by (r + 1)·w
    rows = slice(rank() * 2, (rank() + 1) * 2)
    summed = weights[rows] * sum(r + 1 for r in range(WORLD))  # Σ over ranks of ∂share/∂(our rows)
    return {"values": (gathered - expected).abs().max().item(), "grad": (t.grad - summed).abs().max().item()}


def _errors_on_every_rank() -> dict[str, str]:
    messages = {}
    image = F.normalize(torch.randn(PER_RANK + rank(), EMBED_DIM, dtype=torch.float64), dim=1)
    try:
        ContrastiveLoss()(image, image.clone(), torch.tensor(10.0))
    except ValueError as e:
        messages["batch_mismatch"] = str(e)
    image = F.normalize(torch.randn(PER_RANK, EMBED_DIM, dtype=torch.float64), dim=1)
    if rank() == 1:
        image[0, 0] = float("nan")
    try:
        ContrastiveLoss(chunk_size=2)(image, image.clone(), torch.tensor(10.0))
    except NonFiniteInputError as e:
        messages["non_finite"] = str(e)
    return messages


def _contrastive(chunk_size):
    return lambda gather: ContrastiveLoss(chunk_size=chunk_size, gather=gather)


def _run_rank(rank_: int, port: int, out_dir: str) -> None:
    init_gloo(rank_, WORLD, port)
    torch.set_num_threads(1)
    try:
        results = {
            "world_size": world_size(),
            "plain_ddp": _model_gradients(_contrastive(None), with_bias=False, use_ddp=True),
            "plain_allreduce": _model_gradients(_contrastive(None), with_bias=False, use_ddp=False),
            "chunked_ddp": _model_gradients(_contrastive(4), with_bias=False, use_ddp=True),
            "chunked_allreduce": _model_gradients(_contrastive(5), with_bias=False, use_ddp=False),
            "siglip_ddp": _model_gradients(
                lambda gather: SigLipLoss(gather=gather), with_bias=True, use_ddp=True
            ),
            "plain_embeddings": _embedding_gradients(_contrastive(None)),
            "chunked_embeddings": _embedding_gradients(_contrastive(4)),
            "gather": _gather_alone(),
            "errors": _errors_on_every_rank(),
        }
        torch.save(results, Path(out_dir) / f"rank{rank_}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("distributed_loss")
    mp.spawn(_run_rank, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "scenario", ["plain_ddp", "plain_allreduce", "chunked_ddp", "chunked_allreduce", "siglip_ddp"]
)
def test_loss_and_every_parameter_gradient_equal_the_full_batch(results, scenario):
    for r in results:
        measured = r[scenario]
        assert r["world_size"] == WORLD
        assert measured["num_params"] >= 5
        assert measured["loss_differs_between_ranks"] == 1.0  # the ranks really computed different shares
        assert measured["loss"] < TOLERANCE
        assert measured["grads"] < TOLERANCE
        assert measured["image_to_text_accuracy"] < 1e-12
        assert measured["text_to_image_accuracy"] < 1e-12


@pytest.mark.parametrize("scenario", ["plain_embeddings", "chunked_embeddings"])
def test_local_embedding_gradient_is_world_size_times_the_full_batch_rows(results, scenario):
    for r in results:
        assert r[scenario]["grads"] < TOLERANCE


def test_all_gather_with_grad_concatenates_in_rank_order_and_sums_gradients(results):
    for r in results:
        assert r["gather"]["values"] == 0.0
        assert r["gather"]["grad"] < 1e-12


def test_bad_input_raises_on_every_rank_instead_of_hanging(results):
    for r in results:
        assert "same tensor shape on every rank" in r["errors"]["batch_mismatch"]
        assert "rank 0: (6, 8)" in r["errors"]["batch_mismatch"]
        assert "rank 1: (7, 8)" in r["errors"]["batch_mismatch"]
        assert "all_image_embeds holds 1 non-finite" in r["errors"]["non_finite"]

"""Contrastive losses on one process: the definitions, chunked == plain, rank arithmetic, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clip_train import distributed
from clip_train.losses import (
    ContrastiveLoss,
    ContrastiveLossOutput,
    NonFiniteInputError,
    SigLipLoss,
    chunked_contrastive_loss,
    contrastive_loss,
    siglip_loss,
)

F64 = torch.float64


def embeddings(n: int, dim: int = 16, dtype: torch.dtype = F64, requires_grad: bool = True) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, dtype=dtype), dim=1).requires_grad_(requires_grad)


def scalar(value: float, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def loss_and_grads(out: ContrastiveLossOutput, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [out.loss.detach(), *torch.autograd.grad(out.loss, inputs)]


def loss_and_grads_of(loss: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return [loss.detach(), *torch.autograd.grad(loss, list(inputs))]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def reference_infonce(image, text, scale):
    """Symmetric InfoNCE from its definition: −log softmax of the positive, both ways, averaged."""
    logits = scale * image @ text.T
    i2t = (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()
    t2i = (torch.logsumexp(logits, dim=0) - logits.diagonal()).mean()
    targets = torch.arange(len(image))
    return (
        (i2t + t2i) / 2,
        (logits.argmax(1) == targets).double().mean(),
        (logits.argmax(0) == targets).double().mean(),
    )


def reference_siglip(image, text, scale, bias):
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(len(image), dtype=logits.dtype) - 1  # +1 on matching pairs, −1 elsewhere
    return -F.logsigmoid(labels * logits).sum() / len(image)


# ----------------------------------------------------------------------------------------------------------
# Definitions


def test_plain_loss_matches_the_definition():
    image, text, scale = embeddings(24), embeddings(24), scalar(7.3)
    out = contrastive_loss(image, text, scale)
    loss, i2t, t2i = reference_infonce(image, text, scale)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    assert out.image_to_text_accuracy.item() == pytest.approx(i2t.item())
    assert out.text_to_image_accuracy.item() == pytest.approx(t2i.item())
    got = torch.autograd.grad(out.loss, [image, text, scale])
    want = torch.autograd.grad(loss, [image, text, scale])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_accuracies_count_rows_whose_positive_scores_highest():
    image = torch.eye(4, dtype=F64)
    text = image[[0, 1, 3, 2]]  # pairs 0 and 1 match, 2 and 3 are swapped
    for loss in (ContrastiveLoss(), ContrastiveLoss(chunk_size=3), SigLipLoss()):
        out = loss(
            image, text, torch.tensor(10.0), torch.tensor(-10.0) if isinstance(loss, SigLipLoss) else None
        )
        assert out.image_to_text_accuracy.item() == 0.5
        assert out.text_to_image_accuracy.item() == 0.5
        assert not out.image_to_text_accuracy.requires_grad and not out.text_to_image_accuracy.requires_grad
        assert out.loss.requires_grad is False  # nothing here requires grad


def test_siglip_matches_the_definition():
    image, text, scale, bias = embeddings(12), embeddings(12), scalar(10.0), scalar(-10.0)
    out = siglip_loss(image, text, scale, bias)
    want = reference_siglip(image, text, scale, bias)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-12)
    got_grads = torch.autograd.grad(out.loss, [image, text, scale, bias])
    want_grads = torch.autograd.grad(want, [image, text, scale, bias])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Chunked exact mode


@pytest.mark.parametrize(("n", "chunk"), [(1, 1), (5, 1), (37, 8), (37, 37), (37, 100), (64, 16)])
def test_chunked_equals_plain_fp64(n, chunk):
    image, text, scale = embeddings(n), embeddings(n), scalar(30.0)
    plain = contrastive_loss(image, text, scale)
    chunked = chunked_contrastive_loss(image, text, scale, chunk)
    assert chunked.image_to_text_accuracy.item() == plain.image_to_text_accuracy.item()
    assert chunked.text_to_image_accuracy.item() == plain.text_to_image_accuracy.item()
    for c, p in zip(
        loss_and_grads(chunked, [image, text, scale]), loss_and_grads(plain, [image, text, scale])
    ):
        torch.testing.assert_close(c, p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scale_value", [1.0, 100.0, 2000.0])
def test_chunked_equals_plain_fp32_within_1e5_relative(scale_value):
    image, text = embeddings(512, 64, torch.float32), embeddings(512, 64, torch.float32)
    scale = scalar(scale_value, torch.float32)  # 2000: logits far beyond exp's range, needs the online max
    chunked = loss_and_grads(chunked_contrastive_loss(image, text, scale, 96), [image, text, scale])
    plain = loss_and_grads(contrastive_loss(image, text, scale), [image, text, scale])
    for c, p in zip(chunked, plain):
        assert torch.isfinite(c).all()
        assert relative_error(c, p) < 1e-5


def test_chunked_gives_embedding_gradients_through_autograd_grad():
    # What gradient caching needs: d loss / d embeddings of a full batch, scale a plain tensor.
    image, text = embeddings(40), embeddings(40)
    scale = torch.tensor(20.0, dtype=F64)
    got = torch.autograd.grad(chunked_contrastive_loss(image, text, scale, 16).loss, [image, text])
    want = torch.autograd.grad(contrastive_loss(image, text, scale).loss, [image, text])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_chunked_accepts_a_python_float_scale_and_only_image_gradients():
    image, text = embeddings(20), embeddings(20, requires_grad=False)
    (got,) = torch.autograd.grad(chunked_contrastive_loss(image, text, 15.0, 7).loss, [image])
    (want,) = torch.autograd.grad(contrastive_loss(image, text, 15.0).loss, [image])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_low_precision_embeddings_are_scored_in_fp32():
    image32, text32 = embeddings(64, 32, torch.float32), embeddings(64, 32, torch.float32)
    image16 = image32.detach().bfloat16().requires_grad_(True)
    text16 = text32.detach().bfloat16().requires_grad_(True)
    for fn in (contrastive_loss, lambda i, t, s: chunked_contrastive_loss(i, t, s, 16)):
        out = fn(image16, text16, torch.tensor(50.0))
        assert out.loss.dtype == torch.float32
        grad_image, _ = torch.autograd.grad(out.loss, [image16, text16])
        assert grad_image.dtype == torch.bfloat16
        reference = fn(image16.float(), text16.float(), torch.tensor(50.0)).loss
        assert out.loss.item() == pytest.approx(reference.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Rank arithmetic, without processes: rows of each "rank" against all columns


@pytest.mark.parametrize("chunk", [None, 2, 4, 100])
def test_rank_shares_average_to_the_full_batch_loss(chunk):
    world, per_rank = 3, 5
    image, text, scale = embeddings(world * per_rank), embeddings(world * per_rank), scalar(12.0)

    def loss_fn(**kw):
        if chunk is None:
            return contrastive_loss(logit_scale=scale, **kw)
        return chunked_contrastive_loss(logit_scale=scale, chunk_size=chunk, **kw)

    full = loss_fn(image_embeds=image, text_embeds=text)
    shares = [
        loss_fn(
            image_embeds=image[r * per_rank : (r + 1) * per_rank],
            text_embeds=text[r * per_rank : (r + 1) * per_rank],
            all_image_embeds=image,
            all_text_embeds=text,
            row_offset=r * per_rank,
        )
        for r in range(world)
    ]
    mean_loss = sum(s.loss for s in shares) / world
    for got, want in zip(
        loss_and_grads_of(mean_loss, image, text, scale), loss_and_grads(full, [image, text, scale])
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for field in ("image_to_text_accuracy", "text_to_image_accuracy"):
        mean = sum(getattr(s, field) for s in shares) / world
        assert mean.item() == pytest.approx(getattr(full, field).item())


def test_siglip_rank_shares_average_to_the_full_batch_loss():
    world, per_rank = 2, 4
    image, text = embeddings(world * per_rank), embeddings(world * per_rank)
    scale, bias = scalar(10.0), scalar(-10.0)
    full = siglip_loss(image, text, scale, bias)
    shares = [
        siglip_loss(
            image[r * per_rank : (r + 1) * per_rank],
            text[r * per_rank : (r + 1) * per_rank],
            scale,
            bias,
            all_image_embeds=image,
            all_text_embeds=text,
            row_offset=r * per_rank,
        )
        for r in range(world)
    ]
    mean_loss = sum(s.loss for s in shares) / world
    got = loss_and_grads_of(mean_loss, image, text, scale, bias)
    for g, w in zip(got, loss_and_grads(full, [image, text, scale, bias])):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# Modules and the non-distributed collectives


def test_modules_without_a_process_group_score_the_local_batch():
    assert distributed.world_size() == 1 and distributed.rank() == 0
    t = torch.randn(3, 2)
    assert distributed.all_gather_with_grad(t) is t
    image, text, scale = embeddings(10), embeddings(10), scalar(9.0)
    plain, chunked = ContrastiveLoss()(image, text, scale), ContrastiveLoss(chunk_size=4)(image, text, scale)
    assert chunked.loss.item() == pytest.approx(plain.loss.item(), rel=1e-12)
    assert plain.loss.item() == pytest.approx(contrastive_loss(image, text, scale).loss.item(), rel=1e-15)
    bias = scalar(-10.0)
    assert SigLipLoss()(image, text, scale, bias).loss.item() == pytest.approx(
        reference_siglip(image, text, scale, bias).item(), rel=1e-12
    )
    assert "chunk_size=4" in repr(ContrastiveLoss(chunk_size=4))


def test_check_finite_off_lets_a_non_finite_loss_through():
    image, text = embeddings(6, requires_grad=False), embeddings(6, requires_grad=False)
    image[2, 0] = float("nan")
    for loss in (ContrastiveLoss(check_finite=False), ContrastiveLoss(chunk_size=2, check_finite=False)):
        assert torch.isnan(loss(image, text, torch.tensor(10.0)).loss)
    assert torch.isnan(
        SigLipLoss(check_finite=False)(image, text, torch.tensor(10.0), torch.tensor(-10.0)).loss
    )


# ----------------------------------------------------------------------------------------------------------
# Bad input: clear errors that name the problem

LOSSES = {
    "plain": lambda i, t, s, b=None: ContrastiveLoss()(i, t, s),
    "chunked": lambda i, t, s, b=None: ContrastiveLoss(chunk_size=4)(i, t, s),
    "siglip": lambda i, t, s, b=-10.0: SigLipLoss()(i, t, s, b),
}


def _good(n=6, dim=8):
    return (
        embeddings(n, dim, requires_grad=False),
        embeddings(n, dim, requires_grad=False),
        torch.tensor(10.0),
    )


def _with_nan(t: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    t = t.clone()
    t[1, 1] = value
    return t


BAD_INPUTS = {
    "image 1-D": (lambda i, t, s: (i[0], t, s), ValueError, r"image_embeds must be 2-D .* shape \(8,\)"),
    "text 3-D": (
        lambda i, t, s: (i, t[None], s),
        ValueError,
        r"text_embeds must be 2-D .* shape \(1, 6, 8\)",
    ),
    "batch sizes": (lambda i, t, s: (i, t[:5], s), ValueError, r"batch sizes differ: .* 6 rows, .* 5"),
    "embedding dims": (
        lambda i, t, s: (i, t[:, :7], s),
        ValueError,
        r"embedding dims differ: .* 8-d, .* 7-d",
    ),
    "empty batch": (lambda i, t, s: (i[:0], t[:0], s), ValueError, r"empty batch"),
    "nan image": (
        lambda i, t, s: (_with_nan(i), t, s),
        NonFiniteInputError,
        r"image_embeds holds 1 non-finite",
    ),
    "inf text": (
        lambda i, t, s: (i, _with_nan(t, float("inf")), s),
        NonFiniteInputError,
        r"text_embeds holds 1",
    ),
    "nan scale": (
        lambda i, t, s: (i, t, torch.tensor(float("nan"))),
        NonFiniteInputError,
        r"logit_scale holds",
    ),
    "inf scale": (lambda i, t, s: (i, t, float("inf")), NonFiniteInputError, r"logit_scale holds"),
    "vector scale": (lambda i, t, s: (i, t, torch.ones(2)), ValueError, r"logit_scale must be a scalar"),
    "integer embeds": (lambda i, t, s: (i.long(), t, s), TypeError, r"image_embeds must be a floating-point"),
    "not a tensor": (lambda i, t, s: (i.tolist(), t, s), TypeError, r"image_embeds must be a torch.Tensor"),
}


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(loss_name, case):
    make, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        LOSSES[loss_name](*make(*_good()))


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True, "64"])
def test_bad_chunk_size_raises(chunk):
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer .* got"):
        ContrastiveLoss(chunk_size=chunk)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer"):
        chunked_contrastive_loss(*_good(), chunk)


def test_bias_errors():
    image, text, scale = _good()
    with pytest.raises(NonFiniteInputError, match=r"logit_bias holds"):
        SigLipLoss()(image, text, scale, torch.tensor(float("-inf")))
    with pytest.raises(ValueError, match=r"SigLipLoss needs a logit_bias"):
        SigLipLoss()(image, text, scale)
    with pytest.raises(ValueError, match=r"ContrastiveLoss takes no logit_bias"):
        ContrastiveLoss()(image, text, scale, torch.tensor(-10.0))


def test_bad_columns_raise():
    image, text, scale = _good()
    with pytest.raises(ValueError, match=r"pass both all_image_embeds and all_text_embeds"):
        contrastive_loss(image, text, scale, all_image_embeds=image)
    with pytest.raises(ValueError, match=r"row_offset 4 with 6 rows does not fit in 6 columns"):
        chunked_contrastive_loss(
            image, text, scale, 2, all_image_embeds=image, all_text_embeds=text, row_offset=4
        )
    with pytest.raises(ValueError, match=r"rows are 8-d, all_\* columns 4-d"):
        contrastive_loss(image, text, scale, all_image_embeds=image[:, :4], all_text_embeds=text[:, :4])
    with pytest.raises(NonFiniteInputError, match=r"all_text_embeds holds 1"):
        siglip_loss(image, text, scale, -10.0, all_image_embeds=image, all_text_embeds=_with_nan(text))

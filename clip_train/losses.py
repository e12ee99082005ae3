"""Contrastive losses for CLIP training: symmetric InfoNCE (plain and chunked exact) and the sigmoid loss.

Functional forms do the arithmetic on tensors they are given; the modules add the cross-rank gathering
(`clip_train.distributed.all_gather_with_grad`), so each part can be tested alone.

- `contrastive_loss`: CLIP's symmetric InfoNCE, materialising the logits.
- `chunked_contrastive_loss`: the same loss and gradients without ever holding an N × N (or n × N)
  matrix: logits are made block by block, an online log-sum-exp runs over the blocks, and the backward
  pass recomputes each block from the saved log-sum-exps. Memory O(N·chunk) beyond the inputs.
- `siglip_loss`: the pairwise sigmoid loss of SigLIP, with its learnable bias.

Rows and columns. Each function scores `image_embeds` / `text_embeds` (n, D), this rank's rows, against
columns: by default the same n embeddings (one process), or `all_image_embeds` / `all_text_embeds` (N, D)
gathered from every rank, in which rows [row_offset, row_offset + n) are this rank's own. Row i's positive
is column row_offset + i. The loss returned is the mean over this rank's rows, so with equal per-rank
batches the mean over ranks is the full-batch loss (see `clip_train.distributed` for the gradients).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from clip_train.distributed import all_gather_with_grad, rank, world_size

DEFAULT_CHUNK_SIZE = 4096


class NonFiniteInputError(ValueError):
    """An embedding, the logit scale or the logit bias holds NaN or infinity."""


class ContrastiveLossOutput(NamedTuple):
    """What a loss returns (a named tuple: DeepSpeed ZeRO-3 hooks the tensors of a module's output and looks
    inside tuples only, as for CLIPOutput).

    Attributes:
        loss: scalar, mean over this rank's rows (see the module docstring), differentiable.
        image_to_text_accuracy: scalar in [0, 1], detached: the fraction of this rank's images whose
            highest-scoring text among all columns is their own.
        text_to_image_accuracy: the same for this rank's texts against all images.
    """

    loss: Tensor
    image_to_text_accuracy: Tensor
    text_to_image_accuracy: Tensor


# ----------------------------------------------------------------------------------------------------------
# Input checks (bad input must fail loudly and say what is wrong)


def _check_chunk_size(chunk_size: object) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (logits per block side), got {chunk_size!r}")
    return chunk_size


def _check_pair(image: Tensor, text: Tensor, prefix: str = "") -> None:
    for name, t in ((f"{prefix}image_embeds", image), (f"{prefix}text_embeds", text)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, embed_dim), got shape {tuple(t.shape)}")
        if not (t.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if image.shape[0] != text.shape[0]:
        raise ValueError(
            f"batch sizes differ: {prefix}image_embeds has {image.shape[0]} rows, "
            f"{prefix}text_embeds has {text.shape[0]}"
        )
    if image.shape[1] != text.shape[1]:
        raise ValueError(
            f"embedding dims differ: {prefix}image_embeds is {image.shape[1]}-d, "
            f"{prefix}text_embeds is {text.shape[1]}-d"
        )
    if image.shape[0] == 0:
        raise ValueError(f"empty batch: {prefix}image_embeds and {prefix}text_embeds have 0 rows")


def _as_scalar(value: Tensor | float, name: str, like: Tensor, dtype: torch.dtype) -> Tensor:
    t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(t.shape)}")
    return t.to(device=like.device, dtype=dtype).reshape(())  # differentiable: grads flow back to `value`


def _check_finite(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        finite = torch.isfinite(t.detach())
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise NonFiniteInputError(
                f"{name} holds {bad} non-finite value(s) (NaN or inf) out of {t.numel()}; "
                "pass check_finite=False to let them through into a non-finite loss instead"
            )


@dataclass
class _Inputs:
    """Checked inputs in the dtype the loss is computed in (fp32, or fp64 if an input is fp64)."""

    image: Tensor  # (n, D) this rank's rows
    text: Tensor  # (n, D)
    all_image: Tensor | None  # (N, D) columns, None when rows are the columns
    all_text: Tensor | None  # (N, D)
    row_offset: int
    scale: Tensor  # () already exponentiated
    bias: Tensor | None  # ()

    @property
    def single(self) -> bool:
        return self.all_image is None


def _prepare(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None,
    all_image: Tensor | None,
    all_text: Tensor | None,
    row_offset: int,
    check_finite: bool,
) -> _Inputs:
    _check_pair(image, text)
    if (all_image is None) != (all_text is None):
        raise ValueError("pass both all_image_embeds and all_text_embeds, or neither")
    if all_image is not None:
        _check_pair(all_image, all_text, prefix="all_")
        n, dim = image.shape
        if all_image.shape[1] != dim:
            raise ValueError(f"embedding dims differ: rows are {dim}-d, all_* columns {all_image.shape[1]}-d")
        if not 0 <= row_offset <= all_image.shape[0] - n:
            raise ValueError(
                f"row_offset {row_offset} with {n} rows does not fit in {all_image.shape[0]} columns"
            )
    elif row_offset != 0:
        raise ValueError("row_offset needs all_image_embeds / all_text_embeds")
    # Low-precision embeddings (bf16/fp16 under autocast) are scored in fp32: logits reach ~100 and their
    # log-sum-exp over tens of thousands of columns needs the mantissa.
    dtype = torch.promote_types(torch.promote_types(image.dtype, text.dtype), torch.float32)
    scale = _as_scalar(logit_scale, "logit_scale", image, dtype)
    bias = None if logit_bias is None else _as_scalar(logit_bias, "logit_bias", image, dtype)
    inputs = _Inputs(
        image=image.to(dtype),
        text=text.to(dtype),
        all_image=None if all_image is None else all_image.to(dtype),
        all_text=None if all_text is None else all_text.to(dtype),
        row_offset=row_offset,
        scale=scale,
        bias=bias,
    )
    if check_finite:
        # The gathered columns contain this rank's rows and are identical on every rank, so checking them
        # makes every rank raise together rather than leaving the others waiting in a collective.
        embeds = (
            {"image_embeds": inputs.image, "text_embeds": inputs.text}
            if inputs.single
            else {"all_image_embeds": inputs.all_image, "all_text_embeds": inputs.all_text}
        )
        scalars = {"logit_scale": scale} if bias is None else {"logit_scale": scale, "logit_bias": bias}
        _check_finite(**embeds, **scalars)
    return inputs


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Keep autocast from pushing the logit matmuls back down to bf16/fp16."""
    available = getattr(torch.amp, "is_autocast_available", lambda _: device.type in ("cpu", "cuda"))
    return torch.autocast(device.type, enabled=False) if available(device.type) else contextlib.nullcontext()


def _accuracy(hits: Tensor) -> Tensor:
    return hits.float().mean().detach()


def _row_top1(logits: Tensor, row_offset: int) -> Tensor:
    """Fraction of rows whose target logit (column row_offset + i) is the row's maximum."""
    logits = logits.detach()
    return _accuracy(logits.diagonal(row_offset) >= logits.amax(1))


# ----------------------------------------------------------------------------------------------------------
# Plain symmetric InfoNCE


def contrastive_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    *,
    all_image_embeds: Tensor | None = None,
    all_text_embeds: Tensor | None = None,
    row_offset: int = 0,
    check_finite: bool = True,
) -> ContrastiveLossOutput:
    """CLIP's symmetric InfoNCE loss, materialising the (n, N) logits.

    Logits are `logit_scale` · cosine similarity (the embeddings arrive L2-normalised); the loss is the mean
    of the image→text and text→image cross-entropies over this rank's rows.

    Args:
        image_embeds, text_embeds: (n, D) this rank's embeddings; row i of each is a matching pair.
        logit_scale: scalar, already exponentiated (CLIP's 1/temperature, e.g. 100).
        all_image_embeds, all_text_embeds: (N, D) columns gathered from every rank (see the module
            docstring); None when running on one process.
        row_offset: index of this rank's first row among the columns.
        check_finite: raise `NonFiniteInputError` on NaN/inf embeddings or scale.
    """
    x = _prepare(
        image_embeds,
        text_embeds,
        logit_scale,
        None,
        all_image_embeds,
        all_text_embeds,
        row_offset,
        check_finite,
    )
    n = x.image.shape[0]
    targets = torch.arange(n, device=x.image.device) + x.row_offset
    with _autocast_off(x.image.device):
        if x.single:
            logits = (x.image * x.scale) @ x.text.T  # (n, n): image i against text j
            # Text→image on a contiguous copy of logits.T: on CPU a softmax over the transposed view is
            # about twice as slow, and log_softmax(dim=0) loses precision (gradient errors of 1e-5 at
            # n = 8,192). The copy is freed after the forward pass, so the peak memory does not grow.
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T.contiguous(), targets)) / 2
            # Top-1 as "the target is (one of) the maxima", like the chunked loss; a column-wise argmax
            # would also be several times slower than amax on CPU.
            logits, positives = logits.detach(), logits.detach().diagonal()
            return ContrastiveLossOutput(
                loss=loss,
                image_to_text_accuracy=_accuracy(positives >= logits.amax(1)),
                text_to_image_accuracy=_accuracy(positives >= logits.amax(0)),
            )
        image_to_text = (x.image * x.scale) @ x.all_text.T  # (n, N)
        text_to_image = (x.text * x.scale) @ x.all_image.T  # (n, N)
        loss = (F.cross_entropy(image_to_text, targets) + F.cross_entropy(text_to_image, targets)) / 2
        return ContrastiveLossOutput(
            loss=loss,
            image_to_text_accuracy=_row_top1(image_to_text, x.row_offset),
            text_to_image_accuracy=_row_top1(text_to_image, x.row_offset),
        )


# ----------------------------------------------------------------------------------------------------------
# Chunked exact symmetric InfoNCE
#
# A block is `rows × cols` logits, made by one matmul into a reused buffer. The forward pass folds each
# block into running (max, Σ exp(x − max)) per row, and per column for the text→image direction, then
# keeps only the log-sum-exps (N floats per direction). With lse known, the backward pass rebuilds each
# block's softmax exactly: P = exp(S − lse_row), Q = exp(S − lse_col), and d loss / d S = (P + Q − 2·I)/2n
# is pushed through two matmuls per block into the embedding gradients. The scale's gradient needs no
# extra pass: Σ_ij G_ij ⟨I_i, T_j⟩ = Σ_i ⟨I_i, (G T)_i⟩, and G T is accumulated for the image gradient.


class _Buffer:
    """A flat scratch buffer handing out contiguous (rows, cols) views, so blocks do not reallocate."""

    def __init__(self, numel: int, like: Tensor) -> None:
        self.flat = like.new_empty(numel)

    def view(self, rows: int, cols: int) -> Tensor:
        return self.flat[: rows * cols].view(rows, cols)


def _spans(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


def _target_diagonal(block: Tensor, row_start: int, col_start: int, row_offset: int) -> tuple[Tensor, int]:
    """The block's target logits (global row i's target is column row_offset + i) and the first one's row.

    Block row p is global row row_start + p; its target sits in block column p + k, a diagonal of the block.
    """
    k = row_offset + row_start - col_start
    return block.diagonal(k), row_start + max(0, -k)


def _fold_logsumexp(
    block: Tensor, dim: int, running_max: Tensor, running_sum: Tensor, scratch: Tensor
) -> None:
    """Fold `block` into the running max and Σ exp(x − max) along `dim`, in place; clobbers `scratch`.

    `scratch` may be `block` itself when the block is no longer needed.
    """
    new_max = torch.maximum(running_max, block.amax(dim))
    running_sum.mul_(torch.exp(running_max - new_max))
    torch.sub(block, new_max.unsqueeze(dim), out=scratch)
    running_sum.add_(scratch.exp_().sum(dim))
    running_max.copy_(new_max)


class _SymmetricChunkedInfoNCE(torch.autograd.Function):
    """One process: rows are the columns, so each block serves both directions (one matmul per block)."""

    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor, scale: Tensor, chunk: int):
        n = image.shape[0]
        chunk = min(chunk, n)
        scaled_image = image * scale  # (n, D)
        row_max = image.new_full((n,), -math.inf)
        col_max = image.new_full((n,), -math.inf)
        row_sum = image.new_zeros(n)
        col_sum = image.new_zeros(n)
        target = image.new_empty(n)
        blocks, scratch = _Buffer(chunk * chunk, image), _Buffer(chunk * chunk, image)
        for r0, r1 in _spans(n, chunk):
            for c0, c1 in _spans(n, chunk):
                block = torch.mm(scaled_image[r0:r1], text[c0:c1].T, out=blocks.view(r1 - r0, c1 - c0))
                diagonal, first = _target_diagonal(block, r0, c0, 0)
                target[first : first + diagonal.numel()] = diagonal
                _fold_logsumexp(block, 1, row_max[r0:r1], row_sum[r0:r1], scratch.view(r1 - r0, c1 - c0))
                _fold_logsumexp(block, 0, col_max[c0:c1], col_sum[c0:c1], block)
        row_lse = row_max + row_sum.log_()
        col_lse = col_max + col_sum.log_()
        loss = ((row_lse - target).sum() + (col_lse - target).sum()) / (2 * n)
        # The target is one of the values maximised over, so `>=` means it is (one of) the row's top-1.
        image_to_text_accuracy = (target >= row_max).to(image.dtype).mean()
        text_to_image_accuracy = (target >= col_max).to(image.dtype).mean()
        ctx.save_for_backward(image, text, scale, row_lse, col_lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(image_to_text_accuracy, text_to_image_accuracy)
        return loss, image_to_text_accuracy, text_to_image_accuracy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_i2t: Tensor, _grad_t2i: Tensor):
        image, text, scale, row_lse, col_lse = ctx.saved_tensors
        need_image, need_text, need_scale = ctx.needs_input_grad[:3]
        n, chunk = image.shape[0], ctx.chunk
        with _autocast_off(image.device):
            scaled_image = image * scale
            g_text = torch.zeros_like(image) if need_image or need_scale else None  # G T, (n, D)
            g_image = torch.zeros_like(text) if need_text else None  # Gᵀ (s·I), (n, D)
            blocks, scratch = _Buffer(chunk * chunk, image), _Buffer(chunk * chunk, image)
            for r0, r1 in _spans(n, chunk):
                for c0, c1 in _spans(n, chunk):
                    block = torch.mm(scaled_image[r0:r1], text[c0:c1].T, out=blocks.view(r1 - r0, c1 - c0))
                    p = torch.sub(block, row_lse[r0:r1, None], out=scratch.view(r1 - r0, c1 - c0)).exp_()
                    g = block.sub_(col_lse[None, c0:c1]).exp_().add_(p)  # P + Q
                    _target_diagonal(g, r0, c0, 0)[0].sub_(2)  # P + Q − 2·I
                    if g_text is not None:
                        g_text[r0:r1].addmm_(g, text[c0:c1])
                    if g_image is not None:
                        g_image[c0:c1].addmm_(g.T, scaled_image[r0:r1])
            coef = grad_loss / (2 * n)
            grad_image = g_text * (coef * scale) if need_image else None
            grad_text = g_image.mul_(coef) if need_text else None
            grad_scale = ((image * g_text).sum() * coef).reshape(scale.shape) if need_scale else None
        return grad_image, grad_text, grad_scale, None


class _RowsChunkedCrossEntropy(torch.autograd.Function):
    """One direction across ranks: mean cross-entropy of this rank's rows against all gathered columns."""

    @staticmethod
    def forward(ctx, rows: Tensor, cols: Tensor, scale: Tensor, row_offset: int, chunk: int):
        n, num_cols = rows.shape[0], cols.shape[0]
        row_chunk, col_chunk = min(chunk, n), min(chunk, num_cols)
        scaled_rows = rows * scale  # (n, D)
        row_max = rows.new_full((n,), -math.inf)
        row_sum = rows.new_zeros(n)
        target = rows.new_empty(n)
        blocks = _Buffer(row_chunk * col_chunk, rows)
        for r0, r1 in _spans(n, row_chunk):
            for c0, c1 in _spans(num_cols, col_chunk):
                block = torch.mm(scaled_rows[r0:r1], cols[c0:c1].T, out=blocks.view(r1 - r0, c1 - c0))
                diagonal, first = _target_diagonal(block, r0, c0, row_offset)
                target[first : first + diagonal.numel()] = diagonal
                _fold_logsumexp(block, 1, row_max[r0:r1], row_sum[r0:r1], block)
        lse = row_max + row_sum.log_()
        loss = (lse - target).mean()
        accuracy = (target >= row_max).to(rows.dtype).mean()
        ctx.save_for_backward(rows, cols, scale, lse)
        ctx.chunks = (row_chunk, col_chunk, row_offset)
        ctx.mark_non_differentiable(accuracy)
        return loss, accuracy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_accuracy: Tensor):
        rows, cols, scale, lse = ctx.saved_tensors
        need_rows, need_cols, need_scale = ctx.needs_input_grad[:3]
        row_chunk, col_chunk, row_offset = ctx.chunks
        n, num_cols = rows.shape[0], cols.shape[0]
        with _autocast_off(rows.device):
            scaled_rows = rows * scale
            g_cols = torch.zeros_like(rows) if need_rows or need_scale else None  # G C, (n, D)
            g_rows = torch.zeros_like(cols) if need_cols else None  # Gᵀ (s·R), (N, D)
            blocks = _Buffer(row_chunk * col_chunk, rows)
            for r0, r1 in _spans(n, row_chunk):
                for c0, c1 in _spans(num_cols, col_chunk):
                    block = torch.mm(scaled_rows[r0:r1], cols[c0:c1].T, out=blocks.view(r1 - r0, c1 - c0))
                    g = block.sub_(lse[r0:r1, None]).exp_()  # P
                    _target_diagonal(g, r0, c0, row_offset)[0].sub_(1)  # P − onehot
                    if g_cols is not None:
                        g_cols[r0:r1].addmm_(g, cols[c0:c1])
                    if g_rows is not None:
                        g_rows[c0:c1].addmm_(g.T, scaled_rows[r0:r1])
            coef = grad_loss / n
            grad_rows = g_cols * (coef * scale) if need_rows else None
            grad_cols = g_rows.mul_(coef) if need_cols else None
            grad_scale = ((rows * g_cols).sum() * coef).reshape(scale.shape) if need_scale else None
        return grad_rows, grad_cols, grad_scale, None, None


def chunked_contrastive_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    all_image_embeds: Tensor | None = None,
    all_text_embeds: Tensor | None = None,
    row_offset: int = 0,
    check_finite: bool = True,
) -> ContrastiveLossOutput:
    """`contrastive_loss`, exactly (to rounding), without materialising the logits.

    Logits are made in blocks of at most chunk_size × chunk_size, so beyond the inputs and their gradients
    memory is O(chunk²) ≤ O(N·chunk). Backward recomputes the blocks (one matmul more than the plain loss).
    Differentiable with respect to both embeddings and the scale, e.g. by
    `torch.autograd.grad(out.loss, [image_embeds, text_embeds])`; not twice differentiable.

    Args: as `contrastive_loss`, plus
        chunk_size: logit rows and columns per block (≥ 1); a few thousand keeps the matmuls efficient.
    """
    chunk = _check_chunk_size(chunk_size)
    x = _prepare(
        image_embeds,
        text_embeds,
        logit_scale,
        None,
        all_image_embeds,
        all_text_embeds,
        row_offset,
        check_finite,
    )
    with _autocast_off(x.image.device):
        if x.single:
            loss, i2t, t2i = _SymmetricChunkedInfoNCE.apply(x.image, x.text, x.scale, chunk)
        else:
            loss_i2t, i2t = _RowsChunkedCrossEntropy.apply(x.image, x.all_text, x.scale, x.row_offset, chunk)
            loss_t2i, t2i = _RowsChunkedCrossEntropy.apply(x.text, x.all_image, x.scale, x.row_offset, chunk)
            loss = (loss_i2t + loss_t2i) / 2
    return ContrastiveLossOutput(
        loss=loss, image_to_text_accuracy=i2t.float(), text_to_image_accuracy=t2i.float()
    )


# ----------------------------------------------------------------------------------------------------------
# Sigmoid loss (SigLIP)


def siglip_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    all_image_embeds: Tensor | None = None,
    all_text_embeds: Tensor | None = None,
    row_offset: int = 0,
    check_finite: bool = True,
) -> ContrastiveLossOutput:
    """SigLIP's pairwise sigmoid loss: every (image, text) pair is its own binary classification.

    With logits x_ij = logit_scale · ⟨I_i, T_j⟩ + logit_bias and labels z_ij = +1 for matching pairs, −1
    otherwise, the loss is −(1/n) Σ_i Σ_j log σ(z_ij x_ij) over this rank's images i and all texts j, so
    across ranks every pair is counted once and the mean over ranks is the full-batch loss.

    Args: as `contrastive_loss`, plus
        logit_bias: scalar, learnable (SigLIP initialises scale 10, bias −10).
    The text→image accuracy needs all_image_embeds when distributed (used without gradient).
    """
    if logit_bias is None:
        raise ValueError("siglip_loss needs a logit_bias (SigLIP initialises it to -10)")
    x = _prepare(
        image_embeds,
        text_embeds,
        logit_scale,
        logit_bias,
        all_image_embeds,
        all_text_embeds,
        row_offset,
        check_finite,
    )
    n = x.image.shape[0]
    columns = x.text if x.single else x.all_text
    with _autocast_off(x.image.device):
        logits = (x.image * x.scale) @ columns.T + x.bias  # (n, N)
        # log σ(x) − log σ(−x) = x, so Σ_ij log σ(z_ij x_ij) = Σ_ij log σ(−x_ij) + Σ_i x_i,target:
        # every pair as a negative, plus a correction on the diagonal, and no label matrix.
        loss = -(F.logsigmoid(-logits).sum() + logits.diagonal(x.row_offset).sum()) / n
        if x.single:
            text_to_image = _accuracy(logits.detach().diagonal() >= logits.detach().amax(0))
        else:
            with torch.no_grad():
                text_to_image = _row_top1((x.text * x.scale) @ x.all_image.T + x.bias, x.row_offset)
    image_to_text = _row_top1(logits, x.row_offset)
    return ContrastiveLossOutput(
        loss=loss, image_to_text_accuracy=image_to_text, text_to_image_accuracy=text_to_image
    )


# ----------------------------------------------------------------------------------------------------------
# Modules: gather across ranks, then the arithmetic above


def _gather_columns(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor, int]:
    """All ranks' image and text embeddings, with gradients, in one collective; and this rank's offset."""
    _check_pair(image, text)
    dtype = torch.promote_types(image.dtype, text.dtype)
    dim = image.shape[1]
    gathered = all_gather_with_grad(torch.cat([image.to(dtype), text.to(dtype)], dim=1))  # (N, 2D)
    return gathered[:, :dim], gathered[:, dim:], rank() * image.shape[0]


def _gathered_columns(image: Tensor, text: Tensor) -> dict[str, Tensor | int]:
    """Keyword arguments that score this rank's rows against every rank's columns (none on one process)."""
    if world_size() <= 1:
        return {}
    all_image, all_text, offset = _gather_columns(image, text)
    return {"all_image_embeds": all_image, "all_text_embeds": all_text, "row_offset": offset}


class ContrastiveLoss(nn.Module):
    """CLIP's symmetric InfoNCE loss, gathering embeddings across ranks.

    Args:
        chunk_size: None for the plain loss (materialises the logits); an int for the chunked exact loss
            with blocks of that many rows and columns.
        gather: when torch.distributed runs with more than one rank, gather every rank's embeddings (with
            gradients) and score this rank's rows against all of them. False: each rank scores its own
            batch only.
        check_finite: raise `NonFiniteInputError` on NaN/inf inputs. A training loop that would rather skip
            non-finite steps turns this off and gets a non-finite loss instead.
    """

    def __init__(self, chunk_size: int | None = None, gather: bool = True, check_finite: bool = True) -> None:
        super().__init__()
        self.chunk_size = None if chunk_size is None else _check_chunk_size(chunk_size)
        self.gather = gather
        self.check_finite = check_finite

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
    ) -> ContrastiveLossOutput:
        """Args: image_embeds, text_embeds (n, D) L2-normalised; logit_scale scalar, already exponentiated;
        logit_bias must be None (a constant added to every logit cancels in the softmax, so a model with a
        bias belongs with `SigLipLoss`)."""
        if logit_bias is not None:
            raise ValueError(
                "ContrastiveLoss takes no logit_bias: a constant added to every logit cancels in the "
                "softmax. Use SigLipLoss for a model with a learnable bias"
            )
        columns = _gathered_columns(image_embeds, text_embeds) if self.gather else {}
        if self.chunk_size is None:
            return contrastive_loss(
                image_embeds, text_embeds, logit_scale, check_finite=self.check_finite, **columns
            )
        return chunked_contrastive_loss(
            image_embeds, text_embeds, logit_scale, self.chunk_size, check_finite=self.check_finite, **columns
        )

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, gather={self.gather}"


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss, gathering embeddings across ranks (this rank's images against all texts).

    The model holds the learnable scale and bias (SigLIP initialises them to 10 and −10); `forward` takes
    the scale already exponentiated and the bias as is. `gather` and `check_finite` as in `ContrastiveLoss`.
    """

    def __init__(self, gather: bool = True, check_finite: bool = True) -> None:
        super().__init__()
        self.gather = gather
        self.check_finite = check_finite

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
    ) -> ContrastiveLossOutput:
        """Args: image_embeds, text_embeds (n, D) L2-normalised; logit_scale, logit_bias scalars."""
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a logit_bias (SigLIP initialises it to -10)")
        columns = _gathered_columns(image_embeds, text_embeds) if self.gather else {}
        return siglip_loss(
            image_embeds, text_embeds, logit_scale, logit_bias, check_finite=self.check_finite, **columns
        )

    def extra_repr(self) -> str:
        return f"gather={self.gather}"

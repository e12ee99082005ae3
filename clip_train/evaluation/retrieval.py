"""Image↔text retrieval recall@K with several captions per image, without the full similarity matrix.

For N images and M captions the (N, M) similarity matrix of a 100,000-image set with 5 captions each would
take 200 GB in float32; here it is computed `chunk` rows at a time, and each row is reduced at once to the
rank of its correct match, so memory stays at one float32 block of rows × max(N, M) similarities (128 MB by
default: 67 rows against 100,000 × 5 captions), allocated once and reused by every chunk. The ranks are
counted inside that block (`count_above`): `(sims > x).sum(dim=1)` would add a boolean mask and an int64
copy of it, 9 bytes per similarity on top of the block's 4.

Definitions (those of the CLIP paper's Flickr30k/MSCOCO evaluation):

* image→text: an image counts at K when *any* of its captions is among the K captions most similar to it;
  its rank is the number of captions scoring strictly higher than its best-scoring own caption.
* text→image: a caption counts at K when its image is among the K images most similar to it; its rank is
  the number of images scoring strictly higher than its own image.

Recall@K is the fraction with rank < K. Ties are resolved in the query's favour (measure zero for real
features).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from clip_train.evaluation.datasets import RetrievalSet
from clip_train.evaluation.distributed import AllGather, gather_embeddings, rank_range
from clip_train.evaluation.embedding import (
    TextTokenizer,
    embed_images,
    embed_texts,
    model_device,
    tokenizer_for,
)
from clip_train.models import CLIP

DEFAULT_KS = (1, 5, 10)
DEFAULT_MAX_CHUNK_BYTES = 128 * 2**20


def chunk_rows(num_columns: int, max_bytes: int = DEFAULT_MAX_CHUNK_BYTES, bytes_per_value: int = 4) -> int:
    """How many rows of a `num_columns`-wide similarity block of `bytes_per_value`-byte values fit in
    `max_bytes` (at least 1). The block is all the per-similarity memory the rankings below use."""
    return max(1, max_bytes // (max(num_columns, 1) * bytes_per_value))


# Integers up to 2**24 are exact in float32, so a float32 sum of up to that many 0/1 values is exact.
_EXACT_FLOAT32_COUNT = 2**24


def count_above(sims: Tensor, threshold: Tensor) -> Tensor:
    """(c,) int64: how many entries of each row of float32 `sims` (c, M) are strictly above `threshold`
    (c, 1). Overwrites `sims` with 1.0/0.0: comparing in place and summing in the block's own dtype
    allocates nothing of the block's size."""
    if sims.dtype != torch.float32:
        raise TypeError(f"count_above needs a float32 block, got {sims.dtype}")
    sims.gt_(threshold)  # (c, M) of 1.0 / 0.0
    counts = torch.zeros(sims.shape[0], dtype=torch.long, device=sims.device)
    for start in range(0, sims.shape[1], _EXACT_FLOAT32_COUNT):  # one pass unless M > 16.7 M
        counts += sims[:, start : start + _EXACT_FLOAT32_COUNT].sum(dim=1).long()
    return counts


def image_to_text_ranks(
    image_embeds: Tensor,
    text_embeds: Tensor,
    text_to_image: Tensor,
    *,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> Tensor:
    """(N,) int64: for each image, how many captions score strictly above its best own caption.

    image_embeds (N, D), text_embeds (M, D) (unit norm), text_to_image (M,) int64 image index of each caption.
    """
    n = image_embeds.shape[0]
    _check(image_embeds, text_embeds, text_to_image)
    # float32 (a no-op for our features): `count_above` counts exactly in the block's own dtype.
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    rows = chunk_rows(text_embeds.shape[0], max_chunk_bytes)
    # Captions grouped by image (CSR): image i's captions are by_image[first[i]:first[i + 1]].
    by_image = torch.argsort(text_to_image, stable=True)
    first = torch.zeros(n + 1, dtype=torch.long, device=text_to_image.device)
    first[1:] = torch.bincount(text_to_image, minlength=n).cumsum(0)
    ranks = torch.empty(n, dtype=torch.long)
    block = _similarity_block(min(rows, n), text_embeds)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        sims = torch.mm(image_embeds[start:stop], text_embeds.T, out=block[: stop - start])  # (c, M)
        # The own captions' scores are read from this very matrix, so that an own caption is never counted
        # as scoring above itself through a rounding difference.
        own = by_image[first[start] : first[stop]]  # caption indices of this chunk's images
        row = text_to_image[own] - start
        best_own = torch.full((stop - start,), float("-inf"), dtype=sims.dtype, device=sims.device)
        best_own.scatter_reduce_(0, row, sims[row, own], reduce="amax")  # (c,)
        ranks[start:stop] = count_above(sims, best_own[:, None]).cpu()
    return ranks


def text_to_image_ranks(
    image_embeds: Tensor,
    text_embeds: Tensor,
    text_to_image: Tensor,
    *,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> Tensor:
    """(M,) int64: for each caption, how many images score strictly above its own image."""
    m = text_embeds.shape[0]
    _check(image_embeds, text_embeds, text_to_image)
    # float32 (a no-op for our features): `count_above` counts exactly in the block's own dtype.
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    rows = chunk_rows(image_embeds.shape[0], max_chunk_bytes)
    ranks = torch.empty(m, dtype=torch.long)
    block = _similarity_block(min(rows, m), image_embeds)
    for start in range(0, m, rows):
        stop = min(start + rows, m)
        sims = torch.mm(text_embeds[start:stop], image_embeds.T, out=block[: stop - start])  # (c, N)
        own = sims.gather(1, text_to_image[start:stop, None].to(sims.device))  # (c, 1)
        ranks[start:stop] = count_above(sims, own).cpu()
    return ranks


def _similarity_block(rows: int, columns: Tensor) -> Tensor:
    """The (rows, len(columns)) float32 buffer every chunk's similarities are written into. Allocated once
    rather than per chunk: with a block just under glibc's 32 MiB mmap ceiling, freed blocks stay in the
    heap and small allocations between chunks fragment it, so a fresh block per chunk grew the resident
    peak to several blocks."""
    return torch.empty(rows, columns.shape[0], dtype=torch.float32, device=columns.device)


def _check(image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor) -> None:
    n, m = image_embeds.shape[0], text_embeds.shape[0]
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"expected image (N, D) and text (M, D) features, got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}"
        )
    if text_to_image.shape != (m,):
        raise ValueError(f"text_to_image must have shape ({m},), got {tuple(text_to_image.shape)}")
    if n == 0 or m == 0:
        raise ValueError(f"retrieval needs at least one image and one caption, got {n} and {m}")
    if text_to_image.min() < 0 or text_to_image.max() >= n:
        raise ValueError(f"text_to_image must index images in [0, {n})")
    uncaptioned = n - torch.unique(text_to_image).numel()
    if uncaptioned:
        raise ValueError(f"{uncaptioned} of {n} images have no caption; every image needs at least one")


@dataclass
class RetrievalMetrics:
    num_images: int
    num_texts: int
    image_to_text: dict[int, float]  # K → recall@K
    text_to_image: dict[int, float]
    image_to_text_median_rank: float  # 1-based
    text_to_image_median_rank: float

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_images": self.num_images, "num_texts": self.num_texts}
        out |= {f"image_to_text_R@{k}": v for k, v in self.image_to_text.items()}
        out |= {f"text_to_image_R@{k}": v for k, v in self.text_to_image.items()}
        out["image_to_text_median_rank"] = self.image_to_text_median_rank
        out["text_to_image_median_rank"] = self.text_to_image_median_rank
        return out


def retrieval_metrics(
    image_embeds: Tensor,
    text_embeds: Tensor,
    text_to_image: Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> RetrievalMetrics:
    """Recall@K both ways (see the module docstring) of unit-norm image (N, D) and text (M, D) features."""
    text_to_image = text_to_image.long().to(image_embeds.device)
    i2t = image_to_text_ranks(image_embeds, text_embeds, text_to_image, max_chunk_bytes=max_chunk_bytes)
    t2i = text_to_image_ranks(image_embeds, text_embeds, text_to_image, max_chunk_bytes=max_chunk_bytes)
    return RetrievalMetrics(
        num_images=image_embeds.shape[0],
        num_texts=text_embeds.shape[0],
        image_to_text={k: (i2t < k).float().mean().item() for k in ks},
        text_to_image={k: (t2i < k).float().mean().item() for k in ks},
        image_to_text_median_rank=float(i2t.float().median().item() + 1),
        text_to_image_median_rank=float(t2i.float().median().item() + 1),
    )


def top_k_matches(
    query_embeds: Tensor, index_embeds: Tensor, k: int, *, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> tuple[Tensor, Tensor]:
    """For each of Q queries (Q, D), the k best of the (N, D) index by cosine similarity, best first:
    (scores (Q, k) float32, indices (Q, k) int64). Scans the index in chunks of a (Q, c) float32 block,
    keeping a running top-k."""
    q = query_embeds.shape[0]
    k = min(k, index_embeds.shape[0])
    rows = chunk_rows(q, max_chunk_bytes)
    best_scores = torch.full((q, 0), float("-inf"))
    best_indices = torch.empty((q, 0), dtype=torch.long)
    query_embeds, index_embeds = query_embeds.float(), index_embeds.float()
    # One flat buffer, viewed as a contiguous (Q, c) block per chunk (the last chunk is narrower).
    block = torch.empty(q * min(rows, index_embeds.shape[0]), device=index_embeds.device)
    for start in range(0, index_embeds.shape[0], rows):
        chunk = index_embeds[start : start + rows]
        sims = torch.mm(query_embeds, chunk.T, out=block[: q * chunk.shape[0]].view(q, chunk.shape[0]))
        # The chunk's own top k first, so that only (Q, 2k) values are ever merged, not the whole block.
        scores, order = sims.topk(min(k, sims.shape[1]), dim=1)
        scores = torch.cat([best_scores, scores.cpu()], dim=1)
        indices = torch.cat([best_indices, order.cpu() + start], dim=1)
        best_scores, order = scores.topk(min(k, scores.shape[1]), dim=1)
        best_indices = indices.gather(1, order)
    return best_scores, best_indices


@torch.no_grad()
def evaluate_retrieval(
    model: CLIP,
    dataset: RetrievalSet,
    *,
    tokenizer: TextTokenizer | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    rank: int = 0,
    world: int = 1,
    all_gather: AllGather | None = None,
) -> RetrievalMetrics:
    """Embed a captioned set and score retrieval both ways. With `world` > 1 each rank embeds its
    `rank_range` of the images and captions, and `all_gather` assembles them; call it on every rank."""
    texts, owners = dataset.flat_captions()
    mine = rank_range(len(texts), rank, world)
    text_embeds = embed_texts(
        model,
        tokenizer or tokenizer_for(model),
        texts[mine.start : mine.stop],
        device=device,
        progress=f"{dataset.name}: captions" if progress else None,
    )
    text_embeds = gather_embeddings(text_embeds, len(texts), rank, world, all_gather, model_device(model))
    mine = rank_range(len(dataset.images), rank, world)
    image_embeds = embed_images(
        model,
        dataset.images[mine.start : mine.stop],
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=f"{dataset.name}: images" if progress else None,
    )
    image_embeds = gather_embeddings(
        image_embeds, len(dataset.images), rank, world, all_gather, model_device(model)
    )
    return retrieval_metrics(image_embeds, text_embeds, owners, ks=ks)

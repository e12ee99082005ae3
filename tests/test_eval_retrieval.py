"""Retrieval recall@K: the chunked computation equals brute force on the full similarity matrix, with
several captions per image; memory stays bounded; captioned folders and shards are read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from eval_support import shared_tokenizer, tiny_model, write_captioned_folder, write_captioned_shards

from clip_train.evaluation import DatasetError, captioned_folder, captioned_shards, evaluate_retrieval
from clip_train.evaluation.retrieval import (
    DEFAULT_MAX_CHUNK_BYTES,
    chunk_rows,
    retrieval_metrics,
    top_k_matches,
)


def _brute_force(images, texts, owners, ks=(1, 5, 10)):
    """Full (N, M) matrix, sorted: the position of the first correct match in each row's ranking."""
    sims = images @ texts.T
    i2t, t2i = {}, {}
    order = sims.argsort(dim=1, descending=True)  # (N, M)
    first = [
        min(order[i].tolist().index(j) for j in (owners == i).nonzero().flatten().tolist())
        for i in range(len(images))
    ]
    order_t = sims.T.argsort(dim=1, descending=True)  # (M, N)
    pos_t = [order_t[j].tolist().index(owners[j].item()) for j in range(len(texts))]
    for k in ks:
        i2t[k] = sum(p < k for p in first) / len(first)
        t2i[k] = sum(p < k for p in pos_t) / len(pos_t)
    return i2t, t2i


@pytest.mark.parametrize("max_chunk_bytes", [1, 3000, DEFAULT_MAX_CHUNK_BYTES])
def test_chunked_equals_brute_force(max_chunk_bytes):
    g = torch.Generator().manual_seed(0)
    n, d = 60, 16
    per_image = torch.randint(1, 6, (n,), generator=g)  # 1 to 5 captions per image
    owners = torch.repeat_interleave(torch.arange(n), per_image)
    perm = torch.randperm(len(owners), generator=g)
    owners = owners[perm]  # captions in no particular order
    images = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    texts = F.normalize(images[owners] + 1.2 * torch.randn(len(owners), d, generator=g), dim=-1)
    got = retrieval_metrics(images, texts, owners, max_chunk_bytes=max_chunk_bytes)
    i2t, t2i = _brute_force(images, texts, owners)
    assert got.image_to_text == pytest.approx(i2t)
    assert got.text_to_image == pytest.approx(t2i)
    assert 0 < got.image_to_text[1] < 1 and 0 < got.text_to_image[1] < 1  # not a trivial case
    assert got.num_texts == len(owners)


def test_perfect_and_reversed_embeddings():
    eye = torch.eye(12)
    owners = torch.arange(12).repeat(2)  # two identical captions per image
    perfect = retrieval_metrics(eye, eye[owners], owners)
    assert perfect.image_to_text == {1: 1.0, 5: 1.0, 10: 1.0} and perfect.text_to_image[1] == 1.0
    assert perfect.image_to_text_median_rank == 1.0


def test_memory_stays_within_budget_at_100k():
    rows = chunk_rows(100_000 * 5)  # 100,000 images × 5 captions: rows of 500,000 similarities
    assert rows >= 1
    assert rows * 500_000 * 4 <= DEFAULT_MAX_CHUNK_BYTES  # one float32 block, counted in place
    assert chunk_rows(10, max_bytes=1) == 1


# Run in a fresh interpreter, once per measurement, so that its peak resident memory (ru_maxrss, a
# high-water mark) belongs to that measurement only.
_PEAK_PROBE = """
import json, resource, sys
import torch
import torch.nn.functional as F
from clip_train.evaluation.retrieval import retrieval_metrics, top_k_matches

what, n, d, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
images = F.normalize(torch.randn(n, d, generator=g), dim=-1)
owners = torch.randperm(n, generator=g)  # caption j belongs to image owners[j]
texts = F.normalize(images[owners] + 0.3 * torch.randn(n, d, generator=g), dim=-1)
retrieval_metrics(images[:50], texts[:50], torch.arange(50))  # load kernels and thread pools first
top_k_matches(texts[:5], images[:50], 3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if what == "ranks":
    recall = retrieval_metrics(images, texts, owners, max_chunk_bytes=budget).image_to_text[1]
else:
    recall = (top_k_matches(texts[:2000], images, 10, max_chunk_bytes=budget)[1] == owners[:2000, None])
    recall = recall.any(dim=1).float().mean().item()
increase = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # Linux reports KiB
print(json.dumps({"increase": increase, "recall": recall}))
"""


def _peak_increase(what: str, budget: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, what, "20000", "32", str(budget)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize(("what", "budget"), [("ranks", 32 * 2**20), ("top_k", 8 * 2**20)])
def test_peak_memory_of_a_20k_by_20k_retrieval_stays_within_the_budget(what, budget):
    # 20,000 × 20,000 float32 similarities are 1.6 GB; the budget must hold, give or take what is not
    # per-similarity (rank vectors, the matmul's packing buffers). Counting ranks through a boolean mask
    # and an int64 sum, as before, peaked at ~2.6 × the budget. top_k scores 2,000 queries (topk is slow).
    measured = _peak_increase(what, budget)
    assert measured["increase"] <= budget + 6 * 2**20, measured
    assert 0 < measured["recall"] < 1, measured  # a real ranking, not a degenerate one


def test_top_k_matches_equals_full_topk():
    g = torch.Generator().manual_seed(1)
    index = F.normalize(torch.randn(301, 8, generator=g), dim=-1)
    queries = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    scores, indices = top_k_matches(queries, index, 7, max_chunk_bytes=200)
    expected = (queries @ index.T).topk(7, dim=1)
    assert indices.tolist() == expected.indices.tolist()
    torch.testing.assert_close(scores, expected.values)
    assert top_k_matches(queries, index[:4], 10)[1].shape == (3, 4)


def test_bad_retrieval_inputs():
    eye = torch.eye(4)
    with pytest.raises(ValueError, match="1 of 4 images have no caption"):
        retrieval_metrics(eye, eye[:3], torch.arange(3))
    with pytest.raises(ValueError, match="text_to_image must have shape"):
        retrieval_metrics(eye, eye, torch.arange(3))


CAPTIONS = [["a red square", "a square that is red"], ["two green dots"], ["a blue line", "blue", "a line"]]


def test_captioned_folder_and_shards_match_brute_force(tmp_path):
    folder = captioned_folder(write_captioned_folder(tmp_path / "folder", CAPTIONS))
    shards = captioned_shards(write_captioned_shards(tmp_path / "shards", CAPTIONS))
    assert folder.captions == shards.captions == [list(c) for c in CAPTIONS]
    texts, owners = shards.flat_captions()
    assert owners.tolist() == [0, 0, 1, 2, 2, 2]

    model = tiny_model(seed=2)
    tokenizer = shared_tokenizer()
    result = evaluate_retrieval(model, shards, tokenizer=tokenizer, ks=(1, 2))
    from clip_train.evaluation.embedding import embed_images, embed_texts

    images = embed_images(model, shards.images)
    text_feats = embed_texts(model, tokenizer, texts)
    i2t, t2i = _brute_force(images, text_feats, owners, ks=(1, 2))
    assert result.image_to_text == pytest.approx(i2t) and result.text_to_image == pytest.approx(t2i)


def test_captioned_set_problems(tmp_path):
    root = write_captioned_folder(tmp_path / "f", CAPTIONS)
    (root / "img001.txt").unlink()
    with pytest.raises(DatasetError, match=r"img001\.png has no caption file img001\.txt"):
        captioned_folder(root)
    (root / "img001.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match=r"img001\.txt is empty"):
        captioned_folder(root)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        captioned_folder(tmp_path / "nowhere")

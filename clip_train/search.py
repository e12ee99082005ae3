"""`python -m clip_train.search`: embed a folder or shards once, then find the images that fit a text.

    python -m clip_train.search index --checkpoint model.ckpt --images photos/ --out photos.index.pt
    python -m clip_train.search index --checkpoint model.ckpt --shards "data/shard-{000000..000009}.tar" \
        --out shards.index.pt
    python -m clip_train.search query --index photos.index.pt "a red circle" "two dogs" --top-k 16 \
        --out results/

The index file (torch.save of tensors, strings and numbers only; read with weights_only=True) holds the
unit-norm image features, where each image lives (file, or tar member with its byte range), the checkpoint
path, the model's config and a fingerprint of its weights (SHA-256 of the state dict). A query embeds its
texts with that checkpoint (or --checkpoint), refusing a model whose config or weights differ from those
that built the index, and writes, per query, a PNG grid of the top-k images, plus one HTML page with all
queries (thumbnails in images/). An index written before the fingerprint was recorded still loads, with a
warning that the weights cannot be checked.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from clip_train.checkpoints import clip_config_to_dict
from clip_train.evaluation.cli_common import (
    add_model_arguments,
    checkpoint_file,
    model_from_arguments,
    run,
)
from clip_train.evaluation.datasets import ImageRef, list_images, load_image, shard_images
from clip_train.evaluation.embedding import embed_images, embed_texts, tokenizer_for
from clip_train.evaluation.plots import plot_image_grid
from clip_train.evaluation.retrieval import top_k_matches
from clip_train.models.openai_layout import CheckpointError, safe_torch_load

# Unchanged by the optional "weights_sha256" entry: older code ignores it, and an index without it loads.
INDEX_FORMAT = "clip_train.search_index/1"
FINGERPRINT_KEY = "weights_sha256"
_THUMBNAIL = 256


class SearchIndexError(ValueError):
    """A search index file that cannot be used; the message names it."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.search",
        description="Text-to-image search: `index` embeds images once, `query` finds the best matches.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="embed a folder or shards into an index file")
    add_model_arguments(index)
    source = index.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images (searched recursively)")
    source.add_argument("--shards", help="WebDataset shards: a brace pattern or a folder with manifest.json")
    index.add_argument("--out", required=True, help="the index file to write (e.g. photos.index.pt)")

    query = commands.add_parser("query", help="the top-k images of an index for each text")
    query.add_argument("--index", required=True, help="an index file written by `index`")
    query.add_argument("texts", nargs="+", help="one or more text queries")
    query.add_argument("--top-k", type=int, default=16, help="images per query (default 16)")
    query.add_argument("--out", required=True, help="output folder for the HTML page and PNG grids")
    query.add_argument(
        "--checkpoint",
        type=checkpoint_file,
        help="embed the texts with this model instead of the index's",
    )
    query.add_argument(
        "--quick-gelu", choices=("auto", "true", "false"), default="auto", help=argparse.SUPPRESS
    )
    query.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


# ------------------------------------------------------------------------------------------------ index


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of the model's state dict: every entry's name, dtype, shape and bytes, in name order.
    Equal for the same weights loaded from any of the checkpoint formats (all load as float32 under our
    names); different for another training run or step of the same architecture, which the config alone
    cannot tell apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{values.dtype}|{tuple(values.shape)};".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
    return digest.hexdigest()


def write_index(
    path: Path,
    embeds: torch.Tensor,
    refs: list[ImageRef],
    checkpoint: str,
    config: dict,
    fingerprint: str | None = None,
) -> Path:
    """Write the index; `fingerprint` is `weights_fingerprint` of the model that made `embeds` (None
    writes an index of the older format, without it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": INDEX_FORMAT,
            "embeddings": embeds.to(torch.float16),  # (N, D) unit norm; half the size, ranks unchanged
            "paths": [r.path for r in refs],
            "members": [r.member for r in refs],
            "offsets": torch.tensor([r.offset for r in refs], dtype=torch.long),
            "sizes": torch.tensor([r.size for r in refs], dtype=torch.long),
            "checkpoint": str(Path(checkpoint).resolve()),
            "clip_config": config,
            **({FINGERPRINT_KEY: fingerprint} if fingerprint is not None else {}),
        },
        path,
    )
    return path


def read_index(path: str | Path) -> tuple[torch.Tensor, list[ImageRef], dict[str, Any]]:
    """(embeddings (N, D) float32, image references, the whole record)."""
    try:
        record = safe_torch_load(path, what="search index")
    except CheckpointError as exc:  # an image, a text file, a model...: say so, then how to make an index
        raise SearchIndexError(f"{exc}; write one with `python -m clip_train.search index`") from exc
    if not isinstance(record, dict) or record.get("format") != INDEX_FORMAT:
        raise SearchIndexError(f"{path} is not a search index written by `python -m clip_train.search index`")
    refs = [
        ImageRef(p, m, o, s)
        for p, m, o, s in zip(
            record["paths"], record["members"], record["offsets"].tolist(), record["sizes"].tolist()
        )
    ]
    return record["embeddings"].float(), refs, record


def _index(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    refs = list_images(args.images) if args.images else shard_images(args.shards)
    if not refs:
        raise ValueError(f"no images found in {args.images or args.shards}")
    out = Path(args.out)
    print(f"indexing {len(refs)} images from {args.images or args.shards} with {args.checkpoint} into {out}")
    model = model_from_arguments(args)
    embeds = embed_images(
        model, refs, batch_size=args.batch_size, num_workers=args.workers, progress="embedding images"
    )
    config = clip_config_to_dict(model.config)
    write_index(out, embeds, refs, args.checkpoint, config, weights_fingerprint(model))
    size = out.stat().st_size / 2**20
    elapsed = time.perf_counter() - started
    print(f"indexed {len(refs)} images ({embeds.shape[1]}-d) in {elapsed:.1f} s → {out} ({size:.1f} MiB)")
    return 0


# ------------------------------------------------------------------------------------------------ query


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "query"


def _thumbnail(ref: ImageRef, path: Path) -> Path:
    image = load_image(ref)
    image.thumbnail((_THUMBNAIL, _THUMBNAIL))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)
    return path


def _queries(n: int) -> str:
    return f"{n} {'query' if n == 1 else 'queries'}"


def _check_same_model(model: torch.nn.Module, record: dict[str, Any], checkpoint: str, index: str) -> None:
    """Refuse a model other than the one that built the index: its text features would be compared with
    image features of another embedding space, and the rankings would be meaningless."""
    if clip_config_to_dict(model.config) != record["clip_config"]:
        raise ValueError(
            f"{checkpoint} is not the model that built {index}: their configs differ, so text and "
            "image features would not be comparable"
        )
    expected = record.get(FINGERPRINT_KEY)
    if expected is None:
        print(
            f"warning: {index} has no fingerprint of the weights that built it (an index from an older "
            f"clip_train), so it cannot be checked that {checkpoint} holds those weights; rankings are "
            "meaningless if it does not. Rebuild the index with `python -m clip_train.search index` to "
            "have it checked",
            file=sys.stderr,
        )
    elif weights_fingerprint(model) != expected:
        raise ValueError(
            f"{checkpoint} is not the model that built {index}: same architecture, but other weights (their "
            "SHA-256 fingerprints differ), so text and image features would not be comparable. Query with "
            "the checkpoint that built the index, or rebuild the index with this one "
            "(`python -m clip_train.search index --checkpoint ...`)"
        )


def _query(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    embeds, refs, record = read_index(args.index)
    if args.checkpoint is None and not Path(record["checkpoint"]).exists():
        raise FileNotFoundError(
            f"checkpoint not found: {record['checkpoint']}, the model that built {args.index}; pass "
            "--checkpoint with (a copy of) that model"
        )
    args.checkpoint = args.checkpoint or record["checkpoint"]
    out = Path(args.out)
    queries_text = _queries(len(args.texts))
    print(f"searching {len(refs)} images of {args.index} for {queries_text}, top {args.top_k}; to {out}")
    args.batch_size, args.workers = 1, 0
    model = model_from_arguments(args)
    _check_same_model(model, record, args.checkpoint, args.index)
    queries = embed_texts(model, tokenizer_for(model), args.texts)
    scores, indices = top_k_matches(queries, embeds, args.top_k)
    sections = []
    for q, text in enumerate(args.texts):
        hits = [(refs[i], s) for i, s in zip(indices[q].tolist(), scores[q].tolist())]
        thumbs = [
            _thumbnail(ref, out / "images" / f"q{q:02d}_{r:03d}.jpg") for r, (ref, _) in enumerate(hits)
        ]
        grid = out / f"query{q:02d}-{_slug(text)}.png"
        plot_image_grid(
            [load_image(ImageRef(str(t))) for t in thumbs],
            [f"#{r + 1}  {s:.3f}" for r, (_, s) in enumerate(hits)],
            grid,
            title=text,
        )
        print(f"{text!r}: " + ", ".join(f"{Path(ref.name).name} ({s:.3f})" for ref, s in hits[:5]))
        cells = "".join(
            f'<figure><img src="images/{t.name}" alt=""><figcaption>#{r + 1} · {s:.3f}<br>'
            f"{html.escape(ref.name)}</figcaption></figure>"
            for r, (t, (ref, s)) in enumerate(zip(thumbs, hits))
        )
        sections.append(
            f'<section><h2>{html.escape(text)}</h2><p><a href="{grid.name}">PNG grid</a></p>'
            f'<div class="grid">{cells}</div></section>'
        )
    page = out / "index.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>clip_train search</title><style>"
        "body{font-family:sans-serif;margin:2em} .grid{display:flex;flex-wrap:wrap;gap:12px}"
        "figure{margin:0;width:200px} img{max-width:200px;max-height:200px}"
        "figcaption{font-size:12px;word-break:break-all}</style></head><body>"
        f"<h1>Search results</h1><p>{len(refs)} images in {html.escape(str(args.index))}, model "
        f"{html.escape(str(args.checkpoint))}</p>" + "".join(sections) + "</body></html>\n",
        encoding="utf-8",
    )
    elapsed = time.perf_counter() - started
    print(f"searched {len(refs)} images for {queries_text} in {elapsed:.1f} s → {page}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _index(args) if args.command == "index" else _query(args)


if __name__ == "__main__":
    run(main)

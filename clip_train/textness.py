"""Control of CLIP's text-in-image bias with a "textness" direction (PicCollage's recipe).

CLIP ranks an image *showing the word* "dog" written on it close to the query "dog", often above images
showing a dog. A linear probe separates image embeddings of pictures with rendered words from those of the
same pictures without; the probe's weight for the "has text" class, mapped back to the embedding space and
made unit length, is the textness direction d. At query time

    q' = normalise(q + scale · d)

so scale < 0 favours what the image shows, scale > 0 what is written in it (scale is in units of the query's
own norm: at ±1 the direction weighs as much as the query).

    from clip_train.textness import train_textness, steer, TextnessDirection
    direction = train_textness(model, pil_images)           # renders words on copies of the images
    direction.save(TextnessDirection.path_for(checkpoint))   # <checkpoint>.textness.pt beside it
    scores = image_embeds @ steer(text_embeds, direction.vector, -1.0).T

CLI: `python -m clip_train.textness train|evaluate --help`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from clip_train.data.transforms import eval_transform, normalize_batch, stack_uint8
from clip_train.evaluation import embed_texts, list_images, shard_images, tokenizer_for
from clip_train.evaluation.datasets import IMAGE_SUFFIXES, ImageRef, load_image
from clip_train.evaluation.linear_probe import fit_logistic_regression
from clip_train.models import CLIP
from clip_train.models.openai_layout import CheckpointError, safe_torch_load

SUFFIX = ".textness.pt"
DEFAULT_SCALES = (-2.0, -1.0, 0.0, 1.0, 2.0)
# Words rendered on the probe's training images: everyday nouns and shop-sign words.
DEFAULT_WORDS = (
    "apple", "house", "river", "music", "coffee", "garden", "window", "summer", "pizza", "travel", "market",
    "book", "city", "bread", "ocean", "sale", "open", "hello", "paper", "money", "stone", "light", "green",
    "table", "train", "forest", "night", "water", "cloud", "street", "happy", "mountain", "bicycle", "tiger",
)  # fmt: skip


class TextnessError(ValueError):
    """A probe or direction that cannot be made or used as given; the message names the problem."""


# ---------------------------------------------------------------------------------------- rendering
def render_word(image: Image.Image, word: str, rng: random.Random) -> Image.Image:
    """A copy of `image` with `word` drawn on it: a random position, a height of 18-35% of the image's
    short side, light or dark ink with an outline of the opposite shade (legible on any background)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    size = max(8, int(min(w, h) * rng.uniform(0.18, 0.35)))
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font, stroke_width=max(1, size // 12))
    while right - left > 0.95 * w and size > 8:  # shrink long words to fit the width
        size = int(size * 0.85)
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font, stroke_width=max(1, size // 12))
    x = rng.uniform(0, max(0.0, w - (right - left))) - left
    y = rng.uniform(0, max(0.0, h - (bottom - top))) - top
    light = rng.random() < 0.5
    ink = (
        tuple(rng.randint(215, 255) for _ in range(3))
        if light
        else tuple(rng.randint(0, 40) for _ in range(3))
    )
    edge = (0, 0, 0) if light else (255, 255, 255)
    draw.text((x, y), word, fill=ink, font=font, stroke_width=max(1, size // 12), stroke_fill=edge)
    return out


def with_rendered_words(
    images: Sequence[Image.Image], words: Sequence[str] = DEFAULT_WORDS, seed: int = 0
) -> list[Image.Image]:
    """A copy of every image with one word (drawn at random from `words`) rendered on it."""
    if not words:
        raise TextnessError("no words to render")
    rng = random.Random(f"textness-{seed}")
    return [render_word(image, rng.choice(list(words)), rng) for image in images]


def load_images(source: str, limit: int | None = None) -> list[Image.Image]:
    """RGB images of a folder (recursively) or of shards (a pattern or a folder with manifest.json).
    Raises TextnessError when there are none: the probe's own complaint about an empty set ("needs images
    with and without text") would hide that nothing was found."""
    refs: list[ImageRef]
    path = Path(source)
    refs = (
        list_images(path)
        if path.is_dir() and not (path / "manifest.json").is_file()
        else shard_images(source)
    )
    if not refs:
        raise TextnessError(
            f"no images found in {source} (image files: {', '.join(IMAGE_SUFFIXES)}, searched recursively; "
            "or WebDataset shards)"
        )
    return [load_image(ref) for ref in refs[:limit]]


@torch.no_grad()
def embed_pil(model: CLIP, images: Sequence[Image.Image], batch_size: int = 64) -> Tensor:
    """(N, D) unit-norm float32 embeddings (CPU) of in-memory images, with the evaluation transform."""
    transform = eval_transform(model.image_size)
    device = next(model.parameters()).device
    parts = [torch.empty(0, model.config.embed_dim)]
    for start in range(0, len(images), batch_size):
        crops = [transform.crop(image.convert("RGB")) for image in images[start : start + batch_size]]
        batch = normalize_batch(stack_uint8(crops)).to(device)
        parts.append(F.normalize(model.encode_image(batch).float(), dim=-1).cpu())
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------- probe
@dataclass
class TextnessDirection:
    """A unit-norm (D,) direction in the joint embedding space, pointing towards "has text"."""

    vector: Tensor
    accuracy: float  # the probe's accuracy on held-out embeddings
    num_with_text: int
    num_without_text: int
    meta: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def path_for(checkpoint: str | Path) -> Path:
        """Where a checkpoint's direction is kept: `last.ckpt` → `last.textness.pt` beside it."""
        checkpoint = Path(checkpoint)
        return checkpoint.with_name(checkpoint.stem + SUFFIX)

    def save(self, path: str | Path) -> Path:
        """Write the direction (.pt, tensors only) and a readable summary beside it (.json)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "embed_dim": int(self.vector.numel()),
            "accuracy": self.accuracy,
            "num_with_text": self.num_with_text,
            "num_without_text": self.num_without_text,
            **self.meta,
        }
        torch.save({"direction": self.vector.detach().cpu().float(), "summary": json.dumps(summary)}, path)
        path.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, embed_dim: int | None = None) -> TextnessDirection:
        """Read a saved direction; `embed_dim` checks it fits a model."""
        try:
            record = safe_torch_load(path, what="textness direction")
        except CheckpointError as exc:  # already one line naming the file and why it is not one
            raise TextnessError(str(exc)) from exc
        if not isinstance(record, dict) or not {"direction", "summary"} <= record.keys():
            raise TextnessError(
                f"{path} is not a textness direction written by TextnessDirection.save: it holds no "
                "'direction' and 'summary' entries"
            )
        vector, summary = record["direction"], json.loads(record["summary"])
        if embed_dim is not None and vector.numel() != embed_dim:
            raise TextnessError(
                f"{path} is a {vector.numel()}-d direction but the model embeds into {embed_dim} "
                "dimensions: it was trained for another model"
            )
        meta = {
            k: v
            for k, v in summary.items()
            if k not in ("embed_dim", "accuracy", "num_with_text", "num_without_text")
        }
        return cls(vector, summary["accuracy"], summary["num_with_text"], summary["num_without_text"], meta)


def fit_textness(
    with_text: Tensor, without_text: Tensor, *, l2: float = 1e-3, held_out: float = 0.2, seed: int = 0
) -> TextnessDirection:
    """Fit the 2-class probe on (N1, D) embeddings of images with text and (N0, D) without.

    The probe (`clip_train.evaluation.linear_probe`, standardised features) is scored on a held-out
    fraction, then refitted on everything. Its logit difference "has text" − "no text" is linear in the raw
    embedding x: (w₁ − w₀)/σ · x + const, so (w₁ − w₀)/σ, made unit length, is the direction.
    """
    counts = {"with text": len(with_text), "without text": len(without_text)}
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise TextnessError(
            f"the textness probe needs images with and without text, got none {missing[0]} "
            f"({counts}): a probe trained on one class only has no direction"
        )
    if with_text.ndim != 2 or without_text.ndim != 2 or with_text.shape[1] != without_text.shape[1]:
        raise TextnessError(
            f"expected (N, D) embeddings of one size, got {tuple(with_text.shape)} and "
            f"{tuple(without_text.shape)}"
        )
    x = torch.cat([without_text, with_text]).double()
    y = torch.cat([torch.zeros(len(without_text)), torch.ones(len(with_text))]).long()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * held_out)
    accuracy = float("nan")
    test, train = order[:n_test], order[n_test:]
    if n_test and len(y[train].unique()) == 2:
        probe = fit_logistic_regression(x[train], y[train], 2, l2)
        accuracy = float((probe.predict(x[test]) == y[test]).double().mean())
    probe = fit_logistic_regression(x, y, 2, l2)
    vector = (probe.weight[1] - probe.weight[0]) / probe.std
    if not torch.isfinite(vector).all() or vector.norm() == 0:
        raise TextnessError("the probe found no direction (identical embeddings for both classes?)")
    return TextnessDirection(
        F.normalize(vector, dim=0).float(), accuracy, counts["with text"], counts["without text"]
    )


def train_textness(
    model: CLIP,
    images: Sequence[Image.Image],
    words: Sequence[str] = DEFAULT_WORDS,
    *,
    seed: int = 0,
    l2: float = 1e-3,
) -> TextnessDirection:
    """Render a word on a copy of every image, embed both sets with `model`, fit the probe."""
    without = embed_pil(model, images)
    with_text = embed_pil(model, with_rendered_words(images, words, seed))
    direction = fit_textness(with_text, without, l2=l2, seed=seed)
    direction.meta.update({"words": list(words), "seed": seed})
    return direction


def steer(text_embeds: Tensor, direction: Tensor, scale: float) -> Tensor:
    """(Q, D) query embeddings moved by scale · direction and re-normalised (see the module docstring)."""
    if direction.shape[-1] != text_embeds.shape[-1]:
        raise TextnessError(
            f"a {direction.shape[-1]}-d direction cannot steer {text_embeds.shape[-1]}-d queries"
        )
    return F.normalize(text_embeds + scale * direction.to(text_embeds), dim=-1)


# -------------------------------------------------------------------------------------- evaluation
def steered_top_k(
    query_embeds: Tensor, image_embeds: Tensor, direction: Tensor, scales: Sequence[float], k: int = 10
) -> Tensor:
    """(S, Q, k) indices of the top-k images of every query at every scale."""
    k = min(k, image_embeds.shape[0])
    return torch.stack(
        [(steer(query_embeds, direction, s) @ image_embeds.T).topk(k, dim=1).indices for s in scales]
    )


def text_share(top_k: Tensor, has_text: Tensor) -> Tensor:
    """(S, Q) share of text-bearing images among each top-k; `has_text` (N,) bool per image."""
    return has_text[top_k].double().mean(dim=-1)


def evaluation_pool(
    images: Sequence[Image.Image], words: Sequence[str], seed: int = 0, fraction: float = 0.5
) -> tuple[list[Image.Image], Tensor, list[str]]:
    """Images where a `fraction` has one of `words` rendered on it (the query words: a typographic attack):
    (images, has_text (N,) bool, the word on each or "")."""
    rng = random.Random(f"textness-pool-{seed}")
    pool, flags, written = [], [], []
    for image in images:
        if rng.random() < fraction:
            word = rng.choice(list(words))
            pool.append(render_word(image, word, rng))
            flags.append(True)
            written.append(word)
        else:
            pool.append(image.convert("RGB"))
            flags.append(False)
            written.append("")
    return pool, torch.tensor(flags), written


def plot_steering_grid(
    images: Sequence[Image.Image],
    top_k: Tensor,
    has_text: Tensor,
    scales: Sequence[float],
    query: str,
    path: str | Path,
) -> Path:
    """A PNG: one row per scale, that scale's top-k images of `query` (text-bearing ones framed in red)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = top_k.shape
    fig = Figure(figsize=(1.3 * cols + 1.2, 1.4 * rows + 0.5))
    for r in range(rows):
        share = float(has_text[top_k[r]].double().mean())
        for c in range(cols):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            index = int(top_k[r, c])
            ax.imshow(np.asarray(images[index].resize((96, 96))))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("red" if has_text[index] else "lightgrey")
                spine.set_linewidth(3 if has_text[index] else 1)
            if c == 0:
                ax.set_ylabel(f"scale {scales[r]:+g}\n{share:.0%} text", fontsize=8)
    fig.suptitle(f'top-{cols} for "{query}" (red: text rendered on the image)', fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return path


@dataclass
class SteeringResult:
    scales: list[float]
    queries: list[str]
    share: Tensor  # (S, Q) share of text-bearing images in each top-k
    figures: list[Path]

    def mean_share(self) -> list[float]:
        return self.share.mean(dim=1).tolist()


def evaluate_steering(
    model: CLIP,
    direction: TextnessDirection,
    images: Sequence[Image.Image],
    queries: Sequence[str],
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    k: int = 10,
    template: str = "a photo of a {}.",
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> SteeringResult:
    """Render the query words on half of `images`, search the pool with every query at every scale, and
    measure the share of text-bearing images in each top-k; with `out_dir`, one PNG grid per query."""
    if not queries:
        raise TextnessError("no query words to evaluate")
    pool, has_text, _ = evaluation_pool(images, queries, seed)
    return evaluate_steering_on(
        model, direction, pool, has_text, queries, scales=scales, k=k, template=template, out_dir=out_dir
    )


def evaluate_steering_on(
    model: CLIP,
    direction: TextnessDirection,
    pool: Sequence[Image.Image],
    has_text: Tensor,
    queries: Sequence[str],
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    k: int = 10,
    template: str = "a photo of a {}.",
    out_dir: str | Path | None = None,
) -> SteeringResult:
    """`evaluate_steering` on a pool whose text-bearing images are already known ((N,) bool `has_text`),
    e.g. images that were made with words on them, where rendering more words would blur what is measured."""
    if not queries:
        raise TextnessError("no query words to evaluate")
    if has_text.shape != (len(pool),):
        raise TextnessError(f"has_text holds {tuple(has_text.shape)} flags for {len(pool)} images")
    image_embeds = embed_pil(model, pool)
    query_embeds = embed_texts(model, tokenizer_for(model), [template.format(q) for q in queries])
    top_k = steered_top_k(query_embeds, image_embeds, direction.vector, scales, k)  # (S, Q, k)
    figures = []
    if out_dir is not None:
        for q, query in enumerate(queries):
            name = "".join(ch if ch.isalnum() else "_" for ch in query)
            figures.append(
                plot_steering_grid(
                    pool, top_k[:, q], has_text, scales, query, Path(out_dir) / f"textness_{name}.png"
                )
            )
    return SteeringResult(list(scales), list(queries), text_share(top_k, has_text), figures)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from clip_train.evaluation.cli_common import add_model_arguments

    parser = argparse.ArgumentParser(
        prog="python -m clip_train.textness", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="learn the textness direction of a model")
    evaluate = sub.add_parser("evaluate", help="top-k grids and text shares at several scales")
    for p in (train, evaluate):
        add_model_arguments(p)
        p.add_argument(
            "--images", required=True, help="image folder, or shards (pattern or folder with manifest.json)"
        )
        p.add_argument(
            "--max-images", type=int, default=1000, help="use at most this many images (default 1000)"
        )
    train.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the words rendered (which word, where, what colour) and of the probe's held-out "
        "split (default 0)",
    )
    train.add_argument(
        "--words",
        default=",".join(DEFAULT_WORDS),
        help=f"comma-separated words to render (default: {len(DEFAULT_WORDS)} everyday words: "
        f"{', '.join(DEFAULT_WORDS[:3])}, ...)",
    )
    train.add_argument(
        "--out", help=f"where to write the direction (default: <checkpoint stem>{SUFFIX} beside it)"
    )
    evaluate.add_argument(
        "--direction", help=f"the direction file (default: <checkpoint stem>{SUFFIX} beside it)"
    )
    evaluate.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of which images get a query word written on them, and of the word's look (default 0)",
    )
    evaluate.add_argument("--queries", required=True, help="comma-separated query words")
    scales = ",".join(f"{s:g}" for s in DEFAULT_SCALES)
    evaluate.add_argument(
        "--scales",
        default=scales,
        help="comma-separated steering scales, in units of the query's norm: below 0 favours what the "
        f"images show, above 0 the words written on them, 0 is the unsteered query (default {scales}; with "
        "'=' when the first is negative, as argparse takes -2,... for an option: --scales=-1,0,1)",
    )
    evaluate.add_argument(
        "--template", default="a photo of a {}.", help="query template (default 'a photo of a {}.')"
    )
    evaluate.add_argument(
        "--k", type=int, default=10, help="top-k images per query and scale, shown and scored (default 10)"
    )
    evaluate.add_argument("--out", required=True, help="folder for the PNG grids and textness_eval.json")
    return parser


def _scales(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        message = f"--scales takes comma-separated numbers, e.g. --scales=-2,0,2; got {text!r}"
        raise TextnessError(message) from None


def main(argv: list[str] | None = None) -> int:
    from clip_train.evaluation.cli_common import model_from_arguments

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.max_images < 1:
        raise TextnessError(f"--max-images must be at least 1, got {args.max_images}")
    scales = _scales(args.scales) if args.command == "evaluate" else []
    if args.command == "evaluate" and args.k < 1:
        raise TextnessError(f"--k must be at least 1, got {args.k}")
    # The cheap checks of the inputs first (--checkpoint's while parsing), then the images, and the model
    # (seconds to load) last.
    images = load_images(args.images, args.max_images)
    model = model_from_arguments(args)
    if args.command == "train":
        words = [w.strip() for w in args.words.split(",") if w.strip()]
        print(
            f"textness probe of {args.checkpoint} on {len(images)} images with and without "
            f"{len(words)} rendered words"
        )
        direction = train_textness(model, images, words, seed=args.seed)
        direction.meta["checkpoint"] = str(args.checkpoint)
        path = direction.save(args.out or TextnessDirection.path_for(args.checkpoint))
        print(f"probe accuracy {direction.accuracy:.3f} on held-out embeddings; direction written to {path} "
              f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
        return 0
    direction = TextnessDirection.load(
        args.direction or TextnessDirection.path_for(args.checkpoint), model.config.embed_dim
    )
    queries = [q.strip() for q in args.queries.split(",") if q.strip()]
    print(
        f"steering {len(queries)} queries at scales {scales} over {len(images)} images "
        "(half with the words written)"
    )
    result = evaluate_steering(
        model, direction, images, queries, scales=scales, k=args.k, template=args.template, seed=args.seed,
        out_dir=args.out,
    )  # fmt: skip
    for scale, share in zip(scales, result.mean_share(), strict=True):
        print(f"scale {scale:+5.1f}: {share:.3f} of the top-{args.k} bear text")
    record = {
        "scales": scales,
        "queries": queries,
        "share": result.share.tolist(),
        "mean_share": result.mean_share(),
    }
    Path(args.out, "textness_eval.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"{len(result.figures)} grids and textness_eval.json written to {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    from clip_train.evaluation.cli_common import run

    run(main)

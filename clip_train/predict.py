"""`python -m clip_train.predict`: which of several texts fits an image best, with probabilities.

    python -m clip_train.predict --checkpoint model.ckpt photo.jpg -- "a cat" "cats" "two cats and remotes"
    python -m clip_train.predict --checkpoint model.ckpt photos/ more.png --texts-file captions.txt

Images (files, or folders searched recursively) come before `--`, texts after it (or from --text / a file
with one text per line). For each image the texts are listed best first with their probability: the softmax
over the texts of the cosine similarities times the model's temperature, as in CLIP's zero-shot use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from clip_train.evaluation.cli_common import add_model_arguments, model_from_arguments, run
from clip_train.evaluation.datasets import ImageRef, list_images
from clip_train.evaluation.embedding import embed_images, embed_texts, tokenizer_for
from clip_train.evaluation.zero_shot import model_logit_scale


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.predict",
        usage="python -m clip_train.predict --checkpoint FILE [options] IMAGE_OR_DIR... -- TEXT [TEXT...]",
        description="For each image, the probability of each text (best first). Put the images before `--` "
        "and the texts after it, or give texts with --text / --texts-file.",
    )
    add_model_arguments(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    parser.add_argument("--text", action="append", default=[], help="a candidate text (repeatable)")
    parser.add_argument("--texts-file", help="a file of candidate texts, one per line")
    parser.add_argument("--top", type=int, default=0, help="show only the best N texts per image (0: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead")
    return parser


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(arguments before the first `--`, texts after it)."""
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def text_probabilities(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """(N, D) and (T, D) unit-norm features → (N, T) softmax over the texts of each image."""
    return (logit_scale * image_embeds @ text_embeds.T).softmax(dim=1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, texts = split_arguments(argv)
    args = build_parser().parse_args(options)
    texts = texts + args.text
    if args.texts_file:
        path = Path(args.texts_file)
        if not path.is_file():
            raise FileNotFoundError(f"texts file not found: {path}")
        texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError('no texts given: put them after `--` (e.g. -- "a cat" "a dog"), or use --text')
    refs: list[ImageRef] = []
    for item in args.images:
        if not Path(item).exists():
            raise FileNotFoundError(f"image or folder not found: {item}")
        found = list_images(item)
        if not found:
            raise ValueError(f"no images in {item}")
        refs += found
    started = time.perf_counter()
    print(
        f"scoring {len(texts)} text(s) against {len(refs)} image(s) with {args.checkpoint}", file=sys.stderr
    )
    model = model_from_arguments(args)
    text_embeds = embed_texts(model, tokenizer_for(model), texts)
    image_embeds = embed_images(
        model,
        refs,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress="images" if len(refs) > args.batch_size else None,
    )
    probabilities = text_probabilities(image_embeds, text_embeds, model_logit_scale(model))  # (N, T)
    shown = args.top or len(texts)
    best_counts = [0] * len(texts)
    for ref, row in zip(refs, probabilities):
        order = row.argsort(descending=True).tolist()[:shown]
        best_counts[order[0]] += 1
        if args.json:
            ranked = [{"text": texts[j], "probability": round(row[j].item(), 6)} for j in order]
            print(json.dumps({"image": ref.name, "predictions": ranked}, ensure_ascii=False))
        else:
            print(ref.name)
            for j in order:
                print(f"  {row[j].item():7.2%}  {texts[j]}")
    favourite = max(range(len(texts)), key=best_counts.__getitem__)
    print(
        f"scored {len(refs)} image(s) × {len(texts)} text(s) in {time.perf_counter() - started:.1f} s; "
        f"most often best: {texts[favourite]!r} ({best_counts[favourite]} image(s))",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    run(main)

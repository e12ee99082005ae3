"""`python -m clip_train.predict`: which of several texts fits an image best, with probabilities.

    python -m clip_train.predict --checkpoint model.ckpt photo.jpg "a cat" "cats" "two cats and remotes"
    python -m clip_train.predict --checkpoint model.ckpt photos/ more.png --texts-file captions.txt
    python -m clip_train.predict --checkpoint model.ckpt photo.jpg -- "cats" "a photo.jpg"

Positional arguments that name an existing folder (searched recursively) or an existing image file are
the images; the others, whatever their length, are the texts. An argument ending in an image extension
that does not exist is an error rather than a text: it is far more likely a mistyped path than a caption.
To say explicitly which is which, put the images before `--` and the texts after it (then a text may be
anything, even the name of a folder). Texts can also come from --text and --texts-file. For each image the
texts are listed best first with their probability (`clip_train.evaluation.caption_probabilities`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from clip_train.evaluation.cli_common import add_model_arguments, model_from_arguments, run
from clip_train.evaluation.datasets import IMAGE_SUFFIXES, ImageRef, list_images
from clip_train.evaluation.zero_shot import caption_probabilities

_SHOWN_CHARS = 60  # of each argument an error message quotes: a long caption would fill the screen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.predict",
        usage="python -m clip_train.predict --checkpoint FILE [options] IMAGE_OR_DIR... [--] TEXT [TEXT...]",
        description="For each image, the probability of each text (best first). Existing image files and "
        "folders are the images, the other arguments the texts; or put the images before `--` and the "
        "texts after it; or give texts with --text / --texts-file.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE_OR_DIR_OR_TEXT",
        help="image files or folders, then texts (unless the texts follow `--`)",
    )
    parser.add_argument("--text", action="append", default=[], help="a candidate text (repeatable)")
    parser.add_argument("--texts-file", help="a file of candidate texts, one per line")
    parser.add_argument("--top", type=int, default=0, help="show only the best N texts per image (0: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead")
    return parser


def split_arguments(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """(arguments before the first `--`, texts after it); None for the texts when there is no `--`."""
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, None


def _exists(argument: str, test: Callable[[Path], bool] = Path.exists) -> bool:
    """`test(Path(argument))`, False where stat cannot even look the name up: a name longer than the file
    system allows (OSError ENAMETOOLONG, e.g. a long caption) or one holding a NUL byte (ValueError)."""
    try:
        return test(Path(argument))
    except (OSError, ValueError):
        return False


def is_image_source(argument: str) -> bool:
    """An existing folder, or an existing file with an image extension; anything else (of any length) is
    not."""
    return _exists(argument, Path.is_dir) or (
        _exists(argument, Path.is_file) and Path(argument).suffix.lower() in IMAGE_SUFFIXES
    )


def sort_inputs(inputs: list[str], *, after_separator: list[str] | None) -> tuple[list[str], list[str]]:
    """(image arguments, texts) of the positional arguments.

    With `--` (`after_separator` is a list) every positional before it is an image source and the texts
    are those after it. Without, `is_image_source` decides; a missing path with an image extension raises
    FileNotFoundError instead of silently becoming a text."""
    if after_separator is not None:
        return inputs, after_separator
    images, texts = [], []
    for argument in inputs:
        if is_image_source(argument):
            images.append(argument)
        elif Path(argument).suffix.lower() in IMAGE_SUFFIXES:
            raise FileNotFoundError(
                f"image not found: {argument} (if it is meant as a text, put the texts after `--`)"
            )
        else:
            texts.append(argument)
    return images, texts


def image_refs(arguments: list[str]) -> list[ImageRef]:
    refs: list[ImageRef] = []
    for item in arguments:
        if not _exists(item):
            raise FileNotFoundError(f"image or folder not found: {item}")
        found = list_images(item)
        if not found:
            raise ValueError(f"no images in {item}")
        refs += found
    return refs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, after_separator = split_arguments(argv)
    # Intermixed, so that options may also follow the texts (`IMAGE "a cat" --top 1`).
    args = build_parser().parse_intermixed_args(options)
    image_arguments, texts = sort_inputs(args.inputs, after_separator=after_separator)
    texts = texts + args.text
    if args.texts_file:
        path = Path(args.texts_file)
        if not path.is_file():
            raise FileNotFoundError(f"texts file not found: {path}")
        texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not image_arguments:
        shown = [a if len(a) <= _SHOWN_CHARS else f"{a[:_SHOWN_CHARS]}…" for a in args.inputs]
        raise ValueError(f"no images given: none of {shown} is an existing image file or folder")
    if not texts:
        raise ValueError('no texts given: add them after the images (e.g. "a cat" "a dog"), or use --text')
    refs = image_refs(image_arguments)
    started = time.perf_counter()
    print(
        f"scoring {len(texts)} text(s) against {len(refs)} image(s) with {args.checkpoint}", file=sys.stderr
    )
    model = model_from_arguments(args)
    probabilities = caption_probabilities(
        model,
        refs,
        texts,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress="images" if len(refs) > args.batch_size else None,
    )  # (N, T)
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

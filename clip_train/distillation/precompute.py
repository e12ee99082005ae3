"""`python -m clip_train.distillation.precompute`: the teacher's embeddings of every sample of a shard list,
written as side files next to the shards (layout: `clip_train.distillation.teacher_embeddings`).

    python -m clip_train.distillation.precompute --teacher runs/demo/checkpoints/last.ckpt \\
        --shards demo/shards
"""

from __future__ import annotations

import argparse
import time

import torch

from clip_train.data.shards import ShardError, expand_urls
from clip_train.distillation.student import load_teacher
from clip_train.distillation.teacher_embeddings import (
    shard_teacher_embeddings,
    side_file,
    teacher_fingerprint,
    write_side_file,
)
from clip_train.evaluation.cli_common import run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.distillation.precompute",
        description="Write the teacher's image and text embeddings of every shard sample to "
        "<shard>.teacher.npz beside each shard, so distillation pays no teacher forward pass.",
    )
    parser.add_argument(
        "--teacher", required=True, help="teacher checkpoint (.ckpt, OpenAI .pt, save_model .pt)"
    )
    parser.add_argument(
        "--shards", required=True, help="brace pattern of local .tar shards, or a folder with manifest.json"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="samples per teacher forward pass (default 64)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="recompute side files that already exist")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    try:
        shards = expand_urls(args.shards)
    except ShardError as exc:
        raise ValueError(str(exc)) from exc
    if not shards:
        raise ValueError(f"the shard pattern {args.shards!r} names no shards")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(args.teacher).to(device)
    fingerprint = teacher_fingerprint(teacher)
    print(
        f"teacher embeddings of {len(shards)} shard(s) with {args.teacher} "
        f"(weights {fingerprint[:12]}) on {device}"
    )
    start, written, samples, skipped = time.perf_counter(), 0, 0, 0
    for i, shard in enumerate(shards, 1):
        target = side_file(shard)
        if target.is_file() and not args.overwrite:
            print(f"[{i}/{len(shards)}] {target.name} exists, kept (--overwrite recomputes it)")
            continue
        keys, image, text, bad = shard_teacher_embeddings(
            teacher, shard, batch_size=args.batch_size, device=device
        )
        meta = {
            "teacher": str(args.teacher),
            "fingerprint": fingerprint,
            "embed_dim": teacher.config.embed_dim,
            "image_size": teacher.image_size,
            "num_samples": len(keys),
            "skipped": bad,
        }
        write_side_file(target, keys, image, text, meta)
        written, samples, skipped = written + 1, samples + len(keys), skipped + len(bad)
        print(f"[{i}/{len(shards)}] {target.name}: {len(keys)} samples, {len(bad)} skipped")
    print(
        f"wrote {written} side file(s), {samples} samples ({skipped} skipped) in "
        f"{time.perf_counter() - start:.1f} s beside {side_file(shards[0]).parent}"
    )
    return 0


if __name__ == "__main__":
    run(main)

"""Data-loading throughput: clip_train.data vs a plain WebDataset + PIL pipeline, same shards, same run.

Both pipelines turn 256 px JPEG shards into normalised 224 x 224 random resized crops (scale 0.9-1.0,
bicubic) and tokenised captions, in batches. The reference does what a torchvision-style pipeline does:
decode the full image to an RGB PIL image, crop, resize, convert to a float tensor, normalise. Ours
decodes with JPEG draft mode, crops and resizes in one PIL call, keeps uint8 until the batch is stacked
and normalises the whole batch in one fused pass.

    python scripts/bench/bench_dataloading.py            # 2,000 images, 1 and 2 workers
    python scripts/bench/bench_dataloading.py --quick    # 400 images, for a smoke test

Shards are generated once and cached (default /tmp/clip_train_bench_shards).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from clip_train.data import WebDatasetDataModule
from clip_train.data.transforms import CLIP_MEAN, CLIP_STD

# Issue 5's target: samples/s per worker at least this many times the plain reference pipeline's.
SPEEDUP_GOAL = 1.5


def make_shards(root: Path, n: int, source_size: int) -> str:
    """n photo-like JPEGs (short side source_size, aspect 1-1.33) in 4+ shards of <= 500; cached."""
    per_shard = min(500, math.ceil(n / 4))
    shards = math.ceil(n / per_shard)
    pattern = str(root / f"shard-{{000000..{shards - 1:06d}}}.tar")
    stamp = root / f"done-{n}-{source_size}-{per_shard}"
    if stamp.exists():
        print(f"using cached shards in {root}")
        return pattern
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("*"):
        old.unlink()
    rng = np.random.default_rng(0)
    entries = []
    t0 = time.perf_counter()
    for s in range(shards):
        count = min(per_shard, n - s * per_shard)
        with wds.TarWriter(str(root / f"shard-{s:06d}.tar")) as sink:
            for i in range(count):
                w, h = source_size, int(source_size * rng.uniform(1.0, 4 / 3))
                if rng.random() < 0.5:
                    w, h = h, w
                # Smooth structure plus noise: compresses like a photo (~15-25 KB at 256 px, quality 90).
                yy, xx = np.mgrid[0:h, 0:w]
                phase = rng.uniform(0, 6, 3)
                pixels = 128 + 70 * np.sin(xx[..., None] / rng.uniform(8, 40) + phase)
                pixels = pixels + 50 * np.cos(yy[..., None] / rng.uniform(8, 40) + phase[::-1])
                pixels = np.clip(pixels + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                key = f"{s:06d}{i:04d}"
                caption = f"a photo of thing number {i} in a scene from shard {s}"
                sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": caption.encode()})
        entries.append({"name": f"shard-{s:06d}.tar", "num_samples": count})
        print(f"  wrote shard {s + 1}/{shards} ({time.perf_counter() - t0:.1f} s)", flush=True)
    (root / "manifest.json").write_text(json.dumps({"shards": entries, "num_samples": n}))
    stamp.touch()
    return pattern


class ReferenceTransform:
    """torchvision's RandomResizedCrop + ToTensor + Normalize on PIL, written out (no torchvision here)."""

    def __init__(self, size: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        box = (0, 0, width, height)
        for _ in range(10):
            area = width * height * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = random.randint(0, width - w), random.randint(0, height - h)
                box = (left, top, left + w, top + h)
                break
        image = image.crop(box).resize((self.size, self.size), Image.Resampling.BICUBIC)
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return (tensor.float().div(255) - self.mean) / self.std


def reference_loader(pattern: str, batch_size: int, workers: int, image_size: int, tokenizer):
    def collate(samples):
        images, captions = zip(*samples)
        return torch.stack(images), tokenizer(list(captions))

    transform = ReferenceTransform(image_size)
    dataset = (
        wds.WebDataset(pattern, shardshuffle=False, empty_check=False, nodesplitter=None)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map_tuple(transform, lambda t: t)
        .batched(batch_size, collation_fn=collate, partial=False)
    )
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)


def ours_loader(pattern: str, batch_size: int, workers: int, image_size: int, tokenizer, start=None):
    dm = WebDatasetDataModule(
        pattern, batch_size=batch_size, num_workers=workers, image_size=image_size, tokenizer=tokenizer,
        worker_start_method=start,
    )  # fmt: skip
    dm.setup()
    return dm.train_dataloader()


def one_pass(loader) -> tuple[int, float, float]:
    """(samples, wall seconds, CPU seconds of this process) for one full pass over `loader`."""
    w0, c0 = time.perf_counter(), time.process_time()
    count = sum(batch[0].shape[0] for batch in loader)
    return count, time.perf_counter() - w0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="400 images, one pass per setting")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--source-size", type=int, default=256, help="short side of the generated JPEGs")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers values")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path("/tmp/clip_train_bench_shards"))
    p.add_argument("--no-tokenizer", action="store_true", help="skip tokenisation (images only)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 400, 1
    torch.set_num_threads(1)  # one core per worker, as in training

    if args.no_tokenizer:
        tokenizer = partial(_zeros, context_length=77)
    else:
        from clip_train.tokenizer import Tokenizer

        tokenizer = Tokenizer()
    print(
        f"data-loading benchmark: {args.images} JPEGs, short side {args.source_size} px -> "
        f"{args.image_size} px crops, batch {args.batch_size}, workers {args.workers}, best of {args.repeats}"
        f", tokenizer {'off' if args.no_tokenizer else 'CLIP BPE'}"
    )
    pattern = make_shards(args.cache / f"{args.images}-{args.source_size}", args.images, args.source_size)
    rows = []
    t0 = time.perf_counter()
    for workers in args.workers:
        # Passes alternate between the two pipelines so that load from other processes on the machine
        # hits both alike; the speed-up is the median of the paired ratios.
        rates: dict[str, list[float]] = {"reference": [], "clip_train": [], "forkserver": []}
        cpu: dict[str, list[float]] = {"reference": [], "clip_train": [], "forkserver": []}
        walls: dict[str, list[float]] = {"clip_train": [], "forkserver": []}
        pipelines = [("reference", reference_loader), ("clip_train", ours_loader)]
        if workers > 0:  # data.worker_start_method=forkserver: what clean worker processes cost per epoch
            pipelines.append(("forkserver", partial(ours_loader, start="forkserver")))
        for r in range(args.repeats):
            for name, make in pipelines:
                loader = make(pattern, args.batch_size, workers, args.image_size, tokenizer)
                count, wall, cpu_s = one_pass(loader)
                rates[name].append(count / wall)
                cpu[name].append(count / cpu_s)
                walls.get(name, []).append(wall)
                print(
                    f"  workers={workers} pass {r + 1}: {name:<10} {count / wall:7.1f} samples/s", flush=True
                )
        ratios = [o / r for o, r in zip(rates["clip_train"], rates["reference"])]
        cpu_ratio = statistics.median(o / r for o, r in zip(cpu["clip_train"], cpu["reference"]))
        # A forkserver's cost is a start-up per epoch (a new DataLoader each epoch), not a rate: the extra
        # seconds of a pass over forked workers' pass; the first pass also starts the server itself.
        extra = [f - o for f, o in zip(walls["forkserver"], walls["clip_train"])]
        rows.append((
            workers, max(rates["reference"]), max(rates["clip_train"]), statistics.median(ratios), cpu_ratio,
            (extra[0], statistics.median(extra[1:]) if len(extra) > 1 else None) if extra else None,
        ))  # fmt: skip

    print(
        "\n| num_workers | reference samples/s (per worker) | clip_train samples/s (per worker) "
        "| speed-up, wall (median of pairs) | speed-up, main-process CPU time "
        "| forkserver workers' extra seconds per epoch: first, later |"
    )
    print("|---|---|---|---|---|---|")
    for workers, ref, ours, ratio, cpu_ratio, forkserver in rows:
        per = max(1, workers)
        cells = f"{ref:.0f} ({ref / per:.0f}) | {ours:.0f} ({ours / per:.0f})"
        cpu_cell = f"{cpu_ratio:.2f}x" if workers == 0 else "n/a (work is in the workers)"
        if forkserver is None:
            fs_cell = "n/a (no workers)"
        else:
            first, later = forkserver
            fs_cell = f"{first:+.2f} s, " + ("n/a (one pass)" if later is None else f"{later:+.2f} s")
        print(f"| {workers} | {cells} | {ratio:.2f}x | {cpu_cell} | {fs_cell} |")
    # The goal is per worker, and both pipelines ran with the same worker count in each setting, so the
    # per-worker ratio is the ratio of the rates; the verdict is taken on the worst setting.
    workers, _, _, ratio, _, _ = min(rows, key=lambda row: row[3])
    verdict = "PASS" if ratio >= SPEEDUP_GOAL else "MISSED"
    print(
        f"\nverdict: {verdict}: {ratio:.2f}x the plain webdataset+PIL pipeline's samples/s per worker "
        f"(worst setting: {workers} workers; goal >= {SPEEDUP_GOAL}x)"
    )
    speedups = ", ".join(f"{r[3]:.2f}x at {r[0]} workers" for r in rows)
    print(f"\nbenchmarked {len(rows)} settings in {time.perf_counter() - t0:.0f} s; speed-up {speedups}")
    return 0


def _zeros(captions: list[str], context_length: int) -> torch.Tensor:
    return torch.zeros(len(captions), context_length, dtype=torch.long)


if __name__ == "__main__":
    sys.exit(main())

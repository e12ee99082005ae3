"""Training throughput and peak memory of a small CLIP on this CPU, with 1 and 2 processes, side by side.

Runs the real entry point (`python -m clip_train`) on generated WebDataset shards, once per configuration:
one process (trainer=cpu) and two DDP processes over gloo (trainer=ddp_cpu) at the same global batch. It
reads samples/s from the run's metrics.csv (median over the steps after warm-up) and samples the resident
memory of the whole process tree (trainer ranks and data-loader workers) while it runs.

    python scripts/bench/bench_training.py            # vit-tiny, global batch 64, 30 steps per run
    python scripts/bench/bench_training.py --quick    # 10 steps
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import webdataset as wds
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
WIDTHS = (18, 11, 10, 14, 14, 10, 9)
sys.path.insert(0, str(REPO_ROOT))
from clip_train.training.loggers import read_metrics  # noqa: E402


def write_shards(folder: Path, shards: int, per_shard: int, size: int = 64) -> None:
    """Random-texture JPEGs with captions, in our crawler's layout (tars + manifest.json)."""
    if (folder / "manifest.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for s in range(shards):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(per_shard):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                sink.write(
                    {"__key__": f"{s:04d}{i:05d}", "jpg": buf.getvalue(), "txt": f"a texture number {i}"}
                )
        entries.append({"name": name, "num_samples": per_shard})
    manifest = {"shards": entries, "num_samples": shards * per_shard}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def run(label: str, trainer: str, shards: Path, root: Path, steps: int, batch: int, model: str) -> dict:
    overrides = {
        "trainer": trainer,
        "model": model,
        "data.train_shards": shards,
        "paths.root_dir": root,
        "run_name": label,
        "global_batch_size": batch,
        "trainer.max_steps": steps,
        "trainer.log_every_n_steps": 1,
        "data.num_workers": 1,
        "scheduler.warmup_steps": 5,
        "callbacks.checkpoint.every_n_train_steps": 100000,
        "resume": "false",
    }
    args = [
        sys.executable,
        "-m",
        "clip_train",
        "~callbacks.progress",
        *(f"{k}={v}" for k, v in overrides.items()),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{output[-3000:]}")
    metrics = read_metrics(root / "runs" / label / "logs" / "metrics.csv")
    rates = [
        m["train/samples_per_second"] for s, m in sorted(metrics.items()) if "train/samples_per_second" in m
    ]
    waits = [
        m["train/data_wait_seconds"] for s, m in sorted(metrics.items()) if "train/data_wait_seconds" in m
    ]
    warm = max(1, len(rates) // 5)  # the first steps include compilation of kernels and worker start-up
    return {
        "label": label,
        "samples_per_s": statistics.median(rates[warm:]),
        "data_wait_ms": 1000 * statistics.median(waits[warm:]),
        "peak_rss_mib": peak / 2**20,
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per run")
    parser.add_argument("--batch", type=int, default=64, help="global batch size (split over the processes)")
    parser.add_argument("--model", default="vit_tiny", help="a configs/model/ entry")
    parser.add_argument("--quick", action="store_true", help="10 steps: a smoke run")
    args = parser.parse_args()
    steps = 10 if args.quick else args.steps

    shards = Path(tempfile.gettempdir()) / "clip_train_bench_training_shards"
    write_shards(shards, shards=8, per_shard=max(64, steps * args.batch // 8 + 8))
    print(f"model {args.model}, global batch {args.batch}, {steps} steps per run, {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run("1-process", "cpu", shards, Path(tmp), steps, args.batch, args.model),
            run("2-processes-ddp", "ddp_cpu", shards, Path(tmp), steps, args.batch, args.model),
        ]
    base = results[0]
    header = ("configuration", "samples/s", "× 1 proc", "data wait ms", "peak RSS MiB", "× 1 proc", "wall s")
    print("\n" + "".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w) in enumerate(zip(header, WIDTHS))))
    for r in results:
        speed, memory = r["samples_per_s"] / base["samples_per_s"], r["peak_rss_mib"] / base["peak_rss_mib"]
        print(
            f"{r['label']:<18}{r['samples_per_s']:>11.1f}{speed:>10.2f}{r['data_wait_ms']:>14.1f}"
            f"{r['peak_rss_mib']:>14.0f}{memory:>10.2f}{r['wall_s']:>9.1f}"
        )
    print(
        "\nsamples/s: global samples per second of optimiser-step time (median after warm-up); "
        "peak RSS: the whole process tree, data-loader workers included."
    )


if __name__ == "__main__":
    main()

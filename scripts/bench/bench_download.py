"""Benchmark: our downloader vs img2dataset on the same URL list served by a local HTTP server.

    .venv/bin/python scripts/bench/bench_download.py            # 20,000 images, 2 processes x 32 threads
    .venv/bin/python scripts/bench/bench_download.py --quick    # 2,000 images, a smoke run

What is measured: wall-clock time of each tool's CLI from start to exit (start-up and shard writing
included), images written per second and per core, and whether both wrote the same set of URLs. The
speed-up column is images/s over img2dataset's images/s, and the last line says whether the goal holds:
at least 1.5x img2dataset's images/s with the same set of successes.

Set-up, shared by both tools:
* source images: --base-images photo-like JPEGs of random sizes (320 to 1024 px on the long side),
  generated once and cached in --cache-dir (outside the repository); URL k serves base image k % n with
  a JPEG comment segment holding k inserted, so every URL has distinct bytes (no tool can deduplicate)
  while decoding costs stay those of real photos;
* one aiohttp server process on 127.0.0.1, serving from memory;
* output: 256 px centre crop, JPEG quality 95, webdataset tars; img2dataset's shards and our download
  parts both cover --samples-per-shard input rows, and our pack phase then writes final shards of
  --samples-per-shard samples (its time counts in ours); the same processes and threads (img2dataset
  --thread_count; ours --concurrency and --threads);
* img2dataset runs from its own virtual environment (--img2dataset-venv, created with `pip install
  img2dataset==1.47.0` when missing or holding another version; it brings no torch).

The machine is shared: compare the ratio from one side-by-side run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
# Pinned so that runs on different days compare against the same reference implementation.
IMG2DATASET_VERSION = "1.47.0"
GOAL_SPEED_UP = 1.5  # images/s over img2dataset's, with the same successes


def make_base_images(cache: Path, count: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth gradients, texture, noise) of random sizes, cached on disk."""
    folder = cache / "base"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        print(f"generating {len(missing)} source images in {folder} (once)")
    for i in missing:
        rng = np.random.default_rng(seed * 1_000_003 + i)
        long_side = int(rng.integers(320, 1025))
        short_side = int(long_side * rng.uniform(0.6, 1.0))
        w, h = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        freq = rng.uniform(2, 12, 3)
        base = rng.uniform(60, 200, 3)[None, None, :]
        pix = base + 50 * np.sin(xx[..., None] / w * freq + rng.uniform(0, 6, 3))
        pix += 40 * np.cos(yy[..., None] / h * freq[::-1] + rng.uniform(0, 6, 3))
        pix += rng.normal(0, 12, (h, w, 3)).astype(np.float32)
        image = Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8), "RGB")
        tmp = paths[i].with_suffix(".tmp")
        image.save(tmp, format="JPEG", quality=90)
        os.replace(tmp, paths[i])
    return paths


def with_comment(jpeg: bytes, k: int) -> bytes:
    """The same JPEG with a COM segment naming k after the SOI marker: distinct bytes, same pixels."""
    text = f"bench image {k}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def serve(base_paths: list[str], port_queue: mp.Queue) -> None:
    """Server process: /i/K.jpg -> base image K % n with comment K; anything else 404."""
    import asyncio

    from aiohttp import web

    bases = [Path(p).read_bytes() for p in base_paths]

    async def image(request: web.Request) -> web.Response:
        k = int(request.match_info["k"])
        return web.Response(body=with_comment(bases[k % len(bases)], k), content_type="image/jpeg")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/i/{k:\\d+}.jpg", image)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(runner, sock, backlog=4096)
        await site.start()
        port_queue.put(sock.getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def installed_version(venv: Path, package: str) -> str | None:
    """The version of `package` in the venv, or None when it (or the venv) is missing."""
    pip = venv / "bin" / "pip"
    if not pip.exists():
        return None
    shown = subprocess.run([str(pip), "show", package], capture_output=True, text=True).stdout
    versions = [line.split(":", 1)[1].strip() for line in shown.splitlines() if line.startswith("Version:")]
    return versions[0] if versions else None


def ensure_img2dataset(venv: Path) -> Path:
    exe = venv / "bin" / "img2dataset"
    found = installed_version(venv, "img2dataset")
    if found != IMG2DATASET_VERSION or not exe.exists():
        print(
            f"installing img2dataset=={IMG2DATASET_VERSION} into {venv} (found {found or 'none'}; "
            "separate from the project's environment)"
        )
        if not (venv / "bin" / "pip").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pin = f"img2dataset=={IMG2DATASET_VERSION}"
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", pin], check=True)
    listing = subprocess.run([str(venv / "bin" / "pip"), "list"], capture_output=True, text=True).stdout
    if any(line.lower().startswith("torch ") for line in listing.splitlines()):
        print("warning: img2dataset's venv holds torch (not needed by it); results are unaffected")
    return exe


def timed(cmd: list[str], **kwargs: object) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and all its worker processes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_ours(table: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    cmd = [
        sys.executable, "-m", "data_pipelines.download", str(table), str(out),
        "--allow-private-addresses", "--image-size", str(args.image_size), "--resize-mode", "center_crop",
        "--quality", "95", "--samples-per-shard", str(args.samples_per_shard),
        "--rows-per-part", str(args.samples_per_shard), "--processes", str(args.processes),
        "--concurrency", str(args.threads), "--threads", str(args.image_threads or args.threads),
        "--retries", "0", "--no-progress",
    ]  # fmt: skip
    return timed(cmd, cwd=REPO)


def run_img2dataset(exe: Path, table: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    cmd = [
        str(exe), f"--url_list={table}", "--input_format=parquet", "--url_col=url", "--caption_col=caption",
        f"--output_folder={out}", "--output_format=webdataset", f"--image_size={args.image_size}",
        "--resize_mode=center_crop", "--encode_quality=95",
        f"--number_sample_per_shard={args.samples_per_shard}",
        f"--processes_count={args.processes}", f"--thread_count={args.threads}", "--retries=0",
        "--enable_wandb=False", "--timeout=10",
    ]  # fmt: skip
    return timed(cmd)


def successes(out: Path, status_col: str = "status") -> set[str]:
    urls: set[str] = set()
    for p in out.glob("*.parquet"):
        t = pq.read_table(p, columns=["url", status_col]).to_pydict()
        urls.update(u for u, s in zip(t["url"], t[status_col]) if s == "success")
    return urls


def images_per_second(successes: int, wall: float) -> float:
    return successes / wall if wall > 0 else 0.0


def verdict(ours: tuple[float, set[str]], reference: tuple[float, set[str]]) -> str:
    """The goal's line: PASS when our images/s is >= GOAL_SPEED_UP x the reference's and both succeeded on
    exactly the same URLs. Each argument is (wall seconds, successful URLs)."""
    ours_rate = images_per_second(len(ours[1]), ours[0])
    ref_rate = images_per_second(len(reference[1]), reference[0])
    speed_up = ours_rate / ref_rate if ref_rate > 0 else float("inf")
    same = ours[1] == reference[1]
    passed = speed_up >= GOAL_SPEED_UP and same
    sets = (
        "success sets equal"
        if same
        else f"success sets differ ({len(reference[1] - ours[1])} only img2dataset, "
        f"{len(ours[1] - reference[1])} only ours)"
    )
    return (
        f"goal >= {GOAL_SPEED_UP}x img2dataset's images/s with the same successes: "
        f"{'PASS' if passed else 'MISSED'} "
        f"({ours_rate:.0f} vs {ref_rate:.0f} images/s = {speed_up:.2f}x; {sets})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=20_000)
    p.add_argument("--base-images", type=int, default=500, help="distinct source images to generate")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=32, help="img2dataset --thread_count; ours --concurrency")
    p.add_argument("--image-threads", type=int, default=0, help="ours --threads (0: same as --threads)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=1000,
        help="img2dataset: input rows per shard; ours: input rows per part and samples per final shard",
    )
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/clip_train_bench_download"))
    p.add_argument("--img2dataset-venv", type=Path, default=Path("/tmp/venv-img2dataset"))
    p.add_argument("--skip-img2dataset", action="store_true", help="benchmark only ours")
    p.add_argument("--rounds", type=int, default=1, help="alternating runs of both tools; medians reported")
    p.add_argument("--quick", action="store_true", help="2,000 images, 100 base images")
    args = p.parse_args()
    if args.quick:
        args.num_images, args.base_images = min(args.num_images, 2000), min(args.base_images, 100)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    base = make_base_images(args.cache_dir, args.base_images)
    ctx = mp.get_context("spawn")
    ports: mp.Queue = ctx.Queue()
    server = ctx.Process(target=serve, args=([str(b) for b in base], ports), daemon=True)
    server.start()
    port = ports.get(timeout=60)
    work = args.cache_dir / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    urls = [f"http://127.0.0.1:{port}/i/{k}.jpg" for k in range(args.num_images)]
    table = work / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"image {k}" for k in range(len(urls))]}), table)
    print(
        f"{len(urls)} URLs on 127.0.0.1:{port}; {args.processes} processes x {args.threads} threads; "
        f"{args.image_size} px centre crop; {cores} cores"
    )
    runs: dict[str, list[tuple[float, float, set[str]]]] = {}
    ours_table = work / "urls-ours.parquet"
    pq.write_table(pa.table({"url": urls, "text": [f"image {k}" for k in range(len(urls))]}), ours_table)
    exe = None if args.skip_img2dataset else ensure_img2dataset(args.img2dataset_venv)
    try:
        for r in range(args.rounds):  # alternate the tools so that both meet the same machine load
            if exe is not None:
                out = work / f"img2dataset-{r}"
                wall, cpu = run_img2dataset(exe, table, out, args)
                runs.setdefault("img2dataset", []).append((wall, cpu, successes(out)))
            out = work / f"ours-{r}"
            wall, cpu = run_ours(ours_table, out, args)
            runs.setdefault("clip_train", []).append((wall, cpu, successes(out)))
            assert json.loads((out / "manifest.json").read_text())["num_samples"] == len(
                runs["clip_train"][-1][2]
            )
    finally:
        server.terminate()
        server.join()

    def median(values: list[float]) -> float:
        return float(np.median(values))

    summary = {
        name: (median([w for w, _, _ in rs]), median([c for _, c, _ in rs]), rs[-1][2])
        for name, rs in runs.items()
    }
    ref_wall, ref_cpu, ref_ok = summary.get("img2dataset", summary["clip_train"])
    # The goal is about throughput of kept images, so the speed-up compares images/s, not wall times
    # (they differ when the tools keep different numbers of images).
    ref_rate = images_per_second(len(ref_ok), ref_wall)
    rounds = f" (median of {args.rounds} alternating rounds)" if args.rounds > 1 else ""
    print(f"\nwall-clock and CPU time per tool{rounds}")
    print(
        f"{'tool':<12} {'wall s':>7} {'images':>7} {'images/s':>9} {'img/s/core':>10} {'speed-up':>8} "
        f"{'CPU s':>7} {'CPU ms/img':>10} {'CPU ratio':>9}"
    )
    for name, (wall, cpu, ok) in summary.items():
        rate = images_per_second(len(ok), wall)
        speed_up = rate / ref_rate if ref_rate > 0 else float("nan")
        print(
            f"{name:<12} {wall:7.1f} {len(ok):7d} {rate:9.0f} {rate / cores:10.0f} "
            f"{speed_up:7.2f}x {cpu:7.1f} {1000 * cpu / max(len(ok), 1):10.2f} {ref_cpu / cpu:8.2f}x"
        )
    if "img2dataset" in summary:
        ours_wall, _, ours_ok = summary["clip_train"]
        print(verdict((ours_wall, ours_ok), (ref_wall, ref_ok)))
    else:
        print("goal not checked: img2dataset was skipped")
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()

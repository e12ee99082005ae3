"""Benchmark retrieval recall@K: chunked (`clip_train.evaluation.retrieval.retrieval_metrics`) against
brute force on the full (N, 5N) similarity matrix, N images with 5 captions each, d = 512, float32.

Each case runs in a fresh subprocess so that no case's memory pollutes another's. Reported per case:
wall-clock seconds of both directions of retrieval; extra peak memory (peak resident set size during the
computation minus the resident size with the features already loaded, from Linux VmHWM reset via
/proc/self/clear_refs, else ru_maxrss); and whether the recalls agree. A brute-force case whose
(N, 5N) matrix (plus a same-sized comparison mask) would not fit in the memory available is skipped.

    python scripts/bench/bench_retrieval.py            # N = 3,000 / 10,000 / 30,000
    python scripts/bench/bench_retrieval.py --sizes 100000   # the 100,000-image case (chunked only)
    python scripts/bench/bench_retrieval.py --quick    # N = 1,000 / 3,000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

FULL_SIZES = (3_000, 10_000, 30_000)
QUICK_SIZES = (1_000, 3_000)
CAPTIONS_PER_IMAGE = 5
DIM = 512


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _brute_force(images, texts, owners, ks):
    import torch

    sims = images @ texts.T  # (N, M): the matrix the chunked version never holds
    own = owners[None, :] == torch.arange(images.shape[0])[:, None]
    best_own = sims.masked_fill(~own, float("-inf")).amax(dim=1)
    i2t = (sims > best_own[:, None]).sum(dim=1)
    own_t = sims.gather(0, owners[None, :])  # (1, M)
    t2i = (sims > own_t).sum(dim=0)
    return {k: (i2t < k).float().mean().item() for k in ks}, {k: (t2i < k).float().mean().item() for k in ks}


def run_case(method: str, n: int) -> dict:
    import torch
    import torch.nn.functional as F

    from clip_train.evaluation.retrieval import retrieval_metrics

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    owners = torch.arange(n).repeat_interleave(CAPTIONS_PER_IMAGE)
    images = F.normalize(torch.randn(n, DIM), dim=-1)
    texts = F.normalize(images[owners] + 2.0 * torch.randn(len(owners), DIM) / DIM**0.5, dim=-1)
    baseline = _current_bytes()
    exact_peak = _reset_peak()
    started = time.perf_counter()
    if method == "chunked":
        m = retrieval_metrics(images, texts, owners)
        i2t, t2i = m.image_to_text, m.text_to_image
    else:
        i2t, t2i = _brute_force(images, texts, owners, (1, 5, 10))
    seconds = time.perf_counter() - started
    extra = _peak_bytes() - (baseline if exact_peak else 0)
    return {"seconds": seconds, "extra_bytes": extra, "i2t": i2t[1], "t2i": t2i[1]}


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 * 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (about half a minute)")
    parser.add_argument("--sizes", type=int, nargs="*", help="numbers of images N (captions: 5N)")
    parser.add_argument("--case", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]))))
        return
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    print(f"retrieval recall@K, N images × {CAPTIONS_PER_IMAGE}N captions, d = {DIM}, float32, "
          f"{os.cpu_count()} CPU threads")  # fmt: skip
    header = f"{'N':>8} {'brute s':>9} {'chunked s':>10} {'time ratio':>10} {'brute MB':>10} {'chunked MB':>11} {'mem ratio':>10} {'agree':>6}"  # noqa: E501
    print(header)
    for n in sizes:
        results = {}
        for method in ("chunked", "brute"):
            need = 2 * n * n * CAPTIONS_PER_IMAGE * 4 + 2 * n * CAPTIONS_PER_IMAGE * DIM * 4
            if method == "brute" and need > 0.8 * _available_bytes():
                results[method] = None
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--case", method, str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        c, b = results["chunked"], results["brute"]
        if b is None:
            need_gb = 2 * n * n * CAPTIONS_PER_IMAGE * 4 / 2**30
            print(f"{n:>8} {'skipped':>9} {c['seconds']:>10.2f} {'':>10} {f'~{need_gb:.0f} GB':>10} "
                  f"{c['extra_bytes'] / 2**20:>11.0f} {'':>10} {'':>6}")  # fmt: skip
            continue
        agree = "yes" if abs(c["i2t"] - b["i2t"]) < 1e-9 and abs(c["t2i"] - b["t2i"]) < 1e-9 else "NO"
        memory_ratio = c["extra_bytes"] / max(b["extra_bytes"], 1)
        print(f"{n:>8} {b['seconds']:>9.2f} {c['seconds']:>10.2f} {c['seconds'] / b['seconds']:>10.2f} "
              f"{b['extra_bytes'] / 2**20:>10.0f} {c['extra_bytes'] / 2**20:>11.0f} "
              f"{memory_ratio:>10.3f} {agree:>6}")  # fmt: skip


if __name__ == "__main__":
    main()

"""Benchmark the contrastive loss: plain (materialised logits) against chunked exact, forward + backward.

For each batch size N, with d-dimensional fp32 embeddings, this measures one forward + backward pass
(gradients with respect to both embeddings and the logit scale) of each implementation in a fresh
subprocess, so that no case's memory pollutes another's:

- time: wall-clock seconds of forward + backward (best of --repeats for N ≤ 16,384, one run above), and
  the CPU seconds of all the process's threads, which other jobs on a shared machine disturb less;
- extra peak memory: the peak resident set size during the pass minus the resident size with the inputs
  already in memory (Linux VmHWM, reset just before the pass via /proc/self/clear_refs; without that,
  ru_maxrss), i.e. what the loss itself costs, gradients included;
- max relative error of chunked against plain: over the loss and the three gradients, the largest
  max|chunked − plain| / max|plain|.

A plain case whose predicted memory does not fit in the memory available now is not run and is reported
as "skipped: needs ~X GB". Prediction: extra bytes ∝ N², from the largest plain case measured so far (or
an assumed 17 bytes per N² before the first), plus the inputs.

    python scripts/bench/bench_loss.py            # N = 4,096 / 16,384 / 32,768 / 65,536, d = 512
    python scripts/bench/bench_loss.py --quick    # N = 1,024 / 2,048 / 4,096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL_SIZES = (4096, 16384, 32768, 65536)
QUICK_SIZES = (1024, 2048, 4096)
PRIOR_BYTES_PER_N2 = 17.0  # plain loss, fp32: ~4 live N × N tensors at its backward's peak
SAFETY_BYTES = 2 * 2**30  # headroom left to the rest of the machine
CHECK_AT = 32768  # the size at which the targets below apply
MAX_MEMORY_RATIO = 0.05
MAX_TIME_RATIO = 1.5
MAX_RELATIVE_ERROR = 1e-5


# ----------------------------------------------------------------------------------------------------------
# Worker: one case in its own process


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _peak_kib(hwm_reset: bool) -> int:
    if hwm_reset:
        return _status_kib("VmHWM") or 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def run_case(
    mode: str, n: int, dim: int, chunk_size: int, repeats: int, seed: int, save: Path | None
) -> dict:
    """Time one forward + backward of `mode` at batch size n and measure its extra peak memory."""
    import torch

    from clip_train.losses import chunked_contrastive_loss, contrastive_loss

    def loss_and_grads(image, text, scale):
        if mode == "naive":
            out = contrastive_loss(image, text, scale)
        else:
            out = chunked_contrastive_loss(image, text, scale, chunk_size)
        grads = torch.autograd.grad(out.loss, [image, text, scale])
        return out.loss.detach(), grads

    def embeddings(rows: int, generator: torch.Generator):
        x = torch.randn(rows, dim, generator=generator)
        return x.div_(x.norm(dim=1, keepdim=True)).requires_grad_(True)  # in place: no N × d temporaries

    # Warm-up on a small batch: thread pool, BLAS, allocator; small enough to leave the peak alone.
    g = torch.Generator().manual_seed(seed + 1)
    loss_and_grads(embeddings(256, g), embeddings(256, g), torch.tensor(100.0, requires_grad=True))

    g = torch.Generator().manual_seed(seed)
    image, text = embeddings(n, g), embeddings(n, g)
    scale = torch.tensor(100.0, requires_grad=True)  # exp of CLIP's clamp, the numerically hardest case

    hwm_reset = _reset_peak()
    rss_before = _status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, grads = loss_and_grads(image, text, scale)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if save is None or len(times) < repeats:
            del grads
    extra_kib = _peak_kib(hwm_reset) - rss_before
    if save is not None:
        torch.save({"loss": loss, "grads": [t.detach() for t in grads]}, save)
    return {
        "mode": mode,
        "n": n,
        "time_s": min(times),
        "cpu_s": min(cpu_times),
        "extra_peak_bytes": max(extra_kib, 0) * 1024,
        "peak_method": "VmHWM" if hwm_reset else "ru_maxrss",
        "loss": float(loss),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------------------
# Driver


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def spawn_case(mode: str, n: int, args: argparse.Namespace, save: Path | None) -> dict:
    repeats = args.repeats if n <= 16384 else 1
    cmd = [
        sys.executable, __file__, "--worker", mode, "--n", str(n), "--dim", str(args.dim),
        "--chunk-size", str(args.chunk_size), "--repeats", str(repeats), "--seed", str(args.seed),
    ]  # fmt: skip
    if save is not None:
        cmd += ["--save", str(save)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} N={n} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_relative_error(naive: Path, chunked: Path) -> float:
    import torch

    a, b = torch.load(chunked), torch.load(naive)
    pairs = [(a["loss"], b["loss"]), *zip(a["grads"], b["grads"])]
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in pairs)


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f}"


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} instead of {FULL_SIZES}")
    parser.add_argument("--sizes", type=int, nargs="+", help="batch sizes N to run (overrides --quick)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension d (default 512)")
    parser.add_argument("--chunk-size", type=int, default=4096, help="chunked loss block side (default 4096)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case for N <= 16384 (best)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_case(args.worker, args.n, args.dim, args.chunk_size, args.repeats, args.seed,
                                  args.save)))  # fmt: skip
        return 0

    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    print(
        f"contrastive loss, forward + backward, fp32, d={args.dim}, chunk {args.chunk_size}, sizes {sizes}; "
        f"cpu threads {os.cpu_count()}; each case in a fresh subprocess",
        flush=True,
    )
    started = time.perf_counter()
    bytes_per_n2 = PRIOR_BYTES_PER_N2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            inputs = 4 * n * args.dim * 4  # embeddings and their gradients
            predicted = bytes_per_n2 * n * n + inputs
            available = available_bytes()
            naive = None
            naive_file = Path(tmp) / f"naive_{n}.pt"
            if predicted + SAFETY_BYTES <= available:
                print(f"  N={n:>6} plain   (predicted ~{gib(predicted)} GiB) ...", flush=True)
                naive = spawn_case("naive", n, args, naive_file)
                bytes_per_n2 = naive["extra_peak_bytes"] / (n * n)
            else:
                print(f"  N={n:>6} plain   skipped: needs ~{gib(predicted)} GiB, {gib(available)} available")
            print(f"  N={n:>6} chunked ...", flush=True)
            chunked_file = Path(tmp) / f"chunked_{n}.pt"
            chunked = spawn_case("chunked", n, args, chunked_file if naive else None)
            error = max_relative_error(naive_file, chunked_file) if naive else None
            for path in (naive_file, chunked_file):
                path.unlink(missing_ok=True)
            rows.append((n, naive, chunked, error, predicted))

    print()
    header = (
        f"{'N':>6} | {'plain s':>8} | {'chunked s':>9} | {'time ×':>6} | {'cpu-time ×':>10} | "
        f"{'plain extra MiB':>15} | {'chunked extra MiB':>17} | {'memory ×':>8} | {'max rel err':>11}"
    )
    print(header)
    print("-" * len(header))
    for n, naive, chunked, error, predicted in rows:
        c_time, c_mem = chunked["time_s"], chunked["extra_peak_bytes"] / 2**20
        if naive:
            n_time, n_mem = naive["time_s"], naive["extra_peak_bytes"] / 2**20
            cpu_ratio = chunked["cpu_s"] / naive["cpu_s"]
            print(
                f"{n:>6} | {n_time:>8.2f} | {c_time:>9.2f} | {c_time / n_time:>6.2f} | {cpu_ratio:>10.2f} | "
                f"{n_mem:>15.0f} | {c_mem:>17.0f} | {c_mem / n_mem:>8.4f} | {error:>11.2e}"
            )
        else:
            skipped = f"skipped: needs ~{gib(predicted)} GiB"
            print(
                f"{n:>6} | {'-':>8} | {c_time:>9.2f} | {'-':>6} | {'-':>10} | {skipped:>15} | "
                f"{c_mem:>17.0f} | {'-':>8} | {'-':>11}"
            )
    peak_method = rows[0][2]["peak_method"]
    print(
        f"(time: wall-clock forward + backward; cpu-time: CPU seconds of all threads; extra: peak RSS growth "
        f"over the inputs, by {peak_method}; max rel err: over the loss and the three gradients)"
    )

    failures = []
    for n, naive, chunked, error, _ in rows:
        if n != CHECK_AT:
            continue
        if naive is None:  # a skipped comparison must not read as a pass
            failures.append(f"N={n} not compared (plain loss skipped)")
            print(f"N={n}: plain loss skipped for lack of memory: the targets were NOT checked")
            continue
        mem_ratio = chunked["extra_peak_bytes"] / naive["extra_peak_bytes"]
        time_ratio = chunked["time_s"] / naive["time_s"]
        for name, value, limit in (
            ("memory ratio", mem_ratio, MAX_MEMORY_RATIO),
            ("time ratio", time_ratio, MAX_TIME_RATIO),
            ("max relative error", error, MAX_RELATIVE_ERROR),
        ):
            ok = value <= limit
            failures += [] if ok else [name]
            print(f"N={n}: {name} {value:.3g} {'<=' if ok else '>'} {limit:g}: {'ok' if ok else 'FAILED'}")
    errors = [e for *_, e, _ in rows if e is not None]
    worst = f"{max(errors):.1e}" if errors else "n/a"
    print(
        f"done: {len(rows)} sizes, {sum(r[1] is not None for r in rows)} plain cases run, worst relative "
        f"error {worst}, {time.perf_counter() - started:.0f} s"
        + (f"; FAILED: {', '.join(failures)}" if failures else "")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

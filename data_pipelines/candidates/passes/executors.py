"""Run a list of independent jobs: as local processes, or through submitit (a SLURM job array, or its
local/debug executors). The driver shows one progress bar over finished jobs with their row rate."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

EXECUTORS = ("processes", "local", "slurm", "debug")


@dataclass(frozen=True)
class ExecutorConfig:
    kind: str = "processes"  # one of EXECUTORS
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # "processes" only
    log_dir: str = "submitit_logs"  # submitit kinds: job scripts, stdout/stderr, pickled results
    slurm_partition: str | None = None
    timeout_min: int = 240
    cpus_per_task: int = 1
    mem_gb: int = 16
    array_parallelism: int = 256


def run_jobs(
    fn: Callable[[Any], dict],
    specs: Sequence[Any],
    cfg: ExecutorConfig,
    desc: str,
    rate_key: str | None = None,
) -> list[dict]:
    """Results of ``fn(spec)`` for every spec, in spec order. ``rate_key`` names a count in the results
    whose rate the progress bar shows (e.g. rows per second)."""
    if cfg.kind not in EXECUTORS:
        raise ValueError(f"unknown executor {cfg.kind!r} (choose from {', '.join(EXECUTORS)})")
    results: list[dict | None] = [None] * len(specs)
    start, total = time.perf_counter(), 0
    bar = tqdm(total=len(specs), desc=desc, unit="job", dynamic_ncols=True)

    def finished(i: int, result: dict) -> None:
        nonlocal total
        results[i] = result
        bar.update(1)
        if rate_key is not None and not result.get("skipped_as_done"):
            total += int(result.get(rate_key, 0))
            bar.set_postfix_str(f"{rate_key}={total:,} ({total / (time.perf_counter() - start):,.0f}/s)")

    try:
        if cfg.kind == "processes" and (cfg.workers <= 1 or len(specs) <= 1):
            for i, spec in enumerate(specs):
                finished(i, fn(spec))
        elif cfg.kind == "processes":
            with ProcessPoolExecutor(max_workers=min(cfg.workers, len(specs))) as pool:
                futures = {pool.submit(fn, spec): i for i, spec in enumerate(specs)}
                for future in as_completed(futures):
                    finished(futures[future], future.result())
        else:
            _run_submitit(fn, specs, cfg, desc, finished)
    finally:
        bar.close()
    return results  # type: ignore[return-value]


def _run_submitit(fn, specs, cfg: ExecutorConfig, desc: str, finished) -> None:
    import submitit

    executor = submitit.AutoExecutor(folder=Path(cfg.log_dir) / desc, cluster=cfg.kind)
    params: dict[str, Any] = {
        "timeout_min": cfg.timeout_min,
        "cpus_per_task": cfg.cpus_per_task,
        "mem_gb": cfg.mem_gb,
        "slurm_array_parallelism": cfg.array_parallelism,
    }
    if cfg.slurm_partition:
        params["slurm_partition"] = cfg.slurm_partition
    executor.update_parameters(**params)
    jobs = executor.map_array(fn, list(specs))  # one SLURM job array per pass
    index = {job.job_id: i for i, job in enumerate(jobs)}
    for job in submitit.helpers.as_completed(jobs, poll_frequency=0.2):
        finished(index[job.job_id], job.result())

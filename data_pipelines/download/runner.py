"""Running a download: the per-process asyncio pipeline, local worker processes, SLURM arrays (submitit),
then the pack into final shards.

Download phase, inside a process: one event loop and one aiohttp session fetch up to `concurrency` URLs at
once; each fetched body is decoded, resized and re-encoded in a thread pool while its request slot is
still held (so at most `concurrency` images are in memory); `parts_in_flight` parts are open at a time so
the network stays busy while a part's last slow URLs finish. A part is written only when all its rows
have an outcome, with samples in input-row order, so its bytes do not depend on the order responses
arrived in.

Across processes: parts are handed out from a shared counter (local) or split round-robin over array
tasks (SLURM); every part is independent, so any split gives the same output.

Pack phase, in the launching process once every part is complete: pack.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import queue as queue_module
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from data_pipelines.download.fetch import (
    BAD_CONTENT_TYPE,
    BAD_URL,
    BLOCKED_ADDRESS,
    CONNECTION_ERROR,
    FETCH_STATUSES,
    HTTP_ERROR,
    NOT_AN_IMAGE,
    OK,
    OPTED_OUT,
    ROBOTS_DISALLOWED,
    TIMEOUT,
    TOO_LARGE,
    TOO_MANY_REDIRECTS,
    FetchConfig,
    Fetcher,
)
from data_pipelines.download.images import (
    BAD_ASPECT_RATIO,
    DECODE_ERROR,
    DECOMPRESSION_BOMB,
    IMAGE_STATUSES,
    TOO_SMALL,
    UNSUPPORTED_FORMAT,
    ImageConfig,
    ImageRejected,
    ProcessedImage,
    process_image,
)
from data_pipelines.download.pack import (
    clear_final_shards,
    delete_parts,
    final_files_exist,
    is_packed,
    pack,
    read_packed,
)
from data_pipelines.download.plan import InputError, Plan, check_writable, make_plan
from data_pipelines.download.shard_writer import (
    MANIFEST_NAME,
    SHARD_PREFIX,
    Sample,
    WriteError,
    read_samples,
    total_status_counts,
    write_part,
)

ProgressFn = Callable[[int, int], None]  # (rows finished, of which successes) since the last call
ERROR = "error"  # an unexpected exception on one row
# The statuses a part can hold besides success: what --retry-statuses may name (duplicates are decided by
# the pack, never stored in a part, so they are never retried).
FAILURE_STATUSES = (*FETCH_STATUSES, *IMAGE_STATUSES, ERROR)
# What to check when every row failed with a status: a run without a single image is nearly always a
# setting or an outage, and the status alone does not say which setting. Keyed by the status constants so
# that a renamed status keeps its advice; test_download_resume checks that every failure status has one.
_CHECKS: dict[str, str] = {
    BAD_URL: "the URL column holds no http(s) URLs: is --url-column the image URL column?",
    BLOCKED_ADDRESS: "the hosts resolve to private or loopback addresses, refused by default; "
    "--allow-private-addresses allows them (intranet mirrors, tests)",
    ROBOTS_DISALLOWED: "the sites' robots.txt disallows this crawler (named by the first word of "
    "--user-agent), or answers 5xx",
    OPTED_OUT: "the sites opt out of AI use (X-Robots-Tag noai/noimageai)",
    HTTP_ERROR: "the servers answer with errors (the HTTP codes are in the reasons): are the URLs current, "
    "does the server refuse this --user-agent?",
    TIMEOUT: "no answer in time: an outage, a proxy or firewall in the way, or timeouts too short "
    "(--connect-timeout, --read-timeout, --total-timeout)",
    CONNECTION_ERROR: "no connection: is the network up, is a proxy or firewall in the way, do the hosts "
    "exist and answer?",
    TOO_MANY_REDIRECTS: "the URLs redirect more than --max-redirects times (or in a loop)",
    TOO_LARGE: "the bodies exceed --max-bytes",
    BAD_CONTENT_TYPE: "the URLs lead to pages, not images: is --url-column the image URL column?",
    NOT_AN_IMAGE: "the bodies are not images (a login or error page?): is --url-column the image URL column?",
    DECODE_ERROR: "the images are truncated or corrupt",
    DECOMPRESSION_BOMB: "the images exceed --max-pixels",
    TOO_SMALL: "the images are smaller than --min-size",
    BAD_ASPECT_RATIO: "the images are more elongated than --max-aspect-ratio",
    UNSUPPORTED_FORMAT: "the images are in a format this downloader does not decode",
    ERROR: "an unexpected exception (see the reason): a bug, please report it with the reason",
}


@dataclass(frozen=True)
class DownloadConfig:
    """Everything a download needs; picklable, so it travels to worker processes and SLURM tasks."""

    input: str
    output: str
    url_col: str = "url"
    text_col: str = "text"
    samples_per_shard: int = 10_000  # samples in each final shard (the last one: the remainder)
    rows_per_part: int = 10_000  # input rows in each part of the download phase
    fetch: FetchConfig = field(default_factory=FetchConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    processes: int = 1
    threads: int = 4  # image-processing threads per process
    parts_in_flight: int = 2
    retry_failed: bool = False
    retry_statuses: tuple[str, ...] = ()  # empty: every failure (duplicates are not failures)
    delete_parts: bool = False  # remove the parts after a successful pack (no retry or repack after)

    def __post_init__(self) -> None:
        # A misspelt status would match no row: the retry would silently do nothing.
        unknown = [s for s in self.retry_statuses if s not in FAILURE_STATUSES]
        if unknown:
            raise ValueError(
                f"unknown status(es) in retry_statuses (--retry-statuses): {', '.join(map(repr, unknown))}; "
                f"the failure statuses are {', '.join(FAILURE_STATUSES)}"
            )


@dataclass(frozen=True)
class PartJob:
    """One part to (re)write; `rows` set means retry: only those rows are fetched again."""

    index: int
    rows: tuple[int, ...] | None = None


@dataclass
class Summary:
    """What a run did: `rows`, `successes` and `parts_written` are this run's download work; the rest
    describes the whole output (None while parts are incomplete, as there are no final shards yet)."""

    parts_written: int
    rows: int
    successes: int
    seconds: float
    status_counts: dict[str, int]
    total_samples: int | None
    num_shards: int | None
    duplicates: int | None
    output: str
    incomplete_parts: list[int]
    # Set when every part is complete but holds no image at all: what failed and what to check. The CLI
    # exits non-zero with it. No shard and no manifest were written, unless an older version of this
    # downloader packed the output into one empty shard and its parts were deleted since.
    failure: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.successes / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.total_samples is None:
            done = f"{len(self.incomplete_parts)} part(s) still incomplete: rerun the same command to resume"
        elif self.total_samples == 0 and self.num_shards:
            # Only an older version of this downloader packed an output without images (see `failure`).
            done = f"no image in the whole output: its {self.num_shards} shard(s) hold 0 samples"
        elif self.total_samples == 0:
            done = "no image in the whole output, so no shard was written"
        else:
            done = (
                f"{self.total_samples} samples in {self.num_shards} shard(s), "
                f"{self.duplicates} duplicate(s) dropped"
            )
        return (
            f"downloaded {self.successes}/{self.rows} rows into {self.parts_written} part(s) in "
            f"{self.seconds:.1f} s ({self.images_per_second:.0f} images/s); {done}; output: {self.output}"
        )


def content_settings(config: DownloadConfig) -> dict:
    """The settings that change part bytes; a resume must use the same ones."""
    return {"url_col": config.url_col, "text_col": config.text_col, "image": asdict(config.image)}


# The command-line option of each setting that a resume must keep (content_settings' keys, nested ones
# joined with dots, and the plan's rows_per_part), so that a refused rerun names what to type.
# border_color has no option (Python API only) and is named as it is. test_download_resume checks that
# every setting has an entry.
SETTING_OPTIONS = {
    "rows_per_part": "--rows-per-part",
    "url_col": "--url-column",
    "text_col": "--text-column",
    "image.image_size": "--image-size",
    "image.resize_mode": "--resize-mode",
    "image.encode_format": "--format",
    "image.quality": "--quality",
    "image.min_size": "--min-size",
    "image.max_aspect_ratio": "--max-aspect-ratio",
    "image.max_pixels": "--max-pixels",
    "image.border_color": "ImageConfig.border_color",
    "image.resample": "--resample",
}


# ---------------------------------------------------------------------------------------------------------
# One process


def _row_record(plan: Plan, row: dict, **fields: object) -> dict:
    record = {
        "row": row["row"],
        "key": plan.key(row["row"]),
        "url": row["url"],
        "text": row["text"],
        "status": OK,
        "error": "",
        "http_status": None,
        "attempts": 0,
        "source_sha256": None,
        "sha256": None,
        "original_width": None,
        "original_height": None,
        "width": None,
        "height": None,
    }
    record.update(fields)
    return record


def _sample_meta(plan: Plan, row: dict, record: dict) -> dict:
    meta = {
        "key": record["key"],
        "url": row["url"],
        "text": row["text"],
        "original_width": record["original_width"],
        "original_height": record["original_height"],
        "width": record["width"],
        "height": record["height"],
        "sha256": record["sha256"],
        "source_sha256": record["source_sha256"],
    }
    for c in ("query", "matched_queries", "source"):
        if c in row:
            meta[c] = row[c]
    return meta


def _hash_and_process(data: bytes, config: ImageConfig) -> tuple[str, ProcessedImage | ImageRejected, str]:
    """(sha256 of the downloaded bytes, the processed image or the rejection, sha256 of the stored bytes)."""
    source_sha = hashlib.sha256(data).hexdigest()
    try:
        image = process_image(data, config)
    except ImageRejected as e:
        return source_sha, e, ""
    return source_sha, image, hashlib.sha256(image.data).hexdigest()


class _PartWorker:
    """The asyncio pipeline of one process."""

    def __init__(
        self, config: DownloadConfig, plan: Plan, progress: ProgressFn, before_write: Callable[[], None]
    ) -> None:
        self.config = config
        self.plan = plan
        self.progress = progress
        self.before_write = before_write  # runs right before a part is written (a worker's orphan check)
        self.out_dir = Path(plan.out_dir)

    async def run(self, jobs: Iterator[PartJob]) -> list[dict]:
        c = self.config
        self.loop = asyncio.get_running_loop()
        self.pool = ThreadPoolExecutor(max(1, c.threads), thread_name_prefix="image")
        self.slots = asyncio.Semaphore(c.fetch.concurrency)
        written: list[dict] = []
        try:
            async with Fetcher(c.fetch) as self.fetcher:

                async def lane() -> None:
                    for job in jobs:  # the iterator is shared: each lane takes the next job
                        written.append(await self._part(job))

                lanes = [asyncio.ensure_future(lane()) for _ in range(max(1, c.parts_in_flight))]
                try:
                    await asyncio.gather(*lanes)
                except BaseException:
                    # One lane failed (a write error, say): stop the others while the session is still
                    # open. Left running, their requests would fail as the session closes and their part
                    # be written with every row an `error`, as if those rows had been tried.
                    for task in lanes:
                        task.cancel()
                    await asyncio.gather(*lanes, return_exceptions=True)
                    raise
        finally:
            self.pool.shutdown(wait=True)
        return written

    async def _one(self, row: dict) -> tuple[dict, Sample | None]:
        """Fetch and process one row -> (its status record, its sample or None)."""
        url = row["url"]
        if not url:
            return _row_record(self.plan, row, status="bad_url", error="empty URL"), None
        async with self.slots:
            fetched = await self.fetcher.fetch(url)
            if fetched.status != OK:
                record = _row_record(
                    self.plan,
                    row,
                    status=fetched.status,
                    error=fetched.reason,
                    http_status=fetched.http_status,
                    attempts=fetched.attempts,
                )
                return record, None
            data = fetched.data
            assert data is not None
            # Hashing and image work both run in the pool: the event loop thread only does network I/O.
            source_sha, image, image_sha = await self.loop.run_in_executor(
                self.pool, _hash_and_process, data, self.config.image
            )
            if isinstance(image, ImageRejected):
                record = _row_record(
                    self.plan,
                    row,
                    status=image.status,
                    error=image.reason,
                    http_status=200,
                    attempts=fetched.attempts,
                    source_sha256=source_sha,
                )
                return record, None
        record = _row_record(
            self.plan,
            row,
            http_status=200,
            attempts=fetched.attempts,
            source_sha256=source_sha,
            sha256=image_sha,
            original_width=image.original_width,
            original_height=image.original_height,
            width=image.width,
            height=image.height,
        )
        sample = Sample(
            record["key"],
            image.data,
            self.config.image.encode_format,
            row["text"],
            _sample_meta(self.plan, row, record),
        )
        return record, sample

    async def _tracked(self, row: dict) -> tuple[dict, Sample | None]:
        try:
            record, sample = await self._one(row)
        except Exception as e:
            record = _row_record(self.plan, row, status=ERROR, error=f"{type(e).__name__}: {e}")
            sample = None
        self.progress(1, int(sample is not None))
        return record, sample

    async def _part(self, job: PartJob) -> dict:
        start = time.monotonic()
        all_rows = await self.loop.run_in_executor(self.pool, self.plan.part_rows, job.index)
        previous: dict[int, dict] = {}
        kept: dict[str, Sample] = {}
        if job.rows is not None:  # retry: keep every finished row, fetch only the failed ones again
            tar_path, parquet_path, _ = self.plan.part_paths(job.index)
            previous = {r["row"]: r for r in pq.read_table(parquet_path).to_pylist()}
            kept = await self.loop.run_in_executor(self.pool, read_samples, tar_path)
            wanted = set(job.rows)
            todo = [r for r in all_rows if r["row"] in wanted]
        else:
            todo = all_rows
        outcomes = await asyncio.gather(*(self._tracked(r) for r in todo))
        fresh = {record["row"]: (record, sample) for record, sample in outcomes}

        # Rows and samples in row order, so the part's bytes do not depend on response timing. Every
        # success is kept here, duplicates too: the pack drops them over the whole dataset.
        records, samples = [], []
        for row in all_rows:
            if row["row"] in fresh:
                record, sample = fresh[row["row"]]
            else:  # retry: a row not fetched again keeps its record and, if it succeeded, its sample
                record = previous[row["row"]]
                sample = kept[record["key"]] if record["status"] == OK else None
            records.append(record)
            if sample is not None:
                samples.append(sample)
        stats = {"seconds": round(time.monotonic() - start, 3), "retried_rows": len(todo) if previous else 0}

        def write() -> dict:
            self.before_write()
            return write_part(self.plan.parts_dir, job.index, samples, records, stats)

        return await self.loop.run_in_executor(self.pool, write)


def run_jobs(
    config: DownloadConfig,
    plan: Plan,
    jobs: Iterator[PartJob],
    progress: ProgressFn,
    before_write: Callable[[], None] = lambda: None,
) -> list[dict]:
    """Run part jobs in this process (blocking); returns the stats of the parts written."""
    return asyncio.run(_PartWorker(config, plan, progress, before_write).run(jobs))


# ---------------------------------------------------------------------------------------------------------
# Deciding the work


def plan_jobs(config: DownloadConfig, plan: Plan) -> list[PartJob]:
    """Unfinished parts; in retry mode also the finished parts' failed rows."""
    jobs = [PartJob(i) for i in plan.pending_parts()]
    if config.retry_failed:
        statuses = frozenset(config.retry_statuses) if config.retry_statuses else None
        for i in plan.complete_parts():
            rows = plan.failed_rows(i, statuses)
            if rows:
                jobs.append(PartJob(i, tuple(rows)))
        jobs.sort(key=lambda j: j.index)
    return jobs


def _job_rows(plan: Plan, job: PartJob) -> int:
    if job.rows is not None:
        return len(job.rows)
    return min(plan.rows_per_part, plan.num_rows - job.index * plan.rows_per_part)


# ---------------------------------------------------------------------------------------------------------
# Local processes


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent: int) -> Callable[[], None]:
    """Make this worker end when `parent` (the launcher) dies; returns the check to run before each part
    is taken and written.

    A worker left running after a kill -9 of its launcher could write a part while the rerun writes the
    same part. On Linux the kernel SIGKILLs the worker as its parent dies (PR_SET_PDEATHSIG); the check,
    a comparison of getppid() with the launcher's pid, covers other systems and a parent that died before
    the prctl call.
    """

    def exit_if_orphaned() -> None:
        if os.getppid() != parent:  # reparented: the launcher is gone, so stop quietly
            os._exit(1)

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no prctl: the check alone
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    exit_if_orphaned()
    return exit_if_orphaned


def _worker_main(
    config: DownloadConfig, plan: Plan, jobs: Sequence[PartJob], counter, queue, parent: int
) -> None:
    """Entry of a local worker process: takes jobs from the shared counter, reports progress on queue.

    parent: the launcher's pid, passed in rather than read here, so that a launcher dead before this
    worker starts is noticed too."""
    exit_if_orphaned = _die_with_parent(parent)
    pending = [0, 0]
    last = [time.monotonic()]

    def progress(done: int, ok: int) -> None:
        pending[0] += done
        pending[1] += ok
        now = time.monotonic()
        if now - last[0] > 0.3:
            exit_if_orphaned()
            queue.put(("progress", pending[0], pending[1]))
            pending[0] = pending[1] = 0
            last[0] = now

    def next_jobs() -> Iterator[PartJob]:
        while True:
            exit_if_orphaned()
            with counter.get_lock():
                i = counter.value
                counter.value += 1
            if i >= len(jobs):
                return
            yield jobs[i]

    try:
        stats = run_jobs(config, plan, next_jobs(), progress, before_write=exit_if_orphaned)
        queue.put(("progress", pending[0], pending[1]))
        queue.put(("done", len(stats), None))
    except WriteError as e:
        # Its one line, not a traceback: the launcher raises it again once the other workers are done.
        queue.put(("write_error", 0, str(e)))
    except BaseException:
        queue.put(("error", 0, traceback.format_exc()))
        raise


class _Bar:
    """tqdm with images/s and the success rate; silent when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.done = self.ok = 0
        self.start = time.monotonic()
        self.last_postfix = 0.0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="row", dynamic_ncols=True, smoothing=0.1, file=sys.stderr)

    def update(self, done: int, ok: int) -> None:
        self.done += done
        self.ok += ok
        if self.bar is not None:
            self.bar.update(done)
            now = time.monotonic()
            if now - self.last_postfix > 0.5:
                self.last_postfix = now
                rate = self.ok / max(now - self.start, 1e-9)
                self.bar.set_postfix_str(
                    f"{rate:.0f} img/s, ok {self.ok / max(self.done, 1):.1%}", refresh=False
                )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_local(config: DownloadConfig, plan: Plan, jobs: list[PartJob], bar: _Bar) -> list[str]:
    """Run jobs in this process (processes == 1) or in spawned worker processes; returns worker errors."""
    if config.processes <= 1 or len(jobs) <= 1:
        run_jobs(config, plan, iter(jobs), bar.update)
        return []
    ctx = mp.get_context("spawn")
    counter = ctx.Value("l", 0)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker_main, args=(config, plan, jobs, counter, queue, os.getpid()), daemon=True)
        for _ in range(min(config.processes, len(jobs)))
    ]
    for p in procs:
        p.start()
    errors: list[str] = []
    write_errors: list[str] = []
    finished = 0
    while finished < len(procs):
        try:
            kind, a, b = queue.get(timeout=0.5)
        except queue_module.Empty:
            if not any(p.is_alive() for p in procs):  # e.g. killed by the OOM killer: nothing more comes
                errors.extend(f"worker {p.pid} exited with code {p.exitcode}" for p in procs if p.exitcode)
                break
            continue
        if kind == "progress":
            bar.update(a, b)
        else:
            finished += 1
            if kind == "error":
                errors.append(str(b))
            elif kind == "write_error":
                write_errors.append(str(b))
    for p in procs:
        p.join(timeout=10)
    if write_errors:  # as in one process: the run stops with the disk's error (the first, if several)
        raise WriteError(None, write_errors[0])
    return errors


# ---------------------------------------------------------------------------------------------------------
# SLURM job arrays (submitit)


def slurm_task(config: DownloadConfig, plan: Plan, jobs: Sequence[PartJob]) -> int:
    """Body of one array task: run its share of the jobs in local processes; returns rows finished."""
    bar = _Bar(sum(_job_rows(plan, j) for j in jobs), enabled=False)
    errors = _run_local(config, plan, list(jobs), bar)
    if errors:
        raise RuntimeError("download worker failed:\n" + "\n".join(errors))
    return bar.done


def _run_submitit(
    config: DownloadConfig, plan: Plan, jobs: list[PartJob], bar: _Bar, submitit_options: dict
) -> list[str]:
    import submitit

    options = dict(submitit_options)
    cluster = options.pop("cluster", None)  # None: SLURM when available; "local": the local executor
    num_tasks = max(1, min(int(options.pop("array_size", 1)), len(jobs)))
    folder = Path(plan.out_dir) / "_submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    options.setdefault("timeout_min", 24 * 60)
    if cluster != "local":
        options.setdefault("cpus_per_task", max(1, config.processes))
    executor.update_parameters(**options)
    splits = [jobs[t::num_tasks] for t in range(num_tasks)]
    progress = _PartProgress(plan, jobs, bar)
    submitted = executor.map_array(slurm_task, [config] * num_tasks, [plan] * num_tasks, splits)
    print(f"submitted {len(submitted)} array task(s): {submitted[0].job_id.split('_')[0]}; logs in {folder}")
    errors = []
    remaining = dict(enumerate(submitted))
    while remaining:
        progress.poll()
        for t, job in list(remaining.items()):
            if job.done():
                del remaining[t]
                try:
                    job.result()
                except Exception as e:
                    errors.append(f"array task {t}: {e}")
                progress.poll(finished=[j.index for j in splits[t]])
        time.sleep(1.0)
    return errors


class _PartProgress:
    """Progress of array tasks, read from the parts they finish: a part's stats file is written last, so a
    new one (other than the one there at submission) means the part is done, with its success count.

    Array tasks run on other machines and report nothing back until they end, hours later; without this
    the bar would stand still until then. A retried part's successes before the retry are subtracted, so
    the count is this run's. Stats files are compared by modification time and size as found at submission,
    not against this machine's clock (a shared file system's clock may differ)."""

    def __init__(self, plan: Plan, jobs: list[PartJob], bar: _Bar) -> None:
        self.plan, self.bar = plan, bar
        self.pending = {j.index: j for j in jobs}
        self.found_at_submission = {j.index: self._signature(j.index) for j in jobs}
        self.successes_before = {
            j.index: (plan.part_stats(j.index) or {}).get("successes", 0) for j in jobs if j.rows is not None
        }

    def _signature(self, index: int) -> tuple[int, int] | None:
        try:
            st = self.plan.part_paths(index)[2].stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def poll(self, finished: Sequence[int] = ()) -> None:
        """Advance the bar by the parts done since the last poll; `finished`: parts of an array task that
        has ended, counted now even if it wrote no stats (it failed), with no successes then."""
        ended = set(finished)
        for index in list(self.pending):
            new = self._signature(index) not in (None, self.found_at_submission[index])
            stats = self.plan.part_stats(index) if new else None
            if stats is None and index not in ended:
                continue  # not done (or its stats are being written)
            job = self.pending.pop(index)
            ok = 0 if stats is None else stats["successes"] - self.successes_before.get(index, 0)
            self.bar.update(_job_rows(self.plan, job), max(ok, 0))


# ---------------------------------------------------------------------------------------------------------
# The whole run


def _summary(
    plan: Plan,
    manifest: dict | None,
    *,
    parts_written: int = 0,
    rows: int = 0,
    successes: int = 0,
    seconds: float = 0.0,
    incomplete_parts: list[int] | None = None,
) -> Summary:
    """A Summary of this run's work whose whole-output fields come from `manifest` (None: not packed)."""
    return Summary(
        parts_written=parts_written,
        rows=rows,
        successes=successes,
        seconds=seconds,
        status_counts=dict(manifest["status_counts"]) if manifest else {},
        total_samples=manifest["num_samples"] if manifest else None,
        num_shards=manifest["num_shards"] if manifest else None,
        duplicates=manifest["duplicates"] if manifest else None,
        output=plan.out_dir,
        incomplete_parts=incomplete_parts or [],
    )


def _first_reasons(parquets: Iterable[Path], statuses: set[str]) -> dict[str, tuple[str, str]]:
    """status -> (url, reason) of its first row, read from row parquets (in order) until every status
    has one."""
    examples: dict[str, tuple[str, str]] = {}
    for path in parquets:
        rows = pq.read_table(path, columns=["url", "status", "error"]).to_pylist()
        for row in rows:
            examples.setdefault(row["status"], (row["url"] or "", row["error"] or ""))
        if statuses <= examples.keys():
            break
    return examples


def _no_image_failure(plan: Plan, counts: dict[str, int], *, parts_kept: bool) -> str:
    """The message of a complete output without a single image: the failures by status, with the first
    row's reason and what to check for each, then how to go on.

    parts_kept False: the parts were deleted after an older version of this downloader packed the output
    into one shard of zero samples; that shard's parquet still holds every row's reason.
    """
    rows = sum(counts.values())
    if parts_kept:
        parquets = [plan.part_paths(i)[1] for i in range(plan.num_parts)]
        state = "has no shard and no manifest"
    else:
        parquets = sorted(Path(plan.out_dir).glob(f"{SHARD_PREFIX}-*.parquet"))
        state = "still holds the empty shard and the manifest that an older version of this downloader wrote"
    examples = _first_reasons(parquets, set(counts))
    lines = [
        f"no image was downloaded: all {rows} input row(s) of {plan.input} failed, so {plan.out_dir} "
        f"{state}. Failures by status:"
    ]
    for status, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        line = f"  {status}: {n} row(s)"
        if status in examples:
            url, reason = examples[status]
            line += f", e.g. {url}: {reason}"
        lines.append(line)
        lines.append(f"    check: {_CHECKS.get(status, 'see the reasons in the row parquets')}")
    if parts_kept:
        lines.append(
            f"Every row's reason is in {plan.parts_dir}/part-*.parquet. After an outage, rerun the same "
            "command with --retry-failed: only the failed rows are fetched again, then the shards are "
            "written. A wrong column, input or image setting needs a new output folder (or remove "
            f"{plan.out_dir} first)."
        )
    else:
        if parquets:  # someone may have removed the shards by hand, leaving the manifest
            lines.append(f"Every row's reason is in {plan.out_dir}/{SHARD_PREFIX}-*.parquet.")
        lines.append(
            "Its parts were deleted (--delete-parts), so it cannot be retried: download into a new output "
            "folder."
        )
    return "\n".join(lines)


def _finished_without_parts(config: DownloadConfig, plan: Plan, packed: dict, start: float) -> Summary:
    """A rerun on an output whose parts were deleted: nothing can be downloaded, retried or repacked."""
    if config.retry_failed:
        raise InputError(
            f"the parts of {plan.out_dir} were deleted after packing (--delete-parts), so its failed rows "
            "cannot be retried; download into a new output folder (without --delete-parts) to retry"
        )
    if config.samples_per_shard != packed["samples_per_shard"]:
        old, new = packed["samples_per_shard"], config.samples_per_shard
        raise InputError(
            f"--samples-per-shard {old} -> {new}: the parts of {plan.out_dir} were deleted after packing "
            f"(--delete-parts), so it cannot be repacked with {new} samples per shard. It is finished with "
            f"{old}: rerun with --samples-per-shard {old} to see its summary, or download into a new output "
            "folder for the new size"
        )
    delete_parts(plan)  # finishes a deletion that a kill interrupted
    try:
        manifest = json.loads((Path(plan.out_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError) as e:
        raise InputError(
            f"{plan.out_dir}: its parts were deleted and its manifest is unreadable ({e})"
        ) from e
    summary = _summary(plan, manifest, seconds=time.monotonic() - start)
    if manifest.get("num_samples") == 0:  # packed into one empty shard by an older version of this tool
        summary.failure = _no_image_failure(plan, summary.status_counts, parts_kept=False)
    return summary


def _all_part_stats(plan: Plan) -> list[dict]:
    """The stats of every part, when `plan.pending_parts()` has just found them all complete."""
    all_stats: list[dict] = []
    for i in range(plan.num_parts):
        stats = plan.part_stats(i)
        if stats is None:  # only another process writing this output can get here
            raise RuntimeError(
                f"part {i} in {plan.parts_dir} was complete a moment ago and is not now: is another "
                f"download writing to {plan.out_dir}?"
            )
        all_stats.append(stats)
    return all_stats


def _writes_ahead(config: DownloadConfig, plan: Plan, jobs: list[PartJob]) -> bool:
    """Whether this run will change the output: parts to download, a pack to (re)do, parts to delete, or
    an older version's empty shard to remove. A finished output is only read, so the same command on one
    made read-only (to protect it) still reports on it."""
    if jobs:
        return True
    if not any(stats["successes"] for stats in _all_part_stats(plan)):  # no image: nothing is packed
        return final_files_exist(plan)
    return config.delete_parts or not is_packed(plan, config.samples_per_shard)


def run_download(
    config: DownloadConfig,
    *,
    progress: bool = True,
    submitit_options: dict | None = None,
    log: Callable[[str], None] = print,
) -> Summary:
    """Plan (or check the existing plan), download the remaining parts, then pack them into final shards
    and write the manifest when every part is complete."""
    start = time.monotonic()
    if config.samples_per_shard < 1:
        raise InputError(f"samples_per_shard must be >= 1, got {config.samples_per_shard}")
    plan = make_plan(
        config.input,
        config.output,
        url_col=config.url_col,
        text_col=config.text_col,
        rows_per_part=config.rows_per_part,
        settings=content_settings(config),
        setting_names=SETTING_OPTIONS,
    )
    packed = read_packed(plan)
    if packed is not None and packed.get("parts_deleted"):
        return _finished_without_parts(config, plan, packed, start)
    jobs = plan_jobs(config, plan)
    if _writes_ahead(config, plan, jobs):
        for folder in (Path(plan.out_dir), plan.parts_dir):
            check_writable(folder, Path(plan.out_dir))
    if packed is not None and packed.get("samples_per_shard") != config.samples_per_shard:
        log(
            f"--samples-per-shard {packed.get('samples_per_shard')} -> {config.samples_per_shard}: the "
            "shards are repacked from the parts once every part is complete (no image fetched again for it)"
        )
    total_rows = sum(_job_rows(plan, j) for j in jobs)
    done_before = plan.num_parts - len(plan.pending_parts())
    how = "a SLURM array via submitit" if submitit_options else f"{max(1, config.processes)} process(es)"
    log(
        f"{plan.num_rows} input rows -> {plan.num_parts} part(s) of {plan.rows_per_part} rows "
        f"in {plan.parts_dir}; {done_before} already complete; now {len(jobs)} job(s), {total_rows} rows, "
        f"on {how} (concurrency {config.fetch.concurrency}, {config.threads} image threads each)"
    )
    bar = _Bar(total_rows, enabled=progress and total_rows > 0)
    try:
        if not jobs:
            errors: list[str] = []
        elif submitit_options:
            errors = _run_submitit(config, plan, jobs, bar, submitit_options)
        else:
            errors = _run_local(config, plan, jobs, bar)
    finally:
        bar.close()
    for e in errors:
        log(f"error: {e}")
    incomplete = plan.pending_parts()
    written = {j.index for j in jobs} - set(incomplete)
    successes = bar.ok
    manifest = None
    failure = None
    part_stats = [] if incomplete else _all_part_stats(plan)
    if part_stats and not any(stats["successes"] for stats in part_stats):
        # Not one image in the whole output: packing would give a single shard of zero samples. Write
        # none (and remove one an older version wrote), keep the parts (the reasons, and --retry-failed
        # needs them) and report the failures; the CLI exits non-zero on it.
        clear_final_shards(plan)
        counts = total_status_counts(part_stats)
        manifest = {"status_counts": counts, "num_samples": 0, "num_shards": 0, "duplicates": 0}
        failure = _no_image_failure(plan, counts, parts_kept=True)
        if config.delete_parts:
            log(f"kept the parts in {plan.parts_dir} despite --delete-parts: they hold the failures' reasons")
    elif not incomplete:
        result = pack(plan, config.samples_per_shard, manifest_extra={"input": plan.input}, progress=progress)
        manifest = result.manifest
        if result.shards_written:
            log(
                f"packed {plan.num_parts} part(s) into {manifest['num_shards']} shard(s) of "
                f"{config.samples_per_shard} samples ({result.shards_written} written, "
                f"{manifest['duplicates']} duplicate(s) dropped) in {result.seconds:.1f} s"
            )
        if config.delete_parts:
            delete_parts(plan)
            log(f"deleted the parts in {plan.parts_dir}: this output can no longer be retried or repacked")
    summary = _summary(
        plan,
        manifest,
        parts_written=len(written),
        rows=bar.done,
        successes=successes,
        seconds=time.monotonic() - start,
        incomplete_parts=incomplete,
    )
    summary.failure = failure
    return summary


__all__ = [
    "DownloadConfig",
    "PartJob",
    "Summary",
    "content_settings",
    "plan_jobs",
    "run_download",
    "run_jobs",
]

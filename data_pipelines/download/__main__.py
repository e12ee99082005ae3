"""CLI: `python -m data_pipelines.download INPUT OUTPUT [options]` (see --help and README.md)."""

from __future__ import annotations

import argparse
import math
import sys

from data_pipelines.download.fetch import DEFAULT_USER_AGENT, FetchConfig
from data_pipelines.download.images import ENCODE_FORMATS, RESAMPLE_FILTERS, RESIZE_MODES, ImageConfig
from data_pipelines.download.plan import InputError
from data_pipelines.download.runner import DownloadConfig, run_download
from data_pipelines.download.shard_writer import WriteError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.download",
        description=(
            "Download the images of a URL/text table into WebDataset shards of a fixed number of samples "
            "(shard-000000.tar ... with a stats JSON and a per-row status parquet beside each, and "
            "manifest.json), exact duplicate images dropped. Downloads go into parts of a fixed number of "
            "input rows (OUTPUT/_parts), packed into the shards once all are done. Rerun the same command "
            "to resume after a crash or kill; add --retry-failed to re-fetch only the rows that failed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", help="table of URLs and texts: a parquet/CSV/JSONL file or a folder of them")
    p.add_argument("output", help="output folder for the shards (created; reused to resume)")
    g = p.add_argument_group("input and shards")
    # --url-column/--text-column as in `python -m data_pipelines.extract`; the older --url-col/--text-col
    # stay as aliases so that existing commands keep working.
    g.add_argument(
        "--url-column", "--url-col", dest="url_column", default="url", help="column holding the image URL"
    )
    g.add_argument(
        "--text-column", "--text-col", dest="text_column", default="text", help="column holding the caption"
    )
    g.add_argument(
        "--samples-per-shard",
        type=int,
        default=10_000,
        help="samples in each final shard (the last one holds the remainder); a rerun with another value "
        "repacks without downloading",
    )
    g.add_argument(
        "--rows-per-part",
        type=int,
        default=10_000,
        help="input rows per download part: the unit of resume, retry and work split (a rerun must keep it)",
    )
    g = p.add_argument_group("images")
    g.add_argument("--image-size", type=int, default=256, help="output size in pixels")
    g.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default="center_crop",
        help="longest: longest side = size; center_crop: short side = size, then crop; "
        "border: longest side = size, padded to a square; none: keep the size",
    )
    g.add_argument(
        "--resample",
        choices=sorted(RESAMPLE_FILTERS),
        default="bilinear",
        help="resampling filter (all antialiased when downscaling)",
    )
    g.add_argument("--format", choices=sorted(ENCODE_FORMATS), default="jpg", help="re-encoding format")
    g.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (1-100)")
    g.add_argument("--min-size", type=int, default=0, help="drop images whose shorter side is smaller")
    g.add_argument(
        "--max-aspect-ratio", type=float, default=math.inf, help="drop images longer/shorter above"
    )
    g.add_argument(
        "--max-pixels", type=int, default=89_478_485, help="decompression-bomb limit (width*height)"
    )
    g = p.add_argument_group("network")
    g.add_argument(
        "--user-agent",
        default=DEFAULT_USER_AGENT,
        help="User-Agent header; its first token is the name robots.txt and X-Robots-Tag rules use",
    )
    g.add_argument("--concurrency", type=int, default=64, help="requests in flight per process (>= 1)")
    g.add_argument("--per-host", type=int, default=16, help="connections per host per process (>= 1)")
    g.add_argument("--connect-timeout", type=float, default=5.0, help="seconds")
    g.add_argument("--read-timeout", type=float, default=10.0, help="seconds without any byte arriving")
    g.add_argument(
        "--total-timeout", type=float, default=30.0, help="seconds per attempt, redirects included"
    )
    g.add_argument("--retries", type=int, default=2, help="extra attempts after a transient failure")
    g.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds (doubles)")
    g.add_argument("--max-redirects", type=int, default=5)
    g.add_argument("--max-bytes", type=int, default=20 * 1024 * 1024, help="largest body accepted")
    g.add_argument(
        "--allow-private-addresses",
        action="store_true",
        help="also fetch from hosts resolving to private/loopback/link-local addresses "
        "(tests and intranet mirrors only)",
    )
    g = p.add_argument_group("execution")
    g.add_argument("--processes", type=int, default=1, help="worker processes (per SLURM task with --slurm)")
    g.add_argument("--threads", type=int, default=4, help="image-processing threads per process")
    g.add_argument("--parts-in-flight", type=int, default=2, help="parts open at a time per process")
    g.add_argument(
        "--retry-failed",
        action="store_true",
        help="also re-fetch the failed rows of finished parts (e.g. after a server recovered), then repack",
    )
    g.add_argument(
        "--retry-statuses",
        default="",
        help="comma list of failure statuses to retry, e.g. timeout,http_error (empty: every failure; "
        "duplicates are not failures); an unknown name is an error",
    )
    g.add_argument(
        "--delete-parts",
        action="store_true",
        help="delete OUTPUT/_parts' tars and parquets after a successful pack (they hold every sample a "
        "second time); the output can then no longer be retried or repacked",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("SLURM (submitit)")
    g.add_argument("--slurm", action="store_true", help="run as a SLURM job array through submitit")
    g.add_argument("--slurm-array-size", type=int, default=1, help="array tasks; parts are split over them")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--slurm-time-min", type=int, default=24 * 60, help="time limit per task in minutes")
    g.add_argument(
        "--submitit-local",
        action="store_true",
        help="use submitit's local executor instead of SLURM (for testing the array path)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> DownloadConfig:
    fetch = FetchConfig(
        user_agent=args.user_agent,
        concurrency=args.concurrency,
        per_host=args.per_host,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        total_timeout=args.total_timeout,
        retries=args.retries,
        backoff=args.backoff,
        max_redirects=args.max_redirects,
        max_bytes=args.max_bytes,
        allow_private_addresses=args.allow_private_addresses,
    )
    image = ImageConfig(
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        encode_format=args.format,
        quality=args.quality,
        min_size=args.min_size,
        max_aspect_ratio=args.max_aspect_ratio,
        max_pixels=args.max_pixels,
        resample=args.resample,
    )
    statuses = tuple(s.strip() for s in args.retry_statuses.split(",") if s.strip())
    return DownloadConfig(
        input=args.input,
        output=args.output,
        url_col=args.url_column,
        text_col=args.text_column,
        samples_per_shard=args.samples_per_shard,
        rows_per_part=args.rows_per_part,
        fetch=fetch,
        image=image,
        processes=args.processes,
        threads=args.threads,
        parts_in_flight=args.parts_in_flight,
        retry_failed=args.retry_failed or bool(statuses),
        retry_statuses=statuses,
        delete_parts=args.delete_parts,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    submitit_options = None
    if args.slurm or args.submitit_local:
        submitit_options = {"array_size": args.slurm_array_size, "timeout_min": args.slurm_time_min}
        if args.submitit_local:
            submitit_options["cluster"] = "local"
        elif args.slurm_partition:
            submitit_options["slurm_partition"] = args.slurm_partition
    try:
        summary = run_download(config, progress=not args.no_progress, submitit_options=submitit_options)
    except InputError as e:  # bad input, output folder or settings, found before any work
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:
        # A disk problem during the run (full, permissions changed): what was written stays valid, so
        # this is an unfinished run like exit 1 below, resumed by the same command once the disk is fixed.
        print(f"error: {e}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.status_counts.items(), key=lambda kv: -kv[1]))
    if counts:
        print(f"statuses over the whole output: {counts}")
    print(summary.line())
    if summary.failure:
        # Exit 1 like an incomplete run: a script chaining download -> train must stop here, not train on
        # an output without images.
        print(f"error: {summary.failure}", file=sys.stderr)
        return 1
    return 0 if not summary.incomplete_parts else 1


if __name__ == "__main__":
    sys.exit(main())

"""Extract pass: candidate sources → URL checks → whole-word query matching → matched pairs by URL bucket.

    python -m data_pipelines.extract --queries queries.txt --tables laion/ --url-column URL \\
        --text-column TEXT --warc crawl/*.warc.gz --work work/ --buckets 64

Then run ``python -m data_pipelines.balance --work work/ --out candidates/``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .candidates.passes.executors import EXECUTORS, ExecutorConfig
from .candidates.pipeline import plan_extract, run_extract_pass
from .candidates.sources.live_pages import CrawlConfig, read_seeds


def number(kind: type[int] | type[float], low: float, high: float = math.inf) -> Callable[[str], float]:
    """An argparse ``type`` for a finite number in [low, high]: a bad value is a usage error (exit 2)
    before any work, never a hang (``--per-host 0``) or a silent reinterpretation (``--delay -1``)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not (low <= value <= high and math.isfinite(value)):
            bounds = f"at least {low}" if high == math.inf else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("jobs")
    g.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="processes",
        help="processes: local process pool; slurm: one job array per pass (submitit); "
        "local/debug: submitit's local executors (default: %(default)s)",
    )
    g.add_argument(
        "--workers",
        type=number(int, 1),
        default=None,
        help="processes for --executor processes (default: all cores)",
    )
    g.add_argument("--log-dir", default=None, help="submitit job folders (default: WORK/submitit)")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--timeout-min", type=number(int, 1), default=240, help="per job, submitit executors")
    g.add_argument("--mem-gb", type=number(int, 1), default=16, help="per job, submitit executors")


def executor_config(args: argparse.Namespace) -> ExecutorConfig:
    kwargs = {"workers": args.workers} if args.workers else {}
    return ExecutorConfig(
        kind=args.executor,
        log_dir=args.log_dir or str(Path(args.work) / "submitit"),
        slurm_partition=args.slurm_partition,
        timeout_min=args.timeout_min,
        mem_gb=args.mem_gb,
        **kwargs,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.extract",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--queries", nargs="+", required=True, help="query list file(s), one query per line")
    p.add_argument(
        "--tables", nargs="*", default=[], help="parquet/CSV/TSV/JSONL files (optionally .gz) or folders"
    )
    p.add_argument(
        "--url-column", default="url", help="image URL column of the tables (default: %(default)s)"
    )
    p.add_argument("--text-column", default="text", help="text column of the tables (default: %(default)s)")
    p.add_argument("--warc", nargs="*", default=[], help="WARC/WAT files (optionally .gz) or folders")
    p.add_argument("--seeds", default=None, help="file of seed URLs for a live crawl, one per line")
    p.add_argument(
        "--max-depth",
        type=number(int, 0),
        default=1,
        help="crawl: link depth from the seeds (default: %(default)s)",
    )
    p.add_argument(
        "--max-pages", type=number(int, 1), default=1000, help="crawl: pages at most (default: %(default)s)"
    )
    p.add_argument(
        "--user-agent", default=CrawlConfig.user_agent, help="crawl: User-Agent header and robots.txt name"
    )
    p.add_argument(
        "--delay", type=number(float, 0), default=1.0, help="crawl: seconds between requests to one host"
    )
    p.add_argument("--per-host", type=number(int, 1), default=1, help="crawl: concurrent requests per host")
    p.add_argument("--work", required=True, help="work folder for the matched pairs and job markers")
    p.add_argument(
        "--buckets",
        type=number(int, 1),
        default=16,
        help="URL buckets = jobs of the later passes (default: %(default)s)",
    )
    add_executor_args(p)
    args = p.parse_args(argv)

    start = time.perf_counter()
    try:
        crawl = CrawlConfig(
            max_depth=args.max_depth,
            max_pages=args.max_pages,
            user_agent=args.user_agent,
            delay_s=args.delay,
            per_host_concurrency=args.per_host,
        )
        seeds = read_seeds(args.seeds) if args.seeds else []
        plan = plan_extract(
            Path(args.work),
            args.queries,
            args.tables,
            args.warc,
            seeds,
            args.url_column,
            args.text_column,
            args.buckets,
            crawl,
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"extract: {len(plan.jobs)} job(s) ({args.executor}), {plan.queries:,} queries → {args.work} "
        f"in {args.buckets} URL buckets",
        file=sys.stderr,
    )
    tally = run_extract_pass(plan.jobs, executor_config(args))
    rejected = sum(tally.rejected.values())
    dropped = ", ".join(f"{n:,} {reason}" for reason, n in plan.queries_dropped.items()) or "none"
    print(
        f"extracted {tally.rows:,} rows: {tally.matched:,} matched, {tally.unmatched:,} unmatched, "
        f"{rejected:,} rejected, {sum(tally.skipped.values()):,} pages/records skipped; "
        f"{plan.queries:,} queries, query lines dropped: {dropped}; "
        f"in {time.perf_counter() - start:.1f} s → {args.work}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Balance pass: at most t pairs per query (count → merge → select), written as the candidate table.

    python -m data_pipelines.balance --work work/ --out candidates/ --t 20000 --seed 0

Writes candidates/part-00000.parquet, … (url, text, query, matched_queries, source), stats.json and
query_counts.png. Finished jobs are not run again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .candidates.balancing import DEFAULT_MAX_PER_QUERY
from .candidates.pipeline import run_balance
from .extract import add_executor_args, executor_config, number


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.balance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--work", required=True, help="the work folder written by data_pipelines.extract")
    p.add_argument("--out", required=True, help="output folder of the balanced candidate table")
    p.add_argument(
        "--t",
        type=number(int, 1),
        default=DEFAULT_MAX_PER_QUERY,
        help="pairs per query at most (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=number(int, -(2**63), 2**63 - 1),  # it keys a 64-bit hash
        default=0,
        help="selection seed (default: %(default)s)",
    )
    add_executor_args(p)
    args = p.parse_args(argv)

    start = time.perf_counter()
    print(
        f"balance: {args.work} → {args.out}, t = {args.t:,}, seed = {args.seed} ({args.executor})",
        file=sys.stderr,
    )
    try:
        stats = run_balance(Path(args.work), Path(args.out), args.t, args.seed, executor_config(args))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tot = stats["totals"]
    print(
        f"kept {tot['kept']:,} of {tot['rows']:,} rows for {tot['queries_matched']:,} queries "
        f"({tot['queries_at_limit']:,} at t), {tot['dropped_by_balancing']:,} dropped by balancing, "
        f"{tot['duplicates']:,} duplicates, in {time.perf_counter() - start:.1f} s → {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

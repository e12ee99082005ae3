"""The drivers behind the CLIs: plan and check everything first, then run the passes as jobs."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .balancing import merge_counts
from .matching import QueryMatcher, read_query_files
from .passes import layout
from .passes.executors import ExecutorConfig, run_jobs
from .passes.jobs import (
    BucketSpec,
    ExtractSpec,
    load_counts,
    read_thresholds,
    run_count,
    run_extract,
    run_select,
    selection_id,
    write_thresholds,
)
from .plots import plot_query_counts
from .sources.live_pages import DEFAULT_CRAWL, CrawlConfig
from .sources.tables import TABLE_SUFFIXES, check_tables, expand_paths, table_format
from .sources.warc import WARC_SUFFIXES
from .stats import Tally, build_stats, check_accounting


def _job_id(i: int, name: str) -> str:
    return f"{i:05d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:80]}"


def check_queries(query_files: list[str] | tuple[str, ...]) -> tuple[int, dict[str, int]]:
    """The number of distinct queries after normalisation, and the query lines dropped, by reason
    (``undecodable``, ``empty_after_normalisation``, ``duplicate_after_normalisation``). Raises for a
    missing file or an empty list."""
    queries, dropped = read_query_files(query_files)
    matcher = QueryMatcher(queries)
    dropped.update(matcher.skipped)
    return len(matcher), dict(sorted(dropped.items()))


@dataclass(frozen=True)
class ExtractPlan:
    jobs: list[ExtractSpec]
    queries: int  # distinct queries after normalisation
    queries_dropped: dict[str, int] = field(default_factory=dict)  # query lines dropped, by reason


def plan_extract(
    work: Path,
    query_files: list[str],
    tables: list[str] = (),
    warcs: list[str] = (),
    seeds: list[str] = (),
    url_column: str = "url",
    text_column: str = "text",
    n_buckets: int = 16,
    crawl: CrawlConfig = DEFAULT_CRAWL,
) -> ExtractPlan:
    """Check every input before any work (raising FileNotFoundError / ValueError) and plan one job per
    input file, plus one for the crawl. The plan is recorded in ``work/plan.json``; a work folder that
    holds another plan is refused, so results of different plans never mix."""
    # Missing file, empty list, nothing but punctuation → error now rather than in every job; the full
    # build (the jobs repeat it) also counts the dropped query lines for the summary.
    n_queries, queries_dropped = check_queries(query_files)
    table_paths = expand_paths(tables, TABLE_SUFFIXES)
    for p in table_paths:
        table_format(p)
    check_tables(table_paths, url_column, text_column)
    warc_paths = expand_paths(warcs, WARC_SUFFIXES)
    if not (table_paths or warc_paths or seeds):
        raise ValueError("no input: give --tables, --warc or --seeds")
    if n_buckets < 1:
        raise ValueError("--buckets must be at least 1")
    common = {"query_files": tuple(map(str, query_files)), "work": str(work), "n_buckets": n_buckets}
    specs = [
        ExtractSpec(
            _job_id(i, p.name), "table", (str(p),), url_column=url_column, text_column=text_column, **common
        )
        for i, p in enumerate(table_paths)
    ]
    specs += [
        ExtractSpec(_job_id(len(specs) + i, p.name), "warc", (str(p),), **common)
        for i, p in enumerate(warc_paths)
    ]
    if seeds:
        specs.append(
            ExtractSpec(_job_id(len(specs), "live-pages"), "pages", tuple(seeds), crawl=crawl, **common)
        )
    plan = {"n_buckets": n_buckets, "jobs": [asdict(s) for s in specs]}
    plan_path = work / "plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text()) != json.loads(json.dumps(plan)):
        raise ValueError(f"{work} holds the results of another plan; use a new --work folder")
    layout.write_json(plan_path, plan)
    return ExtractPlan(specs, n_queries, queries_dropped)


def run_extract_pass(specs: list[ExtractSpec], executor: ExecutorConfig) -> Tally:
    tally = Tally()
    for result in run_jobs(run_extract, specs, executor, "extract", rate_key="rows"):
        tally.add(Tally.from_dict(result))
    return tally


def _check_out_folder(out: Path, selection: dict) -> None:
    """Refuse an output folder holding select results of another selection: finished select jobs are not
    run again, so their part files would be mixed with (or pass for) the new selection's."""
    for marker in sorted((out / "_select").glob("part-*.json")):
        old = (layout.read_marker(marker) or {}).get("selection")
        if old != selection:
            made_with = f"t = {old['t']}, seed = {old['seed']}" if old else "an unknown t and seed"
            if old and (old["t"], old["seed"]) == (selection["t"], selection["seed"]):
                made_with += " from another extraction (work folder plan)"
            raise ValueError(
                f"{out} holds a selection made with {made_with}, not t = {selection['t']}, "
                f"seed = {selection['seed']}; use a fresh --out folder or delete {out}"
            )


def run_balance(work: Path, out: Path, t: int, seed: int, executor: ExecutorConfig) -> dict:
    """Count → merge → select over the extracted work folder; writes the part files, stats.json and
    query_counts.png into ``out`` and returns the stats. An ``out`` that holds the results of another t,
    seed or extraction is refused (ValueError) before any job runs."""
    plan_path = work / "plan.json"
    if not plan_path.is_file():
        raise FileNotFoundError(
            f"{work} holds no extraction (no plan.json): run data_pipelines.extract first"
        )
    if t < 1:
        raise ValueError("t must be at least 1")
    plan = json.loads(plan_path.read_text())
    missing = [j["job_id"] for j in plan["jobs"] if not layout.extract_marker(work, j["job_id"]).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} extract job(s) not finished, e.g. {missing[0]}: re-run extract")
    # The selection depends on t, the seed and everything the extraction produced, which its plan fixes.
    plan_sha256 = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    n = plan["n_buckets"]
    buckets = [BucketSpec(b, str(work), t, seed, str(out), plan_sha256) for b in range(n)]
    _check_out_folder(out, selection_id(buckets[0]))
    counted = run_jobs(run_count, buckets, executor, "count", rate_key="pairs")
    merged = layout.thresholds_file(work, t, seed)
    if merged.is_file():  # written last by a finished merge over finished (immutable) counts
        thresholds = read_thresholds(merged, t, seed)
    else:
        thresholds = merge_counts((load_counts(work, t, seed, b) for b in range(n)), t, seed)
        write_thresholds(thresholds, merged)
    selected = run_jobs(run_select, buckets, executor, "select", rate_key="kept")

    tally = Tally()
    for job in plan["jobs"]:
        tally.add(Tally.from_dict(layout.read_marker(layout.extract_marker(work, job["job_id"]))))
    duplicates: Counter[str] = Counter()
    for c in counted:
        duplicates.update(c["duplicates"])
    kept: Counter[str] = Counter()
    for s in selected:
        kept.update(s["kept_per_query"])
    n_queries, queries_dropped = check_queries(plan["jobs"][0]["query_files"]) if plan["jobs"] else (0, {})
    stats = build_stats(tally, duplicates, thresholds.matched, kept, t, seed, n_queries, queries_dropped)
    check_accounting(stats)
    layout.write_json(out / "stats.json", stats)
    plot_query_counts(stats["per_query"], t, out / "query_counts.png")
    return stats

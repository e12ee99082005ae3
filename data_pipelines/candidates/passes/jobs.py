"""The job functions of each pass. They take one picklable spec and return a small JSON-able dict, so
that the same function runs in a local process, a submitit local job or a SLURM array task."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..balancing import MatchedPair, QueryCounts, Thresholds, count_matches, deduplicate, select, url_bucket
from ..extraction import match_events
from ..matching import QueryMatcher, load_queries
from ..records import SourceEvent
from ..sources.live_pages import DEFAULT_CRAWL, CrawlConfig, iter_live_pages
from ..sources.tables import iter_table
from ..sources.warc import iter_warc
from ..stats import Tally
from . import layout

MATCHED_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("matched_queries", pa.list_(pa.string())),
    ]
)
CANDIDATE_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("text", pa.string()),
        ("query", pa.string()),
        ("matched_queries", pa.list_(pa.string())),
        ("source", pa.string()),
    ]
)
_KEYS_SCHEMA = pa.schema([("query", pa.string()), ("priority", pa.uint64()), ("url", pa.string())])
_FLUSH_ROWS = 50_000


@dataclass(frozen=True)
class ExtractSpec:
    job_id: str
    kind: str  # "table" | "warc" | "pages"
    inputs: tuple[str, ...]  # one file, or the seed URLs of a crawl
    query_files: tuple[str, ...]
    work: str
    n_buckets: int
    url_column: str = "url"
    text_column: str = "text"
    crawl: CrawlConfig = DEFAULT_CRAWL


def _events(spec: ExtractSpec) -> Iterator[SourceEvent]:
    if spec.kind == "table":
        return iter_table(Path(spec.inputs[0]), spec.url_column, spec.text_column)
    if spec.kind == "warc":
        return iter_warc(Path(spec.inputs[0]))
    if spec.kind == "pages":
        return iter_live_pages(spec.inputs, spec.crawl)
    raise ValueError(f"unknown source kind {spec.kind!r}")


class _BucketWriter:
    """Matched pairs of one extract job, spread over URL buckets, written under temporary names."""

    def __init__(self, work: Path, job_id: str, n_buckets: int):
        self.work, self.job_id, self.n = work, job_id, n_buckets
        self.rows: list[list[MatchedPair]] = [[] for _ in range(n_buckets)]
        self.writers: dict[int, pq.ParquetWriter] = {}

    def _tmp(self, bucket: int) -> Path:
        return layout.matched_dir(self.work, bucket) / f".{self.job_id}.parquet.tmp-{os.getpid()}"

    def add(self, pair: MatchedPair) -> None:
        b = url_bucket(pair.url, self.n)
        self.rows[b].append(pair)
        if len(self.rows[b]) >= _FLUSH_ROWS:
            self._flush(b)

    def _flush(self, b: int) -> None:
        rows = self.rows[b]
        if not rows:
            return
        if b not in self.writers:
            self._tmp(b).parent.mkdir(parents=True, exist_ok=True)
            self.writers[b] = pq.ParquetWriter(self._tmp(b), MATCHED_SCHEMA)
        url, text, source, matched = zip(*rows)
        self.writers[b].write_table(
            pa.table([url, text, source, [list(m) for m in matched]], schema=MATCHED_SCHEMA)
        )
        self.rows[b] = []

    def close(self) -> None:
        for b in range(self.n):
            self._flush(b)
        for b, writer in self.writers.items():
            writer.close()
            os.replace(self._tmp(b), layout.matched_dir(self.work, b) / f"{self.job_id}.parquet")


def run_extract(spec: ExtractSpec) -> dict:
    """Extract pass, one input: source → URL checks → matching → matched pairs by URL bucket."""
    work = Path(spec.work)
    marker = layout.extract_marker(work, spec.job_id)
    if (done := layout.read_marker(marker)) is not None:
        return done | {"skipped_as_done": True}
    matcher = QueryMatcher(load_queries(spec.query_files))
    tally = Tally()
    writer = _BucketWriter(work, spec.job_id, spec.n_buckets)
    for pair in match_events(_events(spec), matcher, tally):
        writer.add(pair)
    writer.close()
    result = {"job_id": spec.job_id, "inputs": list(spec.inputs), **tally.to_dict()}
    layout.write_json(marker, result)
    return result


def read_bucket(work: Path, bucket: int) -> list[MatchedPair]:
    """Every matched pair of one URL bucket (from all extract jobs), in file order."""
    pairs: list[MatchedPair] = []
    d = layout.matched_dir(work, bucket)
    for path in sorted(d.glob("*.parquet")) if d.is_dir() else []:
        cols = pq.read_table(path).to_pydict()
        pairs.extend(
            MatchedPair(u, t, s, tuple(m))
            for u, t, s, m in zip(cols["url"], cols["text"], cols["source"], cols["matched_queries"])
        )
    return pairs


@dataclass(frozen=True)
class BucketSpec:
    bucket: int
    work: str
    t: int
    seed: int
    out: str = ""  # the selection pass only
    plan_sha256: str = ""  # the selection pass only: identifies the extraction it selects from


def selection_id(spec: BucketSpec) -> dict:
    """Everything a select job's output depends on besides its bucket; recorded in its marker."""
    return {"t": spec.t, "seed": spec.seed, "plan_sha256": spec.plan_sha256}


def run_count(spec: BucketSpec) -> dict:
    """Counting pass, one bucket: deduplicate, count matches per query, keep the t smallest keys."""
    work = Path(spec.work)
    keys_path, marker = layout.count_files(work, spec.t, spec.seed, spec.bucket)
    if (done := layout.read_marker(marker)) is not None:
        return done | {"skipped_as_done": True}
    unique, duplicates = deduplicate(read_bucket(work, spec.bucket), spec.seed)
    counts = count_matches(unique, spec.t, spec.seed)
    rows = [(q, p, u) for q, keys in counts.smallest.items() for p, u in keys]
    keys_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = keys_path.with_name(f".{keys_path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.table(list(zip(*rows)) if rows else [[], [], []], schema=_KEYS_SCHEMA), tmp)
    os.replace(tmp, keys_path)
    result = {
        "bucket": spec.bucket,
        "pairs": len(unique),
        "duplicates": dict(duplicates),
        "matched": counts.matched,
    }
    layout.write_json(marker, result)
    return result


def load_counts(work: Path, t: int, seed: int, bucket: int) -> QueryCounts:
    keys_path, marker = layout.count_files(work, t, seed, bucket)
    counts = QueryCounts(matched=Counter(layout.read_marker(marker)["matched"]))
    cols = pq.read_table(keys_path).to_pydict()
    for q, p, u in zip(cols["query"], cols["priority"], cols["url"]):
        counts.smallest.setdefault(q, []).append((p, u))
    return counts


def write_thresholds(thresholds: Thresholds, path: Path) -> None:
    queries = sorted(thresholds.matched)
    cut = [thresholds.cutoff.get(q) for q in queries]
    table = pa.table(
        {
            "query": pa.array(queries, pa.string()),
            "matched": pa.array([thresholds.matched[q] for q in queries], pa.int64()),
            "cut_priority": pa.array([c[0] if c else None for c in cut], pa.uint64()),
            "cut_url": pa.array([c[1] if c else None for c in cut], pa.string()),
        }
    )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_thresholds(path: Path, t: int, seed: int) -> Thresholds:
    cols = pq.read_table(path).to_pydict()
    cutoff = {
        q: (p, u) for q, p, u in zip(cols["query"], cols["cut_priority"], cols["cut_url"]) if p is not None
    }
    return Thresholds(
        t=t, seed=seed, matched=Counter(dict(zip(cols["query"], cols["matched"]))), cutoff=cutoff
    )


def run_select(spec: BucketSpec) -> dict:
    """Selection pass, one bucket: deduplicate again (same rule, same result) and keep the selected
    pairs, sorted by URL, as ``part-<bucket>.parquet``."""
    work, out = Path(spec.work), Path(spec.out)
    marker = layout.select_marker(out, spec.bucket)
    if (done := layout.read_marker(marker)) is not None:
        # The driver refuses such a folder up front; this catches a concurrent run with other settings.
        if done.get("selection") != selection_id(spec):
            raise RuntimeError(f"{marker} belongs to another selection ({done.get('selection')})")
        return done | {"skipped_as_done": True}
    thresholds = read_thresholds(layout.thresholds_file(work, spec.t, spec.seed), spec.t, spec.seed)
    unique, _ = deduplicate(read_bucket(work, spec.bucket), spec.seed)
    kept = select(unique, thresholds)
    path = layout.part_file(out, spec.bucket)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    columns = list(zip(*kept)) if kept else [[]] * 5
    pq.write_table(
        pa.table(
            [columns[0], columns[1], columns[2], [list(m) for m in columns[3]], columns[4]],
            schema=CANDIDATE_SCHEMA,
        ),
        tmp,
    )
    os.replace(tmp, path)
    result = {
        "bucket": spec.bucket,
        "selection": selection_id(spec),
        "kept": len(kept),
        "kept_per_query": Counter(k.query for k in kept),
    }
    layout.write_json(marker, result)
    return result

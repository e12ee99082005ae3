"""Tables of (image URL, text) rows: parquet, and CSV, TSV and JSON lines, each optionally gzip-compressed.

``check_tables`` validates files and columns before any work starts; ``iter_table`` then streams one
file, yielding one Candidate or Rejected per row (provenance "path:row", rows counted from 0).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow.parquet as pq

from ..records import Candidate, Rejected, Skipped, SourceEvent, clean_text

TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".json", ".ndjson")
_BATCH_ROWS = 8192
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def table_format(path: str | Path) -> str:
    """ "parquet", "csv", "tsv" or "jsonl" from the file name (".gz" allowed after a text format's suffix)."""
    if str(path).lower().endswith(".parquet.gz"):
        # A parquet reader needs random access (the footer is at the end), which a gzip stream lacks; and
        # parquet compresses its column chunks itself, so such files are rare. Refused before any work.
        raise ValueError(f"gzip-compressed parquet cannot be read, decompress it first (gunzip): {path}")
    name = str(path).lower().removesuffix(".gz")
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv")):
        if name.endswith(suffix):
            return fmt
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raise ValueError(
        f"unknown table format (expected .parquet, or one of {', '.join(TABLE_SUFFIXES[1:])}[.gz]): {path}"
    )


def expand_paths(paths: Sequence[str | Path], suffixes: tuple[str, ...]) -> list[Path]:
    """Files named directly, plus the files with one of ``suffixes`` (optionally .gz) inside folders,
    sorted. A path that does not exist raises FileNotFoundError."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(
                sorted(
                    f
                    for f in p.rglob("*")
                    if f.is_file() and str(f).lower().removesuffix(".gz").endswith(suffixes)
                )
            )
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return out


def check_tables(paths: Sequence[Path], url_column: str, text_column: str) -> None:
    """Raise ValueError unless every file has both columns (read from the schema, the header line, or
    the first JSON object of the file)."""
    for path in paths:
        columns = _columns(path)
        missing = [c for c in (url_column, text_column) if c not in columns]
        if missing:
            raise ValueError(
                f"{path}: no column {', '.join(map(repr, missing))} (columns: {sorted(columns)})"
            )


def _columns(path: Path) -> set[str]:
    fmt = table_format(path)
    if fmt == "parquet":
        return set(pq.read_schema(path).names)
    with _open_text(path) as f:
        if fmt in ("csv", "tsv"):
            header = next(csv.reader(f, delimiter="\t" if fmt == "tsv" else ","), [])
            return set(header)
        for line in f:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return set(obj)
    return set()


def _open_text(path: Path) -> io.TextIOBase:
    # The caller closes the wrapper, which closes the raw file with it.
    raw = gzip.open(path, "rb") if str(path).lower().endswith(".gz") else open(path, "rb")  # noqa: SIM115
    # surrogateescape keeps undecodable bytes visible to clean_text, which rejects that row only.
    return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")


def iter_table(path: Path, url_column: str, text_column: str) -> Iterator[SourceEvent]:
    fmt = table_format(path)
    rows = {"parquet": _parquet_rows, "csv": _csv_rows, "tsv": _csv_rows, "jsonl": _jsonl_rows}[fmt]
    try:
        for row, (url, text, reason) in enumerate(rows(path, url_column, text_column, fmt)):
            source = f"{path}:{row}"
            if reason is not None:
                yield Rejected(reason, source)
                continue
            if url is None:
                yield Rejected("missing_url", source)
                continue
            text, reason = clean_text(text)
            yield Rejected(reason, source) if text is None else Candidate(url, text, source)
    except (EOFError, OSError, zlib.error) as e:  # a truncated gzip or parquet file: count what was lost
        yield Skipped("truncated_file", f"{path}: {type(e).__name__}: {e}")


Row = tuple[object, object, str | None]


def _parquet_rows(path: Path, url_column: str, text_column: str, fmt: str) -> Iterator[Row]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=[url_column, text_column]):
        urls, texts = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        for url, text in zip(urls, texts):
            yield url, text, None


def _csv_rows(path: Path, url_column: str, text_column: str, fmt: str) -> Iterator[Row]:
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",")
        header = next(reader)
        iu, it = header.index(url_column), header.index(text_column)
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error:
                yield None, None, "malformed_row"
                continue
            if len(fields) != len(header):
                yield None, None, "malformed_row"
                continue
            yield fields[iu] or None, fields[it], None


def _jsonl_rows(path: Path, url_column: str, text_column: str, fmt: str) -> Iterator[Row]:
    with _open_text(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield None, None, "malformed_row"
                continue
            if not isinstance(obj, dict):
                yield None, None, "malformed_row"
                continue
            yield obj.get(url_column), obj.get(text_column), None

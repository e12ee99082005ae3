"""The input table and how its rows are split into parts; what a rerun still has to do.

Part i holds input rows [i * rows_per_part, (i + 1) * rows_per_part), in input order, and a row's key is
its zero-padded global row number. Both follow from the input alone, so any process, on any machine, at
any later time, writes the same sample under the same key into the same part: that is what makes resume,
retry and SLURM arrays safe without coordination. (The final shards, of a fixed number of samples, are
packed from the parts afterwards: pack.py.)

The plan (`_plan/plan.json`) and a copy of the rows (`_plan/rows.parquet`, only the columns we use) are
written once, before any download. A rerun checks that the input and every setting that changes part
bytes are the same, then finds the work left: parts whose stats file (the commit marker) is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from data_pipelines.download.shard_writer import PART_PREFIX, file_paths, file_stem, read_stats

# Columns of the balanced candidate table (part 1) that are carried into each sample's JSON when present.
OPTIONAL_COLUMNS = ("query", "matched_queries", "source")
_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
PLAN_DIR = "_plan"
PARTS_DIR = "_parts"
PACKED_NAME = "packed.json"  # in PARTS_DIR: what the final shards were packed from (pack.py)
# Temporary files that only the launching process writes, named `.NAME.<pid>.tmp` (the part files'
# temporaries are cleaned when their part is rewritten).
_LAUNCHER_TEMPS = (f"{PLAN_DIR}/.rows.*.tmp", f"{PLAN_DIR}/.plan.*.tmp", f"{PARTS_DIR}/.{PACKED_NAME}.*.tmp")


class InputError(ValueError):
    """The input table cannot be used as given; the message says what to fix."""


def _input_files(path: Path) -> tuple[list[Path], str]:
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if path.is_file():
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise InputError(f"input {path}: unknown format {path.suffix!r}; use one of {sorted(_FORMATS)}")
        return [path], fmt
    # Inside a folder, `.json` files are metadata (the balancer's stats.json, a manifest.json), not rows:
    # tables in a folder are parquet, CSV or JSON Lines. A single `.json` file given by name is read as rows.
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _FORMATS
        and p.suffix.lower() != ".json"
        and not p.name.startswith(("_", "."))
    )
    if not files:
        raise InputError(f"input folder {path} holds no .parquet/.pq/.csv/.jsonl files")
    formats = {_FORMATS[p.suffix.lower()] for p in files}
    if len(formats) > 1:
        raise InputError(f"input folder {path} mixes formats {sorted(formats)}; keep one format per folder")
    return files, formats.pop()


def read_input(path: str | os.PathLike, url_col: str = "url", text_col: str = "text") -> pa.Table:
    """The input rows as a table with columns url, text and any of OPTIONAL_COLUMNS present.

    Reads parquet, CSV or JSONL, one file or a folder of them (files in sorted path order, which fixes
    the row order). Raises InputError for a missing path or a missing column, before any work starts.
    """
    files, fmt = _input_files(Path(path))
    try:
        dataset = ds.dataset([str(f) for f in files], format=fmt)
        names = dataset.schema.names
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"cannot read {path} as {fmt}: {e}") from e
    missing = [c for c in (url_col, text_col) if c not in names]
    if missing:
        raise InputError(
            f"input {path} has no column {' or '.join(map(repr, missing))}; its columns are {names}. "
            "Name the right ones with --url-column / --text-column."
        )
    extra = [c for c in OPTIONAL_COLUMNS if c in names and c not in (url_col, text_col)]
    try:
        table = dataset.to_table(columns=[url_col, text_col, *extra])
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"cannot read {path} as {fmt}: {e}") from e
    url = _as_text(table, url_col, path)
    text = pc.fill_null(_as_text(table, text_col, path), "")
    columns = {"url": url, "text": text}
    for c in extra:
        col = table.column(c)
        if (c == "matched_queries" and not pa.types.is_list(col.type)) or c != "matched_queries":
            col = _as_text(table, c, path)
        columns[c] = col
    return pa.table(columns)


def _as_text(table: pa.Table, column: str, path: str | os.PathLike) -> pa.ChunkedArray:
    """Column `column` cast to strings; a type with no string form (a list, a struct) is an InputError."""
    col = table.column(column)
    try:
        return pc.cast(col, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise InputError(
            f"input {path}: column {column!r} has type {col.type}, which cannot be read as text ({e})"
        ) from e


def _fingerprint(table: pa.Table) -> str:
    h = hashlib.sha256(str(table.num_rows).encode())
    for chunk in table.column("url").chunks:
        for buf in chunk.buffers():
            if buf is not None:
                h.update(memoryview(buf))
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class Plan:
    """How the input is split; `settings` are those that change part bytes (a rerun must match them)."""

    out_dir: str
    input: str
    num_rows: int
    rows_per_part: int
    fingerprint: str
    settings: dict

    @property
    def num_parts(self) -> int:
        return max(1, math.ceil(self.num_rows / self.rows_per_part))

    @property
    def key_width(self) -> int:
        return max(9, len(str(max(self.num_rows - 1, 0))))

    def key(self, row: int) -> str:
        return f"{row:0{self.key_width}d}"

    @property
    def rows_path(self) -> Path:
        return Path(self.out_dir) / PLAN_DIR / "rows.parquet"

    @property
    def parts_dir(self) -> Path:
        return Path(self.out_dir) / PARTS_DIR

    def part_stem(self, index: int) -> str:
        return file_stem(PART_PREFIX, index)

    def part_paths(self, index: int) -> tuple[Path, Path, Path]:
        """(tar, parquet, stats) paths of part `index`."""
        return file_paths(self.parts_dir, self.part_stem(index))

    def part_rows(self, index: int) -> list[dict]:
        """Input rows of part `index` as dicts with a `row` field (global row number)."""
        start = index * self.rows_per_part
        table = pq.read_table(
            self.rows_path,
            filters=[("row", ">=", start), ("row", "<", start + self.rows_per_part)],
        )
        return sorted(table.to_pylist(), key=lambda r: r["row"])

    def part_stats(self, index: int) -> dict | None:
        """The stats of part `index` when it is complete, else None."""
        return read_stats(self.parts_dir, self.part_stem(index))

    def complete_parts(self) -> list[int]:
        return [i for i in range(self.num_parts) if self.part_stats(i) is not None]

    def pending_parts(self) -> list[int]:
        """Parts with no valid stats file: never started, interrupted, or left inconsistent."""
        return [i for i in range(self.num_parts) if self.part_stats(i) is None]

    def failed_rows(self, index: int, statuses: frozenset[str] | None) -> list[int]:
        """Row numbers of a finished part whose status is a failure (in `statuses`, if given).

        Parts hold no `duplicate` rows (the pack decides those), so a duplicate is never fetched again.
        """
        table = pq.read_table(self.part_paths(index)[1], columns=["row", "status"])
        return [
            r["row"]
            for r in table.to_pylist()
            if r["status"] != "success" and (statuses is None or r["status"] in statuses)
        ]


def make_plan(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    url_col: str = "url",
    text_col: str = "text",
    rows_per_part: int = 10_000,
    settings: dict | None = None,
) -> Plan:
    """Read the input, then create the plan in out_dir or check it against the one already there."""
    if rows_per_part < 1:
        raise InputError(f"rows_per_part must be >= 1, got {rows_per_part}")
    table = read_input(input_path, url_col, text_col)
    if table.num_rows == 0:
        # Refused before the output folder is made: an empty table would only give an output without a
        # single image, which the run then reports as a failure anyway.
        raise InputError(
            f"input {input_path} has no rows, so there is nothing to download; check the path (a folder is "
            "read whole) and the step that wrote the table"
        )
    out = Path(out_dir)
    # Left by a launcher killed while writing them; no other process is at work on `out` yet.
    for stale in [p for pattern in _LAUNCHER_TEMPS for p in out.glob(pattern)]:
        stale.unlink(missing_ok=True)
    plan = Plan(
        out_dir=str(out),
        input=str(Path(input_path).resolve()),
        num_rows=table.num_rows,
        rows_per_part=rows_per_part,
        fingerprint=_fingerprint(table),
        settings=json.loads(json.dumps(settings or {})),
    )
    plan_path = out / PLAN_DIR / "plan.json"
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        differs = [
            k
            for k in ("num_rows", "rows_per_part", "fingerprint", "settings")
            if old.get(k) != asdict(plan)[k]
        ]
        if differs:
            raise InputError(
                f"{out} already holds a download of a different input or with different settings "
                f"({', '.join(differs)} changed): resume needs the same input and settings; use a new "
                "output folder for a new download."
            )
        if plan.rows_path.is_file():
            plan.parts_dir.mkdir(exist_ok=True)
            return plan
    (out / PLAN_DIR).mkdir(parents=True, exist_ok=True)
    plan.parts_dir.mkdir(exist_ok=True)
    rows = table.add_column(0, "row", pa.array(range(table.num_rows), pa.int64()))
    tmp = plan.rows_path.with_name(f".rows.{os.getpid()}.tmp")
    pq.write_table(rows, tmp, row_group_size=max(1, min(rows_per_part, 100_000)))
    os.replace(tmp, plan.rows_path)
    tmp = plan_path.with_name(f".plan.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(plan), indent=1))
    os.replace(tmp, plan_path)
    return plan

"""The input table and how its rows are split into parts; what a rerun still has to do.

Part i holds input rows [i * rows_per_part, (i + 1) * rows_per_part), in input order, and a row's key is
its zero-padded global row number. Both follow from the input alone, so any process, on any machine, at
any later time, writes the same sample under the same key into the same part: that is what makes resume,
retry and SLURM arrays safe without coordination. (The final shards, of a fixed number of samples, are
packed from the parts afterwards: pack.py.)

The plan (`_plan/plan.json`) and a copy of the rows (`_plan/rows.parquet`, only the columns we use) are
written once, before any download. A rerun checks that the input and every setting that changes part
bytes are the same (naming each one that changed), then finds the work left: parts whose stats file (the
commit marker) is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from data_pipelines.download.shard_writer import PART_PREFIX, file_paths, file_stem, read_stats, writing

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
    """The input table, the output folder or the settings cannot be used as given (found before any work);
    the message says what to fix."""


def check_writable(folder: Path, output: Path) -> None:
    """Raise InputError unless entries can be made in `folder`, a folder of the output folder `output`
    (or `output` itself), or, when it does not exist yet, it can be created.

    Tried for real, with a folder made and removed at once: the permission bits alone do not say it
    (root ignores them, a read-only mount or an immutable folder refuses whatever they say). Nothing is
    left behind, so an output folder that does not exist yet still does not after the check.
    """
    existing = folder
    while not os.path.exists(existing):  # os.path: False, not an error, below a folder we may not read
        existing = existing.parent
    if not os.path.isdir(existing):
        raise InputError(
            f"output folder {output}: cannot be made, {existing} is a file; give another output folder"
        )
    probe = existing / f".write-check.{os.getpid()}.tmp"
    try:
        probe.mkdir(exist_ok=True)
        probe.rmdir()
    except OSError as e:
        reason = e.strerror or str(e)
        if existing in output.parents:  # the output folder does not exist yet
            problem = f"cannot create it in {existing} ({reason}); make {existing} writable"
        else:
            problem = f"cannot write into {existing} ({reason}); make it writable"
        raise InputError(f"output folder {output}: {problem} or give another output folder") from e


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


_NOT_RECORDED = object()  # a setting that the existing plan does not hold (a newer option)


def _flat(settings: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """{"image": {"image_size": 24}} -> {"image.image_size": 24}."""
    flat: dict[str, object] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value: object) -> str:
    """A setting's value as it would be typed after its option."""
    if value is _NOT_RECORDED:
        return "(not recorded)"
    if isinstance(value, str):
        return value if value and not any(c.isspace() for c in value) else repr(value)
    return str(value)


def _rerun_refusal(old: dict, plan: Plan, setting_names: Mapping[str, str]) -> str | None:
    """Why a rerun cannot resume the download that `old` (the plan.json there) describes: the input or
    each setting that changed, old value -> new, and how to go on; None when it can resume."""
    found, same, new = [], [], []
    old_rows, old_input = old.get("num_rows"), old.get("input")
    if (old_rows, old.get("fingerprint")) != (plan.num_rows, plan.fingerprint):
        if old_rows != plan.num_rows:
            found.append(
                f"of another input: {old_input} had {old_rows} rows, {plan.input} has {plan.num_rows}"
            )
        else:
            found.append(
                f"of another input: {plan.input} has other URLs than {old_input} had in its {old_rows} rows"
            )
        same.append("the input it was made from")
        new.append("input")
    before = _flat({"rows_per_part": old.get("rows_per_part"), **old.get("settings", {})})
    now = _flat({"rows_per_part": plan.rows_per_part, **plan.settings})
    changed = [
        (setting_names.get(key, key), before.get(key, _NOT_RECORDED), now.get(key, _NOT_RECORDED))
        for key in [*now, *(k for k in before if k not in now)]
        if before.get(key, _NOT_RECORDED) != now.get(key, _NOT_RECORDED)
    ]
    if changed:
        found.append(
            "made with other settings: " + ", ".join(f"{n} {_shown(a)} -> {_shown(b)}" for n, a, b in changed)
        )
        typed = " ".join(f"{n} {_shown(a)}" for n, a, _ in changed if a is not _NOT_RECORDED)
        same.append(f"the settings it was made with ({typed})" if typed else "the settings it was made with")
        new.append("settings")
    if not found:
        return None
    return (
        f"{plan.out_dir} already holds a download {'; and '.join(found)}. To resume it, rerun with "
        f"{' and '.join(same)}; to download with the new {' and '.join(new)}, use a new output folder "
        f"(or remove {plan.out_dir} first)"
    )


def make_plan(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    url_col: str = "url",
    text_col: str = "text",
    rows_per_part: int = 10_000,
    settings: dict | None = None,
    setting_names: Mapping[str, str] | None = None,
) -> Plan:
    """Read the input, then create the plan in out_dir or check it against the one already there.

    setting_names: how the user sets each setting (an option such as "--image-size"), by its key:
    "rows_per_part", or a key of `settings` (nested keys joined with dots, "image.image_size"); a rerun
    refused for a changed setting names it so. A key without a name is shown as it is.
    """
    if rows_per_part < 1:
        raise InputError(f"rows_per_part must be >= 1, got {rows_per_part}")
    out = Path(out_dir)
    plan_path = out / PLAN_DIR / "plan.json"
    if not plan_path.is_file() or not (out / PLAN_DIR / "rows.parquet").is_file():
        # The plan is about to be written: refuse an unwritable output now, before reading the input
        # (which can take minutes), rather than with a traceback from the first mkdir. (The run checks
        # the folders that the parts and shards go to once it knows that it will write any.)
        check_writable(out / PLAN_DIR, out)
    table = read_input(input_path, url_col, text_col)
    if table.num_rows == 0:
        # Refused before the output folder is made: an empty table would only give an output without a
        # single image, which the run then reports as a failure anyway.
        raise InputError(
            f"input {input_path} has no rows, so there is nothing to download; check the path (a folder is "
            "read whole) and the step that wrote the table"
        )
    # Left by a launcher killed while writing them; no other process is at work on `out` yet.
    for stale in [p for pattern in _LAUNCHER_TEMPS for p in out.glob(pattern)]:
        with writing(stale):
            stale.unlink(missing_ok=True)
    plan = Plan(
        out_dir=str(out),
        input=str(Path(input_path).resolve()),
        num_rows=table.num_rows,
        rows_per_part=rows_per_part,
        fingerprint=_fingerprint(table),
        settings=json.loads(json.dumps(settings or {})),
    )
    if plan_path.is_file():
        refusal = _rerun_refusal(json.loads(plan_path.read_text()), plan, setting_names or {})
        if refusal:
            raise InputError(refusal)
        if plan.rows_path.is_file():
            with writing(plan.parts_dir):
                plan.parts_dir.mkdir(exist_ok=True)
            return plan
    with writing(plan.parts_dir):
        (out / PLAN_DIR).mkdir(parents=True, exist_ok=True)
        plan.parts_dir.mkdir(exist_ok=True)
    rows = table.add_column(0, "row", pa.array(range(table.num_rows), pa.int64()))
    with writing(plan.rows_path):
        tmp = plan.rows_path.with_name(f".rows.{os.getpid()}.tmp")
        pq.write_table(rows, tmp, row_group_size=max(1, min(rows_per_part, 100_000)))
        os.replace(tmp, plan.rows_path)
    with writing(plan_path):
        tmp = plan_path.with_name(f".plan.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(plan), indent=1))
        os.replace(tmp, plan_path)
    return plan

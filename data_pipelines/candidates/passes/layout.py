"""Where each pass writes. Every job writes its data under a temporary name, renames it, then writes its
JSON marker last: a job whose marker exists is finished, and re-running it does nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path


def matched_dir(work: Path, bucket: int) -> Path:
    return work / "matched" / f"bucket-{bucket:05d}"


def extract_marker(work: Path, job_id: str) -> Path:
    return work / "extract" / f"{job_id}.json"


def balance_dir(work: Path, t: int, seed: int) -> Path:
    # Counts depend on t and the seed; other values get their own folder and never mix.
    return work / f"balance-t{t}-seed{seed}"


def count_files(work: Path, t: int, seed: int, bucket: int) -> tuple[Path, Path]:
    d = balance_dir(work, t, seed) / "counts"
    return d / f"bucket-{bucket:05d}.parquet", d / f"bucket-{bucket:05d}.json"


def thresholds_file(work: Path, t: int, seed: int) -> Path:
    return balance_dir(work, t, seed) / "thresholds.parquet"


def part_file(out: Path, bucket: int) -> Path:
    return out / f"part-{bucket:05d}.parquet"


def select_marker(out: Path, bucket: int) -> Path:
    # Unlike the counts, select outputs are not kept apart by t and seed (the part files are the product);
    # the marker records the selection instead, and the driver refuses an out folder of another one.
    return out / "_select" / f"part-{bucket:05d}.json"


def read_marker(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)

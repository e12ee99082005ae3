"""Writing one shard atomically: the tar, its per-row status parquet, its stats JSON; and the manifest.

Layout of an output folder (the contract with clip_train.data):

    shard-000000.tar           KEY.jpg (or .webp), KEY.txt, KEY.json per sample, in input-row order
    shard-000000.parquet       one row per input row of the shard: status, error reason, sizes, hashes
    shard-000000.stats.json    counts for the shard; written last, so its presence marks the shard done
    manifest.json              {"shards": [{"name", "num_samples"}...], "num_samples": total, ...}

Every file is written under a hidden temporary name in the same folder, flushed, fsync'ed and renamed,
so a kill at any moment leaves either the complete file or none under the final name. Tar headers carry a
fixed mtime and owner, so the same samples always give the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_NAME = "manifest.json"
TAR_MTIME = 0  # fixed, so that tar bytes depend only on the samples

ROW_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("key", pa.string()),
        ("url", pa.string()),
        ("text", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("http_status", pa.int32()),
        ("attempts", pa.int32()),
        ("source_sha256", pa.string()),
        ("sha256", pa.string()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


@dataclass
class Sample:
    """One stored sample: the tar members KEY.<ext>, KEY.txt and KEY.json."""

    key: str
    image: bytes
    image_ext: str  # "jpg" or "webp"
    text: str
    meta: dict


def shard_stem(index: int) -> str:
    """`shard-000012`: zero-padded so `shard-{000000..000123}.tar` lists the shards in order."""
    return f"shard-{index:06d}"


def shard_paths(out_dir: Path, index: int) -> tuple[Path, Path, Path]:
    """(tar, parquet, stats) paths of shard `index`."""
    stem = shard_stem(index)
    return out_dir / f"{stem}.tar", out_dir / f"{stem}.parquet", out_dir / f"{stem}.stats.json"


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def tar_bytes(samples: Iterable[Sample]) -> bytes:
    """The tar of `samples` in the given order, with deterministic headers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            meta = json.dumps(s.meta, ensure_ascii=False, sort_keys=True).encode()
            for ext, payload in ((s.image_ext, s.image), ("txt", s.text.encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size = len(payload)
                info.mtime = TAR_MTIME
                info.mode = 0o444
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def write_shard(out_dir: Path, index: int, samples: Sequence[Sample], rows: list[dict], stats: dict) -> dict:
    """Write shard `index` (tar, then row parquet, then stats: the stats file is the commit marker).

    rows: one dict per input row with the ROW_SCHEMA fields. Returns the stats as written (with
    num_samples and the tar's size added).
    """
    tar_path, parquet_path, stats_path = shard_paths(out_dir, index)
    # Temporary files of an earlier, killed writer of this shard (one writer per shard at a time).
    for stale in out_dir.glob(f".{shard_stem(index)}.*.tmp"):
        stale.unlink(missing_ok=True)
    data = tar_bytes(samples)
    _atomic_write(tar_path, lambda f: f.write(data))
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    _atomic_write(parquet_path, lambda f: pq.write_table(table, f))
    counts = Counter(r["status"] for r in rows)
    stats = {
        "name": tar_path.name,
        "num_samples": len(samples),
        "successes": len(samples),
        "failed": len(rows) - len(samples),
        "rows": len(rows),
        "status_counts": dict(sorted(counts.items())),
        "tar_bytes": len(data),
        **stats,
    }
    encoded = json.dumps(stats, indent=1).encode()
    _atomic_write(stats_path, lambda f: f.write(encoded))
    return stats


def read_stats(out_dir: Path, index: int) -> dict | None:
    """The stats of a complete shard, or None when the shard is missing, partial or inconsistent."""
    tar_path, parquet_path, stats_path = shard_paths(out_dir, index)
    try:
        stats = json.loads(stats_path.read_text())
        if tar_path.stat().st_size != stats["tar_bytes"] or not parquet_path.is_file():
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stats


def read_samples(tar_path: Path) -> dict[str, Sample]:
    """The samples of a finished shard by key (used by retry to keep the ones already downloaded)."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            f = tar.extractfile(info)
            assert f is not None
            members.setdefault(key, {})[ext] = f.read()
    samples = {}
    for key, m in members.items():
        ext = "webp" if "webp" in m else "jpg"
        samples[key] = Sample(key, m[ext], ext, m["txt"].decode(), json.loads(m["json"]))
    return samples


def write_manifest(out_dir: Path, num_shards: int, extra: dict | None = None) -> dict:
    """Write manifest.json from the stats of shards 0..num_shards-1 (all must be complete)."""
    shards, counts = [], Counter()
    for i in range(num_shards):
        stats = read_stats(out_dir, i)
        if stats is None:
            raise RuntimeError(f"shard {shard_stem(i)} is not complete; cannot write the manifest")
        shards.append({"name": stats["name"], "num_samples": stats["num_samples"]})
        counts.update(stats["status_counts"])
    manifest = {
        "shards": shards,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_shards": num_shards,
        "pattern": f"shard-{{{0:06d}..{max(num_shards - 1, 0):06d}}}.tar",
        "status_counts": dict(sorted(counts.items())),
        **(extra or {}),
    }
    encoded = json.dumps(manifest, indent=1).encode()
    _atomic_write(out_dir / MANIFEST_NAME, lambda f: f.write(encoded))
    return manifest

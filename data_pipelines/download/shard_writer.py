"""Writing files atomically: a tar, its per-row status parquet and its stats JSON; and the manifest.

The same three files describe both a part (`_parts/part-000000.*`, a fixed range of input rows, written by
the download phase) and a final shard (`shard-000000.*`, a fixed number of samples, written by the pack
phase in pack.py). Layout of an output folder (the contract with clip_train.data):

    shard-000000.tar           KEY.jpg (or .webp), KEY.txt, KEY.json per sample, in input-row order
    shard-000000.parquet       one row per input row of the shard: status, error reason, sizes, hashes
    shard-000000.stats.json    counts for the shard; written last, so its presence marks the shard done
    manifest.json              {"shards": [{"name", "num_samples"}...], "num_samples": total, ...}

Every file is written under a hidden temporary name in the same folder, flushed, fsync'ed and renamed,
so a kill at any moment leaves either the complete file or none under the final name. A write that fails
(disk full, permissions changed) removes its temporary and raises WriteError, which names the file: the
same holds then. Tar headers carry a fixed mtime and owner, so the same samples always give the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_NAME = "manifest.json"
SHARD_PREFIX = "shard"
PART_PREFIX = "part"
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


def file_stem(prefix: str, index: int) -> str:
    """`shard-000012` or `part-000012`: zero-padded so `shard-{000000..000123}.tar` lists them in order."""
    return f"{prefix}-{index:06d}"


def shard_stem(index: int) -> str:
    return file_stem(SHARD_PREFIX, index)


def file_paths(folder: Path, stem: str) -> tuple[Path, Path, Path]:
    """(tar, parquet, stats) paths of the file set `stem` in `folder`."""
    return folder / f"{stem}.tar", folder / f"{stem}.parquet", folder / f"{stem}.stats.json"


def shard_paths(out_dir: Path, index: int) -> tuple[Path, Path, Path]:
    """(tar, parquet, stats) paths of final shard `index`."""
    return file_paths(out_dir, shard_stem(index))


class WriteError(OSError):
    """A file of the output could not be written or removed (disk full, permissions changed during the run).

    The message is one line: the file, the system's reason and what to do. Whatever was written before
    stays valid (no truncated file carries a final name), so the same command resumes once the disk is
    fixed. `errno` is the system's error number when there is one.
    """

    def __init__(self, number: int | None, message: str) -> None:
        super().__init__(number, message)
        self.message = message

    def __str__(self) -> str:
        # OSError's own form, "[Errno 28] ...", would repeat the reason the message already gives.
        return self.message


# What to do about the commonest reasons a write fails, by errno; anything else: "fix the cause".
_REMEDIES = {
    errno.ENOSPC: "free space on it",
    errno.EDQUOT: "free space within your quota there (or have it raised)",
    errno.EFBIG: "raise the file size limit (ulimit -f) or write to a file system that allows larger files",
    errno.EACCES: "make the folder writable again",
    errno.EPERM: "make the folder writable again",
    errno.EROFS: "make the file system writable again",
}


def _mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path` (which need not exist yet)."""
    path = path.absolute()
    while not path.exists() or (not os.path.ismount(path) and path != path.parent):
        path = path.parent
    return path


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError raised inside the block into a WriteError that names `path` and its disk."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(
            e.errno,
            f"cannot write {path} (on the file system mounted at {_mount_point(path)}): "
            f"{e.strerror or e}; the files finished before are intact: "
            f"{_REMEDIES.get(e.errno, 'fix the cause')}, then rerun the same command to resume",
        ) from e


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            # Best effort: after a failed write the folder may refuse this too, and the original error
            # is the one to report (a later writer of this file removes the temporary anyway).
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: object) -> None:
    """Write `obj` as indented JSON, atomically."""
    encoded = json.dumps(obj, indent=1).encode()
    _atomic_write(path, lambda f: f.write(encoded))


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


def tar_end(size: int) -> bytes:
    """The zero blocks that close a tar whose members take `size` bytes, exactly as tarfile writes them
    (two empty blocks, then padding to a whole 10 kB record): a tar assembled from copied members is then
    byte for byte the tar that `tar_bytes` would give for the same samples."""
    end = size + 2 * tarfile.BLOCKSIZE
    return bytes(end + (-end) % tarfile.RECORDSIZE - size)


def status_counts(rows: pa.Table) -> dict[str, int]:
    counts = Counter(rows.column("status").to_pylist())
    return dict(sorted(counts.items()))


def total_status_counts(stats: Iterable[dict]) -> dict[str, int]:
    """The `status_counts` of several file sets' stats added up (the manifest's, a whole output's)."""
    counts: Counter[str] = Counter()
    for s in stats:
        counts.update(s["status_counts"])
    return dict(sorted(counts.items()))


def write_files(
    folder: Path,
    stem: str,
    write_tar: Callable[[BinaryIO], object],
    rows: pa.Table,
    num_samples: int,
    stats: dict,
) -> dict:
    """Write the file set `stem`: tar, then row parquet, then stats (the stats file is the commit marker).

    write_tar writes the tar into the open temporary file. rows: one row per input row (ROW_SCHEMA).
    Returns the stats as written (the counts and the tar's size added to `stats`).
    """
    tar_path, parquet_path, stats_path = file_paths(folder, stem)
    # A rewrite (retry, repack) first withdraws the old commit marker: killed part-way, the set is then
    # incomplete and redone, never old stats beside a new tar.
    with writing(stats_path):
        stats_path.unlink(missing_ok=True)
    # Temporary files of an earlier, killed writer of this set (one writer per set at a time).
    for stale in folder.glob(f".{stem}.*.tmp"):
        with writing(stale):
            stale.unlink(missing_ok=True)
    _atomic_write(tar_path, write_tar)
    # Serialised in memory first so that its hash can go into the stats: the pack tells a rewritten part
    # from the old one by it (a retry can change reasons without changing any count or size).
    sink = pa.BufferOutputStream()
    pq.write_table(rows, sink)
    parquet = sink.getvalue()
    _atomic_write(parquet_path, lambda f: f.write(parquet))
    stats = {
        "name": tar_path.name,
        "num_samples": num_samples,
        "successes": num_samples,
        "failed": rows.num_rows - num_samples,
        "rows": rows.num_rows,
        "status_counts": status_counts(rows),
        "tar_bytes": tar_path.stat().st_size,
        "parquet_sha256": hashlib.sha256(parquet).hexdigest(),
        **stats,
    }
    write_json(stats_path, stats)
    return stats


def write_part(parts_dir: Path, index: int, samples: Sequence[Sample], rows: list[dict], stats: dict) -> dict:
    """Write part `index` of the download phase; rows: one dict per input row with the ROW_SCHEMA fields."""
    data = tar_bytes(samples)
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    return write_files(
        parts_dir, file_stem(PART_PREFIX, index), lambda f: f.write(data), table, len(samples), stats
    )


def read_stats(folder: Path, stem: str) -> dict | None:
    """The stats of a complete file set, or None when it is missing, partial or inconsistent."""
    tar_path, parquet_path, stats_path = file_paths(folder, stem)
    try:
        stats = json.loads(stats_path.read_text())
        if tar_path.stat().st_size != stats["tar_bytes"] or not parquet_path.is_file():
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stats


def remove_files(folder: Path, stem: str) -> None:
    """Remove the file set `stem`, the stats file (the commit marker) first."""
    for path in reversed(file_paths(folder, stem)):
        with writing(path):
            path.unlink(missing_ok=True)


def read_samples(tar_path: Path) -> dict[str, Sample]:
    """The samples of a finished tar by key (retry keeps the ones already downloaded)."""
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
    all_stats: list[dict] = []
    for i in range(num_shards):
        stats = read_stats(out_dir, shard_stem(i))
        if stats is None:
            raise RuntimeError(f"shard {shard_stem(i)} is not complete; cannot write the manifest")
        all_stats.append(stats)
    shards = [{"name": s["name"], "num_samples": s["num_samples"]} for s in all_stats]
    counts = total_status_counts(all_stats)
    manifest = {
        "shards": shards,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_shards": num_shards,
        "pattern": f"shard-{{{0:06d}..{max(num_shards - 1, 0):06d}}}.tar",
        "status_counts": counts,
        "duplicates": counts.get("duplicate", 0),  # dropped exact duplicates (also in status_counts)
        **(extra or {}),
    }
    write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest

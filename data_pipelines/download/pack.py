"""The pack phase: complete parts -> final shards of exactly `samples_per_shard` samples, duplicates dropped.

Runs in the launching process once every part is complete. Parts are read in order and their samples in
row order. A sample whose downloaded bytes (`source_sha256`) an earlier row already stored is dropped:
its status becomes `duplicate` and the reason names the key it repeats. Of the samples left, final shard
k holds numbers k*N .. (k+1)*N - 1 and the last shard the remainder. Its parquet holds every input row
from its first row up to the row before the next shard's first sample (shard 0 starts at row 0, the last
shard runs to the end), so every input row is in exactly one final parquet, failures and duplicates too.

Tar members are copied byte for byte from the part tars (no decoding or re-encoding), in runs of adjacent
samples and in the kernel where it can (`copy_file_range`); only the closing zero blocks are new, written
as tarfile writes them. A shard's bytes therefore depend only on its samples.

Resume: the manifest and `_parts/packed.json` are removed before the first final file changes and
written after the last, so an output holding a manifest is always consistent. Each final shard's stats
record what it was made from (`pack`: a digest of the content of the parts up to the one that settles
the shard, the shard size and its row range); a rerun keeps a shard whose stats match, rewrites the
others and removes shards beyond the new count. A rewrite of a part that changes any row (resume, retry)
changes its parquet's hash, so the digest of every later shard changes with it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipelines.download.fetch import OK
from data_pipelines.download.plan import PACKED_NAME, Plan
from data_pipelines.download.shard_writer import (
    MANIFEST_NAME,
    SHARD_PREFIX,
    read_stats,
    remove_files,
    shard_stem,
    tar_end,
    write_files,
    write_json,
    write_manifest,
    writing,
)

DUPLICATE = "duplicate"
_SHARD_FILE = re.compile(rf"^{SHARD_PREFIX}-(\d+)\.(?:tar|parquet|stats\.json)$")


@dataclass
class PackResult:
    """The manifest of the packed output; `shards_written` is 0 when the pack was already current."""

    manifest: dict
    shards_written: int
    seconds: float


def part_digests(plan: Plan) -> list[str]:
    """Entry i: a digest of the content of parts 0..i (every part must be complete).

    A part's content is its row parquet (its hash, recorded in the stats when the part was written) and
    its tar's size: the parquet holds every row's status and reason and the hash of every stored image,
    and the tar follows from those rows and the plan. The stats' timings are left out, so the same parts
    give the same digest and a rewritten part with new reasons a new one.
    """
    h = hashlib.sha256()
    digests = []
    for i in range(plan.num_parts):
        stats = plan.part_stats(i)
        h.update(f"{stats['tar_bytes']} {stats['parquet_sha256']}\n".encode())
        digests.append(h.copy().hexdigest()[:32])
    return digests


def read_packed(plan: Plan) -> dict | None:
    """`_parts/packed.json`: what the current final shards were packed from; None if not (fully) packed."""
    try:
        return json.loads((plan.parts_dir / PACKED_NAME).read_text())
    except (OSError, ValueError):
        return None


def _current_manifest(plan: Plan, size: int, digest: str) -> dict | None:
    """The manifest, when the output is already packed from these parts with this shard size."""
    out = Path(plan.out_dir)
    packed = read_packed(plan)
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if packed is None or (packed.get("digest"), packed.get("samples_per_shard")) != (digest, size):
        return None
    n = packed.get("num_shards")
    if manifest.get("num_shards") != n or any(read_stats(out, shard_stem(i)) is None for i in range(n)):
        return None
    return manifest


def is_packed(plan: Plan, samples_per_shard: int) -> bool:
    """Whether the final shards are already packed from the current parts with this shard size (every
    part must be complete): `pack` would then write nothing."""
    return _current_manifest(plan, samples_per_shard, part_digests(plan)[-1]) is not None


def _drop_duplicates(plan: Plan, rows: pa.Table, seen: dict[str, int]) -> pa.Table:
    """`rows` with every success whose source bytes an earlier row stored turned into a `duplicate`.

    seen: source_sha256 -> row of its first sample, over all earlier rows (updated).
    """
    reasons: list[str | None] = [None] * rows.num_rows
    columns = zip(*(rows.column(c).to_pylist() for c in ("status", "source_sha256", "row")))
    for i, (status, source_sha, row) in enumerate(columns):
        if status == OK and source_sha:
            first = seen.setdefault(source_sha, row)
            if first != row:
                reasons[i] = f"same image bytes as key {plan.key(first)}"
    if not any(reasons):
        return rows
    mask = pa.array([r is not None for r in reasons])
    new = {name: rows.column(name).combine_chunks() for name in rows.column_names}
    new["status"] = pc.if_else(mask, DUPLICATE, new["status"])
    new["error"] = pc.if_else(mask, pa.array(reasons, pa.string()), new["error"])
    for name in ("sha256", "width", "height"):  # nothing is stored for a duplicate
        new[name] = pc.if_else(mask, pa.scalar(None, rows.schema.field(name).type), new[name])
    return pa.table(new, schema=rows.schema)


def _sample_spans(tar_path: Path) -> dict[str, tuple[int, int]]:
    """key -> (start, end) byte offsets of the sample's members, headers and padding included.

    Reads only the 512-byte headers, and only the two fields it needs: the part writer's tars are plain
    USTAR with short names (tarfile's full header parsing took most of the pack's time). Anything else
    (another tar flavour, a sample's members apart) is refused rather than guessed at.
    """
    spans: dict[str, tuple[int, int]] = {}
    block = tarfile.BLOCKSIZE
    with open(tar_path, "rb", buffering=0) as f:
        offset = 0
        while (header := os.pread(f.fileno(), block, offset)) and header.strip(b"\0"):
            if len(header) < block or header[257:263] != b"ustar\0" or header[156:157] not in (b"0", b"\0"):
                raise RuntimeError(f"{tar_path}: not a part tar of this downloader at byte {offset}")
            name = header[:100].split(b"\0", 1)[0].decode()
            size = int(header[124:136].strip(b" \0") or b"0", 8)
            key = name.partition(".")[0]
            end = offset + block + size + (-size) % block
            start, last_end = spans.get(key, (offset, offset))
            if last_end != offset:
                raise RuntimeError(f"{tar_path}: the members of sample {key} are not adjacent")
            spans[key] = (start, end)
            offset = end
    return spans


_kernel_copy = hasattr(os, "copy_file_range")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Append bytes [offset, offset + length) of file `src` to file `dst`: in the kernel where the system
    and file system allow it (no copy through Python), else through a 1 MiB buffer."""
    global _kernel_copy
    while length > 0:
        if _kernel_copy:
            try:
                n = os.copy_file_range(src, dst, length, offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                _kernel_copy = False
                continue
        else:
            data = os.pread(src, min(length, 1 << 20), offset)
            _write_all(dst, data)
            n = len(data)
        if n == 0:
            raise RuntimeError("a part tar is shorter than its own index says: it changed during the pack")
        offset += n
        length -= n


class _PartTars:
    """Open part tars and their sample indexes; shards read parts in increasing order only."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.open: dict[int, tuple[int, dict[str, tuple[int, int]]]] = {}

    def get(self, part: int) -> tuple[int, dict[str, tuple[int, int]]]:
        if part not in self.open:
            path = self.plan.part_paths(part)[0]
            self.open[part] = (os.open(path, os.O_RDONLY), _sample_spans(path))
        return self.open[part]

    def release_before(self, part: int) -> None:
        for p in [p for p in self.open if p < part]:
            os.close(self.open.pop(p)[0])

    def close(self) -> None:
        self.release_before(self.plan.num_parts)


class _Packer:
    """Walks the parts' rows in order and writes each final shard once the next one's first sample shows."""

    def __init__(self, plan: Plan, samples_per_shard: int, digests: list[str]) -> None:
        self.plan = plan
        self.out = Path(plan.out_dir)
        self.size = samples_per_shard
        self.digests = digests
        self.tars = _PartTars(plan)
        self.seen: dict[str, int] = {}
        self.index = 0  # the final shard being filled
        self.segments: list[pa.Table] = []  # its input rows, as slices of part tables
        self.samples: list[tuple[int, str]] = []  # its samples: (part, key)
        self.written = 0

    def add_part(self, part: int) -> None:
        rows = _drop_duplicates(self.plan, pq.read_table(self.plan.part_paths(part)[1]), self.seen)
        begin = 0
        for i, (status, key) in enumerate(zip(*(rows.column(c).to_pylist() for c in ("status", "key")))):
            if status != OK:
                continue
            if len(self.samples) == self.size:  # this sample opens the next shard: the current one is settled
                self.segments.append(rows.slice(begin, i - begin))
                begin = i
                self.finish_shard(part)
            self.samples.append((part, key))
        self.segments.append(rows.slice(begin))

    def finish_shard(self, part: int) -> None:
        """Write the current shard, settled by the rows of parts 0..part, unless it is already on disk."""
        rows = pa.concat_tables(self.segments).combine_chunks()
        numbers = rows.column("row")
        span = [numbers[0].as_py(), numbers[-1].as_py() + 1] if rows.num_rows else [0, 0]
        made_from = {"parts_digest": self.digests[part], "samples_per_shard": self.size, "rows": span}
        stem = shard_stem(self.index)
        old = read_stats(self.out, stem)
        if old is None or old.get("pack") != made_from:
            write_tar = self._tar_writer(list(self.samples))
            write_files(self.out, stem, write_tar, rows, len(self.samples), {"pack": made_from})
            self.written += 1
        self.tars.release_before(part)
        self.index += 1
        self.segments, self.samples = [], []

    def _tar_writer(self, samples: list[tuple[int, str]]) -> Callable[[BinaryIO], None]:
        def write(f: BinaryIO) -> None:
            # Only the raw descriptor is written to (the buffered file object stays empty), so the copies
            # and the closing blocks land in order.
            dst, size = f.fileno(), 0
            for src, start, end in self._runs(samples):
                _copy_range(src, dst, start, end - start)
                size += end - start
            _write_all(dst, tar_end(size))

        return write

    def _runs(self, samples: list[tuple[int, str]]) -> Iterator[tuple[int, int, int]]:
        """(file descriptor, start, end) of the byte runs holding `samples`, adjacent samples merged."""
        run: list[int] | None = None
        for part, key in samples:
            fd, spans = self.tars.get(part)
            start, end = spans[key]
            if run is not None and run[0] == fd and run[2] == start:
                run[2] = end
                continue
            if run is not None:
                yield run[0], run[1], run[2]
            run = [fd, start, end]
        if run is not None:
            yield run[0], run[1], run[2]


def _remove_shards_from(out: Path, first: int) -> None:
    """Remove final shards numbered `first` and up (left by an earlier pack that made more shards)."""
    stale = {int(m[1]) for p in out.iterdir() if (m := _SHARD_FILE.match(p.name)) and int(m[1]) >= first}
    for index in sorted(stale):
        remove_files(out, shard_stem(index))


def _withdraw_manifest(plan: Plan) -> None:
    """Remove manifest.json and packed.json (and temporaries of killed writers) before final files change."""
    out = Path(plan.out_dir)
    for path in [
        out / MANIFEST_NAME,
        plan.parts_dir / PACKED_NAME,
        *out.glob(f".{SHARD_PREFIX}-*.tmp"),
        *out.glob(f".{MANIFEST_NAME}.*.tmp"),
    ]:
        with writing(path):
            path.unlink(missing_ok=True)


def final_files_exist(plan: Plan) -> bool:
    """Whether the output holds a manifest, packed.json or any final shard file (what clear_final_shards
    removes)."""
    out = Path(plan.out_dir)
    return (
        (out / MANIFEST_NAME).exists()
        or (plan.parts_dir / PACKED_NAME).exists()
        or any(_SHARD_FILE.match(p.name) for p in out.iterdir())
    )


def clear_final_shards(plan: Plan) -> None:
    """Remove the manifest, packed.json and every final shard, keeping the parts.

    For complete parts that hold no sample at all: a shard of zero samples is of no use to a trainer (and
    makes it count a shard that yields nothing), so no shard and no manifest is written. The parts keep
    every row's reason and stay retryable. Shards and a manifest there may come from an older version of
    this downloader, which packed such an output into one empty shard; the manifest goes first, as in
    `pack`, so a kill part-way never leaves a manifest beside missing shards.
    """
    _withdraw_manifest(plan)
    _remove_shards_from(Path(plan.out_dir), 0)


def pack(
    plan: Plan,
    samples_per_shard: int,
    *,
    manifest_extra: dict | None = None,
    progress: bool = False,
) -> PackResult:
    """Pack the complete parts into final shards and write the manifest; nothing to do when current."""
    start = time.monotonic()
    out = Path(plan.out_dir)
    digests = part_digests(plan)
    manifest = _current_manifest(plan, samples_per_shard, digests[-1])
    if manifest is not None:
        return PackResult(manifest, 0, 0.0)
    # Until the manifest is written again the final shards are being changed: without a manifest no
    # reader (the trainer, a rerun) takes a half-packed output for a finished one.
    _withdraw_manifest(plan)
    packer = _Packer(plan, samples_per_shard, digests)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.num_parts, unit="part", desc="pack", dynamic_ncols=True)
    try:
        for part in range(plan.num_parts):
            packer.add_part(part)
            if bar is not None:
                bar.update(1)
        packer.finish_shard(plan.num_parts - 1)
    finally:
        packer.tars.close()
        if bar is not None:
            bar.close()
    num_shards = packer.index
    _remove_shards_from(out, num_shards)
    packed = {"digest": digests[-1], "samples_per_shard": samples_per_shard, "num_shards": num_shards}
    write_json(plan.parts_dir / PACKED_NAME, packed)
    manifest = write_manifest(
        out,
        num_shards,
        extra={
            "samples_per_shard": samples_per_shard,
            "rows_per_part": plan.rows_per_part,
            "num_parts": plan.num_parts,
            **(manifest_extra or {}),
        },
    )
    return PackResult(manifest, packer.written, time.monotonic() - start)


def delete_parts(plan: Plan) -> None:
    """Remove the parts of a packed output (their tars hold every sample a second time).

    packed.json is marked first, so a kill part-way leaves an output that a rerun knows to be finished
    (and finishes deleting), never one whose missing parts look like downloads still to do.
    """
    packed = read_packed(plan)
    if packed is None:
        raise RuntimeError(f"{plan.out_dir} is not packed: its parts are still needed")
    if not packed.get("parts_deleted"):
        write_json(plan.parts_dir / PACKED_NAME, {**packed, "parts_deleted": True})
    for i in range(plan.num_parts):
        remove_files(plan.parts_dir, plan.part_stem(i))
    for stale in plan.parts_dir.glob(".part-*.tmp"):
        with writing(stale):
            stale.unlink(missing_ok=True)

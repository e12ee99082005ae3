"""Shard lists: brace expansion, sample counts (manifest or img2dataset stats) and validation.

Two layouts are read:

* our crawler's: `shard-000000.tar` ... with `manifest.json` beside them,
  {"shards": [{"name": "shard-000000.tar", "num_samples": 1000}, ...], "num_samples": total},
  and `shard-000000.stats.json` beside each tar (its `pack` record marks the crawler's shards: without a
  manifest they belong to a download that did not finish, and are refused);
* img2dataset's: `00000.tar` ... with `00000_stats.json` beside each tar (its `successes` field is the
  number of samples written) and no manifest.

A local folder stands for its shards: those its manifest.json lists, else every `*.tar` in it.

Every check here runs before any worker starts, so a bad path fails with a message naming the fix instead
of a hang or a stack trace from inside a DataLoader worker.
"""

from __future__ import annotations

import collections
import json
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

MANIFEST_NAME = "manifest.json"
# A tar member costs at least one 512-byte header and one 512-byte data block; a sample has an image and a
# caption, so a shard of n samples can never be smaller than this many bytes per sample.
_MIN_BYTES_PER_SAMPLE = 2048


class ShardError(ValueError):
    """A shard list that cannot be read as given; the message names the problem and the fix."""


@dataclass
class ShardSource:
    """One data source: its shard URLs, its mixing weight and, where known, its sample count."""

    urls: list[str]
    weight: float = 1.0
    num_samples: int | None = None
    name: str = ""
    shard_counts: dict[str, int] = field(default_factory=dict)


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Brace-expand a shard spec: "dir/shard-{000000..000012}.tar", or a list of such strings.

    A local folder stands for every shard its manifest.json lists or, without one (img2dataset's output),
    for every `*.tar` in it, by name. Order is kept and duplicates raise (a shard listed twice would be
    read twice per epoch).
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        if not isinstance(s, str):
            raise ShardError(f"shard spec entries must be strings, got {type(s).__name__}: {s!r}")
        s = s.strip()
        if is_local(s) and local_path(s).is_dir():
            urls.extend(_folder_urls(local_path(s)))
        else:
            urls.extend(braceexpand.braceexpand(s))
    seen: set[str] = set()
    dup = [u for u in urls if u in seen or seen.add(u)]
    if dup:
        raise ShardError(
            f"shard list names {len(dup)} shard(s) twice, e.g. {dup[0]!r}: fix the brace pattern"
        )
    return urls


def _folder_urls(folder: Path) -> list[str]:
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        return [str(folder / name) for name in read_manifest(manifest)]
    tars = _tar_files(folder)
    if not tars:
        raise ShardError(
            f"{folder} holds no .tar shards and no {MANIFEST_NAME} ({_contents(folder)}): pass a folder of "
            "WebDataset shards (the download's or img2dataset's output) or a brace pattern of .tar files"
        )
    return [str(p) for p in tars]


def _tar_files(folder: Path) -> list[Path]:
    """The `*.tar` files in `folder`, by name; hidden ones (temporaries, `._` copies) left out."""
    try:
        return sorted(p for p in folder.glob("*.tar") if not p.name.startswith(".") and p.is_file())
    except OSError:
        return []


def _contents(folder: Path) -> str:
    """What a folder holds, for an error message: "it holds 120 .png files and 1 .csv file"."""
    try:
        names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError as e:
        return f"it cannot be listed: {e.strerror or e}"
    if not names:
        return "it is empty"
    kinds = collections.Counter(Path(n).suffix.lower() or "extension-less" for n in names)
    shown = [f"{n} {kind} file{'s' if n > 1 else ''}" for kind, n in kinds.most_common(3)]
    more = f" and {len(kinds) - 3} other kinds" if len(kinds) > 3 else ""
    return "it holds " + ", ".join(shown) + more


_NUMBERED_TAR = re.compile(r"(.*?)(\d+)\.tar")


def _suggest_pattern(folder: Path) -> str | None:
    """A brace pattern that names exactly the .tar files in `folder` ("d/{00000..00041}.tar"), when they are
    one run of consecutive numbers of one width with one prefix; None when no single pattern fits."""
    tars = _tar_files(folder)
    matches = [_NUMBERED_TAR.fullmatch(p.name) for p in tars]
    if not tars or not all(matches) or "{" in str(folder) or "}" in str(folder):
        return None
    if len({(m[1], len(m[2])) for m in matches}) != 1:
        return None
    numbers = [int(m[2]) for m in matches]  # sorted, as the names are of one width
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        return None
    if len(tars) == 1:
        return str(tars[0])
    prefix, first, last = matches[0][1], matches[0][2], matches[-1][2]
    return f"{folder}/{prefix}{{{first}..{last}}}.tar"


def _what_is_there(folder: Path) -> str:
    """A hint naming what a folder holds, with a pattern or the folder itself to pass instead."""
    if not folder.is_dir():
        return f"{folder} does not exist"
    tars = _tar_files(folder)
    if not tars:
        return f"{folder} holds no .tar files ({_contents(folder)})"
    pattern = _suggest_pattern(folder)
    if pattern is not None:
        return f"{folder} holds {len(tars)} .tar file(s), which '{pattern}' names, or pass the folder itself"
    return (
        f"{folder} holds {len(tars)} .tar files ({tars[0].name} ... {tars[-1].name}); pass the folder itself "
        "to read them all"
    )


def parse_sources(spec: str | Sequence[str] | Sequence[dict]) -> list[ShardSource]:
    """Accept a spec string, a list of spec strings (one source), or a list of {"urls", "weight"} dicts
    (several sources mixed by weight)."""
    if isinstance(spec, str):
        return [ShardSource(urls=expand_urls(spec), name=spec)]
    spec = list(spec)
    if not spec:
        raise ShardError("no shards given: pass a brace pattern such as 'data/shard-{000000..000099}.tar'")
    if all(isinstance(s, str) for s in spec):
        return [ShardSource(urls=expand_urls(spec), name=str(spec[0]))]
    sources = []
    for i, s in enumerate(spec):
        if not hasattr(s, "get") or "urls" not in s:
            raise ShardError(
                f"source {i} is {s!r}; a list of sources needs entries like {{'urls': 'a-{{0..9}}.tar', "
                "'weight': 1.0}"
            )
        weight = float(s.get("weight", 1.0))
        if not weight > 0:
            raise ShardError(f"source {i} ({s['urls']!r}) has weight {weight}; weights must be > 0")
        sources.append(ShardSource(urls=expand_urls(s["urls"]), weight=weight, name=str(s["urls"])))
    return sources


def is_local(url: str) -> bool:
    """True for plain paths and file:// URLs (which can be checked on disk); pipe:/http(s) are not."""
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> Path:
    return Path(url[len("file://") :] if url.startswith("file://") else url)


def check_readable(urls: Sequence[str], what: str = "shard") -> None:
    """Raise ShardError listing every local shard that is missing, unreadable or not a tar archive."""
    missing, unreadable = [], []
    for url in urls:
        if not is_local(url):
            continue
        path = local_path(url)
        if not path.exists():
            missing.append(url)
        elif not path.is_file():
            unreadable.append(f"{url} (not a regular file)")
        else:
            try:
                with open(path, "rb") as f:
                    head = f.read(tarfile.BLOCKSIZE)
            except OSError as e:
                unreadable.append(f"{url} ({e.strerror or e})")
                continue
            why = _not_a_tar(head)
            if why is not None:
                # The usual slip is a file from beside the shards: name them when they are there.
                hint = f"; {_what_is_there(path.parent)}" if _tar_files(path.parent) else ""
                raise ShardError(
                    f"{url} is not a tar archive ({why}): a {what} is a WebDataset .tar file of samples "
                    f"(KEY.jpg + KEY.txt ...); pass a brace pattern of them, a list, or their folder{hint}"
                )
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ShardError(
            f"{len(missing)} of {len(urls)} {what}s not found: {shown}. Check the brace range against the "
            f"files on disk: {_what_is_there(local_path(missing[0]).parent)}."
        )
    if unreadable:
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        shown = ", ".join(unreadable[:3]) + more
        raise ShardError(
            f"{len(unreadable)} {what}(s) cannot be read: {shown}. Fix the permissions or the path."
        )


# Files that are often passed for shards by mistake, by their first bytes.
_SIGNATURES = {
    b"\x89PNG": "it starts like a PNG image",
    b"\xff\xd8\xff": "it starts like a JPEG image",
    b"GIF8": "it starts like a GIF image",
    b"PK\x03\x04": "it starts like a zip archive",
    b"PAR1": "it starts like a parquet table",
}
# Compressed tars, which the reader opens as they are (tarfile's "r|*"); their headers are not checked here.
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _not_a_tar(head: bytes) -> str | None:
    """Why a file whose first bytes are `head` is surely no tar archive; None when it may be one.

    A file shorter than one header may be a tar cut short, which the reader skips and counts, so only a
    known other format or a full first block with a wrong header checksum is refused."""
    for signature, why in _SIGNATURES.items():
        if head.startswith(signature):
            return why
    if head.startswith(_COMPRESSED) or len(head) < tarfile.BLOCKSIZE or not head.strip(b"\0"):
        return None  # compressed, cut short, or an empty archive's zero block
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return "its first 512 bytes are no tar header"
    return None


def read_manifest(path: str | os.PathLike) -> dict[str, int]:
    """Read our crawler's manifest.json -> {shard file name: num_samples}; checks its internal totals."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
        counts = {str(s["name"]): int(s["num_samples"]) for s in manifest["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(
            f"manifest {path} is unreadable or malformed ({e}); expected {{'shards': [{{'name': "
            "'shard-000000.tar', 'num_samples': 1000}}, ...], 'num_samples': total}}. Regenerate it with the "
            "crawler or pass train_num_samples."
        ) from e
    total = manifest.get("num_samples")
    if total is not None and int(total) != sum(counts.values()):
        raise ShardError(
            f"manifest {path} says num_samples={total} but its shards add up to {sum(counts.values())}: "
            "the manifest is inconsistent; regenerate it or pass train_num_samples."
        )
    return counts


def _read_stats(stats: Path) -> dict | None:
    """A per-shard stats file as a dict; None when there is none."""
    if not stats.is_file():
        return None
    try:
        data = json.loads(stats.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{stats} is not valid JSON ({e}); delete it or pass train_num_samples") from e
    return data if isinstance(data, dict) else None


def _img2dataset_stats(path: Path) -> int | None:
    """Sample count from an img2dataset `00000_stats.json` ("successes"), or our `.stats.json`."""
    for stats in (path.with_name(path.stem + "_stats.json"), path.with_name(path.stem + ".stats.json")):
        data = _read_stats(stats)
        if data is not None:
            for k in ("num_samples", "successes"):
                if isinstance(data.get(k), int):
                    return data[k]
    return None


def _cut_short(path: Path) -> bool:
    """Whether a tar lacks the two zero blocks that end every whole archive (a download or copy cut short).

    Compressed tars do not end in zeros and count as cut short: their size says nothing of their samples."""
    end = 2 * tarfile.BLOCKSIZE
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - end))
            tail = f.read(end)
    except OSError:
        return False
    return len(tail) < end or tail.strip(b"\0") != b""


def check_finished(urls: Sequence[str]) -> None:
    """Raise ShardError for local shards of our crawler's download that did not finish.

    The crawler writes manifest.json after the last shard and removes it before changing any shard, and
    its shard stats carry a `pack` record. Such stats with no manifest beside them mean a download killed
    before or during its pack: the shards on disk may mix an earlier pack with a new one, so they are
    refused rather than read. img2dataset's layout (no manifest, no `pack`) is not affected.
    """
    has_manifest: dict[Path, bool] = {}
    for url in urls:
        if not is_local(url):
            continue
        path = local_path(url)
        folder = path.parent
        if folder not in has_manifest:
            has_manifest[folder] = (folder / MANIFEST_NAME).is_file()
        if has_manifest[folder]:
            continue
        stats = _read_stats(path.with_name(path.stem + ".stats.json"))
        if stats is not None and "pack" in stats:
            raise ShardError(
                f"the download into {folder} did not finish (no {MANIFEST_NAME}): rerun the same download "
                "command to complete it"
            )


def count_samples(urls: Sequence[str]) -> tuple[int | None, dict[str, int]]:
    """Total sample count of local shards from manifest.json beside them, else from per-shard stats files.

    Returns (total or None when any shard's count is unknown, {url: count} for the known ones).
    Raises ShardError when a manifest exists but disagrees with the files: a listed shard it does not
    know, or a whole tar too small to hold the samples it claims; and for an unfinished download
    (check_finished). A tar cut short is let through: the reader skips what it lost and counts it.
    """
    check_finished(urls)
    counts: dict[str, int] = {}
    manifests: dict[Path, dict[str, int]] = {}
    unknown = 0
    for url in urls:
        if not is_local(url):
            unknown += 1
            continue
        path = local_path(url)
        manifest_path = path.parent / MANIFEST_NAME
        if manifest_path not in manifests:
            manifests[manifest_path] = read_manifest(manifest_path) if manifest_path.is_file() else {}
        manifest = manifests[manifest_path]
        if manifest:
            if path.name not in manifest:
                raise ShardError(
                    f"{url} is not listed in {manifest_path}: the manifest disagrees with the files. "
                    "Regenerate the manifest, fix the shard pattern, or pass train_num_samples."
                )
            n = manifest[path.name]
        else:
            n = _img2dataset_stats(path)
            if n is None:
                unknown += 1
                continue
        if path.is_file() and path.stat().st_size < n * _MIN_BYTES_PER_SAMPLE and not _cut_short(path):
            raise ShardError(
                f"{url} is {path.stat().st_size} bytes but its manifest/stats claim {n} samples (a "
                f"sample needs >= {_MIN_BYTES_PER_SAMPLE} bytes): the counts belong to other files. "
                "Regenerate the manifest or pass train_num_samples."
            )
        counts[url] = n
    return (None if unknown else sum(counts.values())), counts

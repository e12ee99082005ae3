"""Shard lists: brace expansion, sample counts (manifest or img2dataset stats) and validation.

Two layouts are read:

* our crawler's: `shard-000000.tar` ... with `manifest.json` beside them,
  {"shards": [{"name": "shard-000000.tar", "num_samples": 1000}, ...], "num_samples": total},
  and `shard-000000.stats.json` beside each tar (its `pack` record marks the crawler's shards: without a
  manifest they belong to a download that did not finish, and are refused);
* img2dataset's: `00000.tar` ... with `00000_stats.json` beside each tar (its `successes` field is the
  number of samples written) and no manifest.

Every check here runs before any worker starts, so a bad path fails with a message naming the fix instead
of a hang or a stack trace from inside a DataLoader worker.
"""

from __future__ import annotations

import json
import os
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

    A local folder holding a manifest.json stands for every shard the manifest lists. Order is kept and
    duplicates raise (a shard listed twice would be read twice per epoch).
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        if not isinstance(s, str):
            raise ShardError(f"shard spec entries must be strings, got {type(s).__name__}: {s!r}")
        s = s.strip()
        if is_local(s) and local_path(s).is_dir():
            urls.extend(_manifest_urls(local_path(s)))
        else:
            urls.extend(braceexpand.braceexpand(s))
    seen: set[str] = set()
    dup = [u for u in urls if u in seen or seen.add(u)]
    if dup:
        raise ShardError(
            f"shard list names {len(dup)} shard(s) twice, e.g. {dup[0]!r}: fix the brace pattern"
        )
    return urls


def _manifest_urls(folder: Path) -> list[str]:
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        raise ShardError(
            f"{folder} is a folder without a {MANIFEST_NAME}; pass a brace pattern such as "
            f"'{folder}/shard-{{000000..000099}}.tar' instead"
        )
    return [str(folder / name) for name in read_manifest(manifest)]


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
    """Raise ShardError listing every local shard that is missing or unreadable."""
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
                    f.read(1)
            except OSError as e:
                unreadable.append(f"{url} ({e.strerror or e})")
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ShardError(
            f"{len(missing)} of {len(urls)} {what}s not found: {shown}. Check the brace range against the "
            "files on disk (ls the folder) or the path prefix."
        )
    if unreadable:
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        shown = ", ".join(unreadable[:3]) + more
        raise ShardError(
            f"{len(unreadable)} {what}(s) cannot be read: {shown}. Fix the permissions or the path."
        )


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
    know, or a file too small to hold the samples it claims; and for an unfinished download (check_finished).
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
        if path.is_file() and path.stat().st_size < n * _MIN_BYTES_PER_SAMPLE:
            raise ShardError(
                f"{url} is {path.stat().st_size} bytes but its manifest/stats claim {n} samples (a "
                f"sample needs >= {_MIN_BYTES_PER_SAMPLE} bytes): the counts belong to other files. "
                "Regenerate the manifest or pass train_num_samples."
            )
        counts[url] = n
    return (None if unknown else sum(counts.values())), counts

"""Small WebDataset shards for the data tests, in both layouts the data module reads.

* our crawler's: shard-000000.tar (KEY.jpg, KEY.txt, KEY.json), shard-000000.stats.json beside it, and a
  manifest.json for the folder;
* img2dataset's: 00000.tar (keys like 000000012), 00000_stats.json with "successes", no manifest.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

BAD_JPEG = b"\xff\xd8 this is not a jpeg"


def jpeg_bytes(seed: int, size: int | tuple[int, int] = 48, quality: int = 90, mode: str = "RGB") -> bytes:
    """A JPEG of smooth colour gradients plus noise (compresses like a photo, not like flat colour)."""
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)[None, None, :] + 60 * np.sin(xx[..., None] / (w / 3) + rng.uniform(0, 6, 3))
    pixels = np.clip(base + 40 * np.cos(yy[..., None] / (h / 4)) + rng.normal(0, 8, (h, w, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_tar(path: Path, samples: Iterable[dict]) -> int:
    n = 0
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
            n += 1
    return n


def write_crawler_shards(
    root: Path,
    counts: Sequence[int],
    *,
    image_size: int = 48,
    corrupt: Iterable[str] = (),
    manifest: bool = True,
    key_prefix: str = "",
) -> str:
    """Write len(counts) shards with counts[i] samples each; keys "{prefix}{shard:04d}x{i:05d}".

    corrupt: keys whose image bytes are replaced by garbage (still counted in the manifest, like a crawl
    whose image later went bad). Returns the brace pattern of the shards.
    """
    root.mkdir(parents=True, exist_ok=True)
    corrupt = set(corrupt)
    entries = []
    for s, count in enumerate(counts):
        name = f"shard-{s:06d}.tar"

        def samples(s=s, count=count):
            for i in range(count):
                key = f"{key_prefix}{s:04d}x{i:05d}"
                caption = f"a photo number {i} of shard {s}"
                image = BAD_JPEG if key in corrupt else jpeg_bytes(s * 100_003 + i, image_size)
                meta = json.dumps({"url": f"http://example.com/{key}.jpg", "text": caption, "key": key})
                yield {"__key__": key, "jpg": image, "txt": caption.encode(), "json": meta.encode()}

        n = _write_tar(root / name, samples())
        (root / f"shard-{s:06d}.stats.json").write_text(json.dumps({"num_samples": n, "failed": 0}))
        entries.append({"name": name, "num_samples": n})
    if manifest:
        total = sum(e["num_samples"] for e in entries)
        (root / "manifest.json").write_text(json.dumps({"shards": entries, "num_samples": total}))
    return str(root / f"shard-{{000000..{len(counts) - 1:06d}}}.tar")


def write_img2dataset_shards(
    root: Path, counts: Sequence[int], *, image_size: int = 48, stats: bool = True
) -> str:
    """img2dataset layout: 00000.tar ... with 9-digit keys and 00000_stats.json ("successes")."""
    root.mkdir(parents=True, exist_ok=True)
    key = 0
    for s, count in enumerate(counts):
        samples = []
        for _ in range(count):
            k = f"{key:09d}"
            caption = f"img2dataset caption {key}"
            meta = {"url": f"http://example.com/{k}.jpg", "caption": caption, "key": k, "status": "success"}
            samples.append(
                {
                    "__key__": k,
                    "jpg": jpeg_bytes(key, image_size),
                    "txt": caption.encode(),
                    "json": json.dumps(meta).encode(),
                }
            )
            key += 1
        _write_tar(root / f"{s:05d}.tar", samples)
        if stats:
            (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": count, "successes": count}))
    return str(root / f"{{00000..{len(counts) - 1:05d}}}.tar")


def cut_short(tar: Path, key: str, inside: str = "data") -> None:
    """Truncate `tar` inside the first member of sample `key`, as a download or copy cut short would: in
    its "data" (tarfile then raises) or in its "header" (tarfile then ends the archive without a word).
    The samples before `key` stay whole."""
    with tarfile.open(tar) as archive:
        member = next(m for m in archive if m.name.split(".")[0] == key)
    cut = member.offset + 100 if inside == "header" else member.offset_data + member.size // 2
    tar.write_bytes(tar.read_bytes()[:cut])


def tar_keys(tar: Path) -> list[str]:
    """The sample keys of a tar, in order."""
    with tarfile.open(tar) as archive:
        return list(dict.fromkeys(m.name.split(".")[0] for m in archive))


class ToyTokenizer:
    """Stand-in tokenizer for data tests: words -> ids by character sum, padded to context_length."""

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [1 + sum(map(ord, word)) % 1000 for word in text.split()][: self.context_length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

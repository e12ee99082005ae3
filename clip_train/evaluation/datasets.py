"""Evaluation datasets: labelled images for zero-shot classification, captioned images for retrieval.

Images are referenced, not loaded: an `ImageRef` is a file, or a member of a local tar shard (its byte
offset and size, found by one pass over the tar headers), so a rank can read any slice of a large set.

Layouts read:

* image folder (classification): ROOT/<class folder>/<image>; classes are the sub-folders in sorted order.
  A class-name file may name them (line i names the i-th folder in sorted order, e.g. ImageNet's wnids);
  otherwise the folder names are used with "_" read as a space.
* labelled WebDataset shards (classification): KEY.jpg|jpeg|png|webp with its label either in KEY.cls (the
  integer label as text, as webdataset writes "cls") or in KEY.json as "label" — an integer, or a class name
  from the class-name file. Label i is line i of the class-name file.
* captioned folder (retrieval): ROOT/**/<name>.<image ext> with <name>.txt beside it, one caption per line
  (several captions per image).
* captioned WebDataset shards (retrieval): KEY.txt with one caption per line, or KEY.json with "captions"
  (a list) or "caption"/"text" (one).

Shard specs are brace patterns or a folder with a manifest.json (`clip_train.data.shards.expand_urls`);
they must be local files.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from clip_train.data.shards import ShardError, expand_urls, is_local, local_path
from clip_train.data.transforms import decode_image
from clip_train.evaluation.templates import check_classnames

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_SHARD_TEXT_EXTS = ("txt", "json", "cls")


class DatasetError(ValueError):
    """An evaluation dataset that cannot be read as given; the message names the file or sample."""


@dataclass(frozen=True)
class ImageRef:
    """One image: a file (`member` empty), or the member of an uncompressed tar at byte `offset`."""

    path: str
    member: str = ""
    offset: int = -1
    size: int = -1

    @property
    def name(self) -> str:
        """How messages and reports name the image: the file, or "shard.tar::member"."""
        return f"{self.path}::{self.member}" if self.member else self.path

    def read_bytes(self) -> bytes:
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"image file not found: {self.path}")
        with open(self.path, "rb") as f:
            if not self.member:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


def load_image(ref: ImageRef, target_size: int | None = None) -> Image.Image:
    """Decode an image to RGB; `target_size` lets JPEGs decode at reduced scale (see `decode_image`).
    Raises `DatasetError` naming the image when its bytes do not decode."""
    data = ref.read_bytes()
    try:
        return decode_image(data, target_size)
    except Exception as exc:  # PIL raises several types for corrupt or unsupported data
        raise DatasetError(f"image does not decode: {ref.name} ({type(exc).__name__}: {exc})") from exc


@dataclass
class ClassificationSet:
    """Labelled images: `labels[i]` (int64, in [0, len(classnames))) is the class of `images[i]`."""

    name: str
    images: list[ImageRef]
    labels: Tensor
    classnames: list[str]

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class RetrievalSet:
    """Images, each with one or more captions."""

    name: str
    images: list[ImageRef]
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.images)

    def flat_captions(self) -> tuple[list[str], Tensor]:
        """All captions in image order, and for each the index of its image: int64 (M,)."""
        texts = [c for caps in self.captions for c in caps]
        owners = torch.repeat_interleave(
            torch.arange(len(self.captions)), torch.tensor([len(c) for c in self.captions], dtype=torch.long)
        )
        return texts, owners


# --------------------------------------------------------------------------------------- image folders


def _require_dir(root: str | Path, what: str) -> Path:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{what} not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"{what} must be a folder: {root}")
    return root


def list_images(root: str | Path) -> list[ImageRef]:
    """Every image file under `root` (recursively), in sorted path order; `root` may also be one image."""
    root = Path(root)
    if root.is_file():
        return [ImageRef(str(root))]
    root = _require_dir(root, "image folder")
    return [
        ImageRef(str(p))
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]


def labels_file_set(path: str | Path, label_key: str = "label") -> ClassificationSet:
    """A classification set from a JSON list of records {"file": image path, label_key: class name, ...}
    (the demo's eval/labels.json has "shape" and "colour"). Relative paths are taken from the JSON file's
    folder, so a labelled set can be moved as a whole; classes are the distinct names in sorted order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(records, list) or not records:
        raise DatasetError(f'{path} must hold a non-empty JSON list of records with "file" and {label_key!r}')
    bad = [i for i, r in enumerate(records) if not (isinstance(r, dict) and {"file", label_key} <= r.keys())]
    if bad:
        raise DatasetError(f"{path}: records {bad[:10]} lack 'file' or {label_key!r}")
    classnames = sorted({str(r[label_key]) for r in records})
    images = [ImageRef(str(path.parent / r["file"])) for r in records]  # an absolute "file" stays as it is
    labels = torch.tensor([classnames.index(str(r[label_key])) for r in records], dtype=torch.long)
    return ClassificationSet(f"{path.name}:{label_key}", images, labels, classnames)


def image_folder(
    root: str | Path, classnames: Sequence[str] | None = None, name: str = ""
) -> ClassificationSet:
    """A classification set from ROOT/<class>/<images> (see the module docstring for the class order)."""
    root = _require_dir(root, "image folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DatasetError(f"{root} has no class sub-folders (expected ROOT/<class name>/<image files>)")
    if classnames is None:
        classnames = [p.name.replace("_", " ") for p in folders]
    elif len(classnames) != len(folders):
        raise DatasetError(
            f"{root} has {len(folders)} class folders but the class-name list has {len(classnames)} names; "
            "line i of the class-name file names the i-th folder in sorted order"
        )
    classnames = check_classnames(list(classnames), str(root))
    images: list[ImageRef] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        refs = list_images(folder)
        images += refs
        labels += [label] * len(refs)
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return ClassificationSet(name or root.name, images, torch.tensor(labels, dtype=torch.long), classnames)


def captioned_folder(root: str | Path, name: str = "") -> RetrievalSet:
    """A retrieval set from images with a same-named .txt beside each (one caption per line)."""
    root = _require_dir(root, "captioned image folder")
    images, captions = [], []
    for ref in list_images(root):
        text_file = Path(ref.path).with_suffix(".txt")
        if not text_file.is_file():
            raise DatasetError(f"image {ref.path} has no caption file {text_file.name} beside it")
        lines = [line.strip() for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise DatasetError(f"caption file {text_file} is empty")
        images.append(ref)
        captions.append(lines)
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return RetrievalSet(name or root.name, images, captions)


# ---------------------------------------------------------------------------------------------- shards


@dataclass
class _ShardSample:
    key: str
    image: ImageRef | None
    texts: dict[str, bytes]  # small members by extension: txt, json, cls


def _shard_paths(pattern: str | Sequence[str]) -> list[Path]:
    try:
        urls = expand_urls(pattern)
    except ShardError as exc:
        raise DatasetError(str(exc)) from exc
    if not urls:
        raise DatasetError(f"the shard pattern {pattern!r} names no shards")
    paths = []
    for url in urls:
        if not is_local(url):
            raise DatasetError(f"evaluation shards must be local files, got {url}")
        path = local_path(url)
        if not path.is_file():
            raise FileNotFoundError(f"shard not found: {path}")
        paths.append(path)
    return paths


def _scan_shard(path: Path) -> Iterator[_ShardSample]:
    """The samples of one uncompressed tar, members grouped by key (file name up to its first dot)."""
    current: _ShardSample | None = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                ext = ext.lower()
                if not dot or stem.startswith("__"):
                    continue
                key = f"{directory}/{stem}" if directory else stem
                if current is None or current.key != key:
                    if current is not None:
                        yield current
                    current = _ShardSample(key, None, {})
                if ext in _SHARD_IMAGE_EXTS and current.image is None:
                    current.image = ImageRef(str(path), member.name, member.offset_data, member.size)
                elif ext in _SHARD_TEXT_EXTS:
                    current.texts[ext] = tar.extractfile(member).read()
    except tarfile.TarError as exc:
        raise DatasetError(f"cannot read shard {path} as an uncompressed tar: {exc}") from exc
    if current is not None:
        yield current


def _scan_shards(pattern: str | Sequence[str]) -> Iterator[tuple[Path, _ShardSample]]:
    for path in _shard_paths(pattern):
        for sample in _scan_shard(path):
            yield path, sample


def _json(sample: _ShardSample, path: Path) -> dict:
    if "json" not in sample.texts:
        return {}
    try:
        meta = json.loads(sample.texts["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}::{sample.key}.json is not valid JSON: {exc}") from exc
    return meta if isinstance(meta, dict) else {}


def shard_images(pattern: str | Sequence[str]) -> list[ImageRef]:
    """Every image in the shards, in shard then member order (samples without an image are skipped)."""
    return [s.image for _, s in _scan_shards(pattern) if s.image is not None]


def _label(sample: _ShardSample, path: Path, index: dict[str, int]) -> int:
    where = f"{path}::{sample.key}"
    if "cls" in sample.texts:
        raw: object = sample.texts["cls"].decode("utf-8", errors="replace").strip()
        try:
            value: object = int(raw)  # type: ignore[arg-type]
        except ValueError as exc:
            raise DatasetError(f"{where}.cls holds {raw!r}, not an integer label") from exc
    else:
        value = _json(sample, path).get("label")
        if value is None:
            raise DatasetError(
                f"{where} has no label: expected {sample.key}.cls or a 'label' in {sample.key}.json"
            )
    if isinstance(value, str):
        if value not in index:
            raise DatasetError(f"{where}: label {value!r} is not in the class-name list")
        return index[value]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(index):
        raise DatasetError(f"{where}: label {value!r} is not a class index in [0, {len(index)})")
    return value


def labelled_shards(
    pattern: str | Sequence[str], classnames: Sequence[str], name: str = ""
) -> ClassificationSet:
    """A classification set from labelled WebDataset shards (see the module docstring for the label)."""
    classnames = check_classnames(list(classnames), "class names")
    index = {c: i for i, c in enumerate(classnames)}
    images, labels = [], []
    for path, sample in _scan_shards(pattern):
        if sample.image is None:
            raise DatasetError(f"{path}::{sample.key} has no image ({'/'.join(_SHARD_IMAGE_EXTS)})")
        images.append(sample.image)
        labels.append(_label(sample, path, index))
    if not images:
        raise DatasetError(f"the shards {pattern!r} hold no samples")
    label = name or Path(str(pattern if isinstance(pattern, str) else pattern[0])).parent.name
    return ClassificationSet(label, images, torch.tensor(labels, dtype=torch.long), classnames)


def _captions(sample: _ShardSample, path: Path) -> list[str]:
    if "txt" in sample.texts:
        lines = sample.texts["txt"].decode("utf-8", errors="replace").splitlines()
    else:
        meta = _json(sample, path)
        found = meta.get("captions") or meta.get("caption") or meta.get("text") or []
        lines = [found] if isinstance(found, str) else [str(c) for c in found]
    lines = [line.strip() for line in lines if line.strip()]
    if not lines:
        raise DatasetError(f"{path}::{sample.key} has no caption (expected .txt, or 'captions' in .json)")
    return lines


def captioned_shards(pattern: str | Sequence[str], name: str = "") -> RetrievalSet:
    """A retrieval set from WebDataset shards (one caption per line of KEY.txt, or KEY.json "captions")."""
    images, captions = [], []
    for path, sample in _scan_shards(pattern):
        if sample.image is None:
            raise DatasetError(f"{path}::{sample.key} has no image ({'/'.join(_SHARD_IMAGE_EXTS)})")
        images.append(sample.image)
        captions.append(_captions(sample, path))
    if not images:
        raise DatasetError(f"the shards {pattern!r} hold no samples")
    label = name or Path(str(pattern if isinstance(pattern, str) else pattern[0])).parent.name
    return RetrievalSet(label, images, captions)

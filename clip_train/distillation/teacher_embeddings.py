"""Teacher embeddings precomputed into side files next to the shards, so that training pays no teacher
forward pass.

Layout: `shard-000000.teacher.npz` beside `shard-000000.tar` (the tar's name with `.tar` replaced), an
uncompressed NumPy archive of

    keys   (N,)   str      the samples' `__key__`, in tar order
    image  (N, D) float16  the teacher's unit-norm image embeddings (evaluation transform: resize + centre
                           crop at the teacher's image size)
    text   (N, D) float16  the teacher's unit-norm text embeddings of the caption the data module reads
                           (KEY.txt, else KEY.json "caption"/"text"), tokenised at its context length
    meta   ()     str      JSON: {"teacher": file name, "fingerprint": sha256 of the teacher's weights,
                           "embed_dim": D, "image_size": ..., "num_samples": N, "skipped": [...]}

Samples without an image or caption, or whose image does not decode, are left out and listed under
"skipped" (training skips them too). The student sees random crops while the teacher saw the centre crop:
distillation configs set the data module's crop_scale to [1, 1] so the two differ at most in aspect.
float16 halves the files; unit-norm embeddings lose < 1e-3 in cosine similarity to it.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clip_train.data.shards import is_local, local_path
from clip_train.data.transforms import decode_image, eval_transform, normalize_batch, stack_uint8
from clip_train.evaluation.embedding import tokenizer_for
from clip_train.models import CLIP

SIDE_SUFFIX = ".teacher.npz"
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class TeacherEmbeddingError(ValueError):
    """Side files that are missing, stale (another teacher) or lack a sample; the message names the fix."""


def side_file(shard: str | Path) -> Path:
    """Where the side file of a local shard lives: `dir/shard-000000.tar` → `dir/shard-000000.teacher.npz`."""
    shard = str(shard)
    if not is_local(shard):
        raise TeacherEmbeddingError(f"teacher side files need local shards, got {shard}")
    path = local_path(shard)
    return path.with_name(path.name.removesuffix(".tar") + SIDE_SUFFIX)


def teacher_fingerprint(model: CLIP) -> str:
    """sha256 of the model's weights (names, shapes and float32 bytes): side files name their teacher."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- computing
def _samples(path: Path) -> Iterator[tuple[str, bytes | None, str]]:
    """(key, image bytes or None, caption or "") of each sample of an uncompressed tar, in tar order."""
    members: dict[str, bytes] = {}
    key = None
    with tarfile.open(path, mode="r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot or stem.startswith("__"):
                continue
            name = f"{directory}/{stem}" if directory else stem
            if key is not None and name != key:
                yield _sample(key, members)
                members = {}
            key = name
            members[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield _sample(key, members)


def _sample(key: str, members: dict[str, bytes]) -> tuple[str, bytes | None, str]:
    image = next((members[e] for e in _IMAGE_EXTS if e in members), None)
    caption = ""
    if "txt" in members:
        caption = members["txt"].decode("utf-8", errors="replace").strip()
    elif "json" in members:
        try:
            meta = json.loads(members["json"])
            caption = str(meta.get("caption") or meta.get("text") or "").strip()
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            caption = ""
    return key, image, caption


@torch.no_grad()
def shard_teacher_embeddings(
    teacher: CLIP, shard: str | Path, *, batch_size: int = 64, device: torch.device | str = "cpu"
) -> tuple[list[str], Tensor, Tensor, list[str]]:
    """The teacher's embeddings of one shard: (keys, image (N, D), text (N, D) float32 unit-norm, skipped
    keys)."""
    transform = eval_transform(teacher.image_size)
    tokenizer = tokenizer_for(teacher)
    keys: list[str] = []
    skipped: list[str] = []
    images: list[Tensor] = []
    texts: list[Tensor] = []
    pending: list[tuple[str, Tensor, str]] = []

    def flush() -> None:
        batch = normalize_batch(stack_uint8([crop for _, crop, _ in pending])).to(device)
        tokens = tokenizer([caption for _, _, caption in pending]).to(device)
        images.append(F.normalize(teacher.encode_image(batch).float(), dim=-1).cpu())
        texts.append(F.normalize(teacher.encode_text(tokens).float(), dim=-1).cpu())
        keys.extend(key for key, _, _ in pending)
        pending.clear()

    for key, data, caption in _samples(Path(shard)):
        if data is None or not caption:
            skipped.append(key)
            continue
        try:
            crop = transform.crop(decode_image(data, transform.decode_size))
        except Exception:  # an undecodable image: the data module skips it as well
            skipped.append(key)
            continue
        pending.append((key, crop, caption))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    dim = teacher.config.embed_dim
    image = torch.cat(images) if images else torch.empty(0, dim)
    text = torch.cat(texts) if texts else torch.empty(0, dim)
    return keys, image, text, skipped


def write_side_file(path: Path, keys: Sequence[str], image: Tensor, text: Tensor, meta: dict) -> Path:
    """Write one side file atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp,
        keys=np.asarray(list(keys), dtype=str),
        image=image.to(torch.float16).numpy(),
        text=text.to(torch.float16).numpy(),
        meta=np.asarray(json.dumps(meta)),
    )
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------ reading
@dataclass
class TeacherEmbeddingTable:
    """Every side file of a shard list in memory: key → row of `image` / `text` (float16, unit norm)."""

    index: dict[str, int]
    image: Tensor  # (N, D) float16
    text: Tensor  # (N, D) float16

    def lookup(self, keys: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(B, D) float32 image and text embeddings of `keys`, in order."""
        try:
            rows = torch.tensor([self.index[k] for k in keys], dtype=torch.long)
        except KeyError as exc:
            raise TeacherEmbeddingError(
                f"sample {exc.args[0]!r} has no teacher embedding in the side files: they were computed for "
                "other shards; rerun python -m clip_train.distillation.precompute on these shards"
            ) from None
        return self.image[rows].float(), self.text[rows].float()


def load_side_files(shards: Sequence[str], fingerprint: str | None = None) -> TeacherEmbeddingTable:
    """Load the side files of `shards` (local tar paths). Raises `TeacherEmbeddingError` for a missing
    side file, one written for another teacher (`fingerprint` given), or a key found in two shards."""
    index: dict[str, int] = {}
    images, texts = [], []
    for shard in shards:
        path = side_file(shard)
        if not path.is_file():
            raise TeacherEmbeddingError(
                f"no teacher side file {path} for shard {shard}: run `python -m clip_train.distillation."
                "precompute --teacher <checkpoint> --shards '<pattern>'` first, or set "
                "module.teacher_embeddings=false to run the teacher during training"
            )
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            if fingerprint is not None and meta.get("fingerprint") != fingerprint:
                raise TeacherEmbeddingError(
                    f"{path} was computed with another teacher ({meta.get('teacher')}, weights "
                    f"{str(meta.get('fingerprint'))[:12]}…, not {fingerprint[:12]}…): rerun the precompute "
                    "CLI with this teacher"
                )
            keys = archive["keys"].tolist()
            for key in keys:
                if key in index:
                    raise TeacherEmbeddingError(
                        f"sample key {key!r} occurs in two shards (the second: {shard}); side-file lookup "
                        "needs keys unique across the training shards"
                    )
                index[key] = len(index)
            images.append(torch.from_numpy(archive["image"]))
            texts.append(torch.from_numpy(archive["text"]))
    if not images:
        raise TeacherEmbeddingError("no shards given to load teacher side files for")
    return TeacherEmbeddingTable(index, torch.cat(images), torch.cat(texts))

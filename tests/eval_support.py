"""Evaluation test material: tiny models, a colour-reading CLIP whose answers are known, image folders and
labelled / captioned WebDataset shards written with PIL and tarfile.
"""

from __future__ import annotations

import functools
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from clip_train.checkpoints import clip_config_to_dict
from clip_train.data.transforms import CLIP_MEAN, CLIP_STD
from clip_train.models import CLIP, build_model
from clip_train.tokenizer import Tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
BAD_IMAGE = b"\xff\xd8 not a jpeg at all"


def tiny_model(seed: int = 0, name: str = "vit-tiny") -> CLIP:
    torch.manual_seed(seed)
    return build_model(name).eval()


def perturbed_model(seed: int = 0, name: str = "vit-tiny", **overrides: object) -> CLIP:
    """A model whose every tensor is distinct (fresh models have zero biases and unit LayerNorm gains, so a
    conversion that swapped two of those would go unnoticed)."""
    torch.manual_seed(seed)
    model = build_model(name, **overrides).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


def colour_image(colour: str, seed: int, size: int = 40) -> Image.Image:
    """A noisy image of one colour (±20 grey levels of noise)."""
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[colour], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=92) if fmt == "JPEG" else image.save(buf, format=fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------------- a known-answer CLIP


class MeanColourTower(nn.Module):
    """Image tower: the image's mean RGB (un-normalised, centred at grey) placed in the first 3 of D dims."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        rgb = (images * self.std + self.mean).mean(dim=(2, 3)) - 0.5  # (B, 3) in [-0.5, 0.5]
        return F.pad(rgb, (0, self.embed_dim - 3))  # (B, D)


class ColourWordTower(nn.Module):
    """Text tower: a bag of words in which only "red", "green", "blue" count, each along its RGB axis."""

    def __init__(self, embed_dim: int, tokenizer: Tokenizer) -> None:
        super().__init__()
        table = torch.zeros(tokenizer.vocab_size, embed_dim)
        for axis, word in enumerate(COLOURS):
            (token,) = tokenizer.encode(word)
            table[token, axis] = 1.0
        self.table = nn.Embedding.from_pretrained(table)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table(tokens).sum(dim=1)  # (B, D)


@functools.cache
def colour_model() -> CLIP:
    """A vit-tiny CLIP whose towers read colours: zero-shot on colour images must be 100 % right.
    (Built once; tests must not change it.)"""
    model = build_model("vit-tiny").eval()
    model.visual = MeanColourTower(model.config.embed_dim)
    model.text = ColourWordTower(model.config.embed_dim, shared_tokenizer())
    return model


@functools.cache
def shared_tokenizer() -> Tokenizer:
    return Tokenizer()


# --------------------------------------------------------------------------------------------- writers


def write_colour_folder(
    root: Path, per_class: int = 3, *, bad: Sequence[str] = (), seed_offset: int = 0
) -> Path:
    """ROOT/<colour>/<colour>_<i>.jpg (PNG for every third); `bad` file names get undecodable bytes.
    Folders written with different `seed_offset`s hold different noise."""
    for c, colour in enumerate(COLOURS):
        (root / colour).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fmt = "PNG" if i % 3 == 2 else "JPEG"
            name = f"{colour}_{i}.{'png' if fmt == 'PNG' else 'jpg'}"
            data = BAD_IMAGE if name in bad else encoded(colour_image(colour, 100 * c + i + seed_offset), fmt)
            (root / colour / name).write_bytes(data)
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_labelled_shards(
    root: Path, per_class: int = 3, *, shards: int = 2, label: str = "cls", bad_keys: Sequence[str] = ()
) -> str:
    """Colour images in `shards` tars, labelled via KEY.cls ("cls"), a JSON integer ("json") or a JSON class
    name ("json-name"). Returns the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    samples = [(colour, i) for i in range(per_class) for colour in COLOURS]
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tar:
            for n, (colour, _) in enumerate(samples[s::shards]):
                key = f"{s:04d}{n:05d}"
                index = list(COLOURS).index(colour)
                image = BAD_IMAGE if key in bad_keys else encoded(colour_image(colour, 1000 * s + n))
                _add(tar, f"{key}.jpg", image)
                if label == "cls":
                    _add(tar, f"{key}.cls", str(index).encode())
                else:
                    value: object = index if label == "json" else colour
                    _add(tar, f"{key}.json", json.dumps({"label": value, "key": key}).encode())
    return str(root / f"shard-{{000000..{shards - 1:06d}}}.tar")


def write_captioned_shards(root: Path, captions: Sequence[Sequence[str]], seed: int = 0) -> str:
    """One shard; image i (random noise) with captions[i] as the lines of KEY.txt."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for i, caps in enumerate(captions):
            pixels = rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)
            _add(tar, f"{i:06d}.png", encoded(Image.fromarray(pixels, "RGB"), "PNG"))
            _add(tar, f"{i:06d}.txt", "\n".join(caps).encode())
    return str(root / "shard-000000.tar")


def write_captioned_folder(root: Path, captions: Sequence[Sequence[str]], seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, caps in enumerate(captions):
        pixels = rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(root / f"img{i:03d}.png")
        (root / f"img{i:03d}.txt").write_text("\n".join(caps) + "\n")
    return root


def write_lightning_checkpoint(model: CLIP, path: Path, *, with_config: bool = True) -> Path:
    """A checkpoint shaped like our trainer's: the model under "model.", loss and optimiser state beside."""
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state["loss.dummy_buffer"] = torch.zeros(3)
    checkpoint: dict[str, object] = {
        "epoch": 1,
        "global_step": 42,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": state,
        "optimizer_states": [{"state": {0: {"step": torch.tensor(42.0)}}, "param_groups": [{"lr": 1e-3}]}],
        "lr_schedulers": [],
        "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 1}}}},
    }
    if with_config:
        checkpoint["clip_config"] = clip_config_to_dict(model.config)
    torch.save(checkpoint, path)
    return path

"""Embed images and texts with a CLIP model, in batches, into L2-normalised float32 features on the CPU.

Images are decoded and transformed (CLIP's evaluation transform: short-side resize, centre crop) in
DataLoader workers when `num_workers` > 0; each batch stays uint8 until it is assembled, then is
normalised once. An image that does not decode stops the run with a `DatasetError` naming it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from clip_train.data.transforms import ResizeCenterCrop, eval_transform, normalize_batch, stack_uint8
from clip_train.evaluation.datasets import ImageRef, load_image
from clip_train.models import CLIP
from clip_train.tokenizer import Tokenizer

TextTokenizer = Callable[[list[str]], Tensor]


class ImageRefDataset(Dataset):
    """`ImageRef`s → uint8 (size, size, 3) crops (normalised per batch by `collate_images`)."""

    def __init__(self, refs: Sequence[ImageRef], transform: ResizeCenterCrop) -> None:
        self.refs = list(refs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> Tensor:
        image = load_image(self.refs[index], self.transform.decode_size)
        return self.transform.crop(image)


def collate_images(crops: list[Tensor]) -> Tensor:
    """uint8 crops → normalised float32 (B, 3, H, W)."""
    return normalize_batch(stack_uint8(crops))


def tokenizer_for(model: CLIP) -> TextTokenizer:
    """CLIP's BPE tokenizer producing rows of the model's context length (built once per length)."""
    return _tokenizer(model.context_length)


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> Tokenizer:
    return Tokenizer(context_length=context_length)


def model_device(model: CLIP) -> torch.device:
    return next(model.parameters()).device


def _device(model: CLIP, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else model_device(model)


@torch.no_grad()
def embed_images(
    model: CLIP,
    refs: Sequence[ImageRef],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: str | None = None,
) -> Tensor:
    """(N, D) unit-norm float32 image features (on the CPU) of `refs`, in order.

    `progress`: a tqdm description to show a progress bar; None shows none."""
    device = _device(model, device)
    loader = DataLoader(
        ImageRefDataset(refs, eval_transform(model.image_size)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images,
    )
    parts = [torch.empty(0, model.config.embed_dim)]
    with tqdm(total=len(refs), desc=progress, unit="img", disable=progress is None) as bar:
        for images in loader:
            features = model.encode_image(images.to(device, non_blocking=True))  # (B, D)
            parts.append(F.normalize(features.float(), dim=-1).cpu())
            bar.update(images.shape[0])
    return torch.cat(parts)


@torch.no_grad()
def embed_texts(
    model: CLIP,
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: str | None = None,
) -> Tensor:
    """(M, D) unit-norm float32 text features (on the CPU) of `texts`, in order."""
    device = _device(model, device)
    texts = list(texts)
    parts = [torch.empty(0, model.config.embed_dim)]
    with tqdm(total=len(texts), desc=progress, unit="text", disable=progress is None) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            tokens = tokenizer(chunk)  # (B, L)
            features = model.encode_text(tokens.to(device))  # (B, D)
            parts.append(F.normalize(features.float(), dim=-1).cpu())
            bar.update(len(chunk))
    return torch.cat(parts)

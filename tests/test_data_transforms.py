"""Image decoding (JPEG draft mode) and the torchvision-free CLIP transforms."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from data_support import jpeg_bytes
from PIL import Image

from clip_train.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    RandomResizedCrop,
    decode_image,
    eval_transform,
    normalize_batch,
    train_transform,
)


def test_decode_image_uses_draft_mode_for_large_jpegs() -> None:
    data = jpeg_bytes(0, (1000, 800))
    full = decode_image(data)
    small = decode_image(data, target_size=224)
    assert full.size == (1000, 800) and full.mode == "RGB"
    # 1/2 would leave 400 px on the short side, 1/4 leaves 200 < 224: libjpeg decodes at 1/2.
    assert small.size == (500, 400) and small.mode == "RGB"
    assert decode_image(data, target_size=100).size == (125, 100)  # 1/8
    # Never below the target on the short side.
    assert min(decode_image(jpeg_bytes(1, (300, 257)), target_size=224).size) >= 224


def test_decode_image_converts_grayscale_and_png_to_rgb() -> None:
    gray = decode_image(jpeg_bytes(2, 64, mode="L"), target_size=32)
    assert gray.mode == "RGB"
    buf = io.BytesIO()
    Image.new("P", (20, 10)).save(buf, format="PNG")
    png = decode_image(buf.getvalue(), target_size=8)
    assert png.mode == "RGB" and png.size == (20, 10)


def test_decode_image_raises_on_garbage() -> None:
    with pytest.raises(OSError):
        decode_image(b"\xff\xd8 not an image", 64)
    with pytest.raises(OSError):
        decode_image(jpeg_bytes(3, 128)[:300], 64)  # truncated


def test_normalize_batch_matches_the_definition() -> None:
    pixels = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    expected = (
        pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    ) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    out = normalize_batch(pixels)
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normalize_batch(pixels[0]), expected[0], rtol=1e-5, atol=1e-5)


def test_eval_transform_is_resize_then_centre_crop() -> None:
    image = Image.open(io.BytesIO(jpeg_bytes(4, (300, 200)))).convert("RGB")
    out = eval_transform(224)(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    # Reference: torchvision's algorithm written out with two PIL calls.
    resized = image.resize((336, 224), Image.Resampling.BICUBIC)
    left = round((336 - 224) / 2)
    ref = np.asarray(resized.crop((left, 0, left + 224, 224)))
    ours = np.asarray(eval_transform(224).crop(image))
    # One fused resize(box=...) call vs resize-then-crop differ only by rounding at the crop border.
    assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 1.0


def test_train_transform_crops_reproducibly_within_scale() -> None:
    image = Image.open(io.BytesIO(jpeg_bytes(5, (256, 256)))).convert("RGB")
    t = train_transform(224)
    a, b = t(image, random.Random(7)), t(image, random.Random(7))
    assert a.shape == (3, 224, 224)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, t(image, random.Random(8)))
    crop = RandomResizedCrop(32, scale=(0.5, 1.0))
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = crop.box(100, 60, rng)
        area = (right - left) * (bottom - top)
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 60
        assert 0.45 * 6000 <= area <= 6000
    # The decode size keeps the smallest crop at full resolution: sqrt(0.9 * 3/4) of the side.
    assert train_transform(224).decode_size == 273

"""Safe decoding, filters, resize modes and re-encoding."""

from __future__ import annotations

import io

import pytest
from download_support import bomb_png, jpeg_image, png_rgba
from PIL import Image

from data_pipelines.download.images import ImageConfig, ImageRejected, process_image


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("center_crop", (32, 32)), ("longest", (32, 16)), ("border", (32, 32)), ("none", (200, 100))],
)
def test_resize_modes(mode: str, expected: tuple[int, int]) -> None:
    out = process_image(jpeg_image(1, 200, 100), ImageConfig(image_size=32, resize_mode=mode))
    assert (out.width, out.height) == expected == decoded(out.data).size
    assert (out.original_width, out.original_height) == (200, 100)


def test_border_pads_with_the_border_colour() -> None:
    out = process_image(jpeg_image(1, 200, 100), ImageConfig(image_size=32, resize_mode="border"))
    r, g, b = decoded(out.data).getpixel((16, 1))
    assert min(r, g, b) > 240  # top band is padding, not picture


def test_webp_and_transparency() -> None:
    out = process_image(png_rgba(0), ImageConfig(image_size=20, encode_format="webp", quality=80))
    image = decoded(out.data)
    assert image.format == "WEBP" and image.mode == "RGB"
    assert min(image.getpixel((10, 2))) > 230  # transparent rows became white


def test_output_is_deterministic() -> None:
    config = ImageConfig(image_size=24)
    assert (
        process_image(jpeg_image(3, 90, 70), config).data == process_image(jpeg_image(3, 90, 70), config).data
    )


@pytest.mark.parametrize(
    ("data", "config", "status"),
    [
        (jpeg_image(3, 200, 150)[:1500], ImageConfig(), "decode_error"),  # truncated
        (jpeg_image(4)[:20] + bytes(range(256)) * 8, ImageConfig(), "decode_error"),  # corrupt
        (b"GIF89a" + b"\x00" * 10, ImageConfig(), "decode_error"),
        (b"not an image at all", ImageConfig(), "decode_error"),
        (bomb_png(), ImageConfig(), "decompression_bomb"),
        (jpeg_image(1, 64, 48), ImageConfig(min_size=50), "too_small"),
        (jpeg_image(1, 300, 30), ImageConfig(max_aspect_ratio=3.0), "bad_aspect_ratio"),
    ],
)
def test_rejections(data: bytes, config: ImageConfig, status: str) -> None:
    with pytest.raises(ImageRejected) as info:
        process_image(data, config)
    assert info.value.status == status and info.value.reason


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="resize_mode"):
        ImageConfig(resize_mode="stretch")
    with pytest.raises(ValueError, match="encode_format"):
        ImageConfig(encode_format="png")


def test_max_pixels_rejects_before_decoding() -> None:
    # Far below PIL's own bomb limit, so only our explicit check (on the header's size) can reject it.
    with pytest.raises(ImageRejected) as info:
        process_image(jpeg_image(1, 64, 48), ImageConfig(max_pixels=64 * 48 - 1))
    assert info.value.status == "decompression_bomb"
    assert info.value.reason == f"64x48 > {64 * 48 - 1} pixels"
    assert process_image(jpeg_image(1, 64, 48), ImageConfig(image_size=16, max_pixels=64 * 48)).width == 16

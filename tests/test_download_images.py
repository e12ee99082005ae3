"""Safe decoding, filters, resize modes and re-encoding."""

from __future__ import annotations

import io
import math

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


@pytest.mark.parametrize("pil_format", ["PPM", "TGA", "PCX"])
def test_formats_pil_opens_but_we_do_not_decode_are_unsupported(pil_format: str) -> None:
    # PIL identifies these from their header; only the policy (DECODABLE_FORMATS) refuses them, and it
    # must do so with its own status rather than store them like the photos around them.
    buf = io.BytesIO()
    decoded(jpeg_image(5, 64, 48)).save(buf, format=pil_format)
    assert Image.open(io.BytesIO(buf.getvalue())).format == pil_format
    with pytest.raises(ImageRejected) as info:
        process_image(buf.getvalue(), ImageConfig(image_size=16))
    assert (info.value.status, info.value.reason) == ("unsupported_format", f"format {pil_format}")


@pytest.mark.parametrize(
    ("option", "value", "flag"),
    [
        ("resample", "nearest", None),  # a PIL filter, but not one of ours
        ("image_size", 0, "--image-size"),
        ("image_size", -32, "--image-size"),
        ("quality", 0, "--quality"),
        ("quality", 101, "--quality"),
        ("max_pixels", 0, "--max-pixels"),
        ("max_aspect_ratio", 0.5, "--max-aspect-ratio"),
        ("max_aspect_ratio", math.nan, "--max-aspect-ratio"),  # would switch the filter off silently
    ],
)
def test_each_bad_setting_is_refused_naming_its_option(option: str, value: object, flag: str | None) -> None:
    with pytest.raises(ValueError) as info:
        ImageConfig(**{option: value})
    message = str(info.value)
    # The option first (not a list of several that might be wrong), then the value that was given.
    assert message.startswith(f"{option} ") and message.endswith(f"got {value!r}"), message
    assert flag is None or f"({flag})" in message


def test_the_limits_of_each_setting_are_accepted() -> None:
    config = ImageConfig(image_size=1, quality=1, max_pixels=1, max_aspect_ratio=1.0, resample="lanczos")
    assert ImageConfig(quality=100).quality == 100 and config.max_aspect_ratio == 1.0


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

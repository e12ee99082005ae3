"""Safe image decoding, filtering, resizing and re-encoding (PIL only).

`process_image` is pure: bytes in, `ProcessedImage` out, or `ImageRejected` with a status and a reason.
It runs in worker threads; PIL releases the GIL while it decodes, resizes and encodes.

Order of checks, cheapest first: the header gives the size, so the decompression-bomb limit, the minimum
size and the aspect ratio are checked before a single pixel is decoded. Then `verify()` (structure and
checksums) and a full load (which raises on truncated data). JPEGs are decoded with DCT scaling
(`Image.draft`) straight to at least the target size, which is most of our speed on large photos.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image

DECODE_ERROR = "decode_error"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
UNSUPPORTED_FORMAT = "unsupported_format"
IMAGE_STATUSES = (DECODE_ERROR, DECOMPRESSION_BOMB, TOO_SMALL, BAD_ASPECT_RATIO, UNSUPPORTED_FORMAT)

RESIZE_MODES = ("longest", "center_crop", "border", "none")
# PIL scales every filter's support with the downscale factor, so all of these are antialiased. Bilinear
# (a triangle filter) is the default: at least as smooth as img2dataset's cv2 INTER_AREA (a box filter)
# and about a third cheaper than bicubic, which matters because resampling is a quarter of our CPU time.
RESAMPLE_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
ENCODE_FORMATS = {"jpg": "JPEG", "webp": "WEBP"}
DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF"})


class ImageRejected(Exception):
    """An image that is not kept; `status` is one of IMAGE_STATUSES."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ImageConfig:
    """What a stored image looks like. Sizes in pixels."""

    image_size: int = 256
    resize_mode: str = "center_crop"  # longest: longest side = image_size; border: that, padded square
    encode_format: str = "jpg"  # "jpg" or "webp"
    quality: int = 95
    min_size: int = 0  # both original sides must be at least this
    max_aspect_ratio: float = math.inf  # long side / short side of the original
    max_pixels: int = 89_478_485  # width * height; PIL's default bomb limit (about 0.25 GiB of RGB)
    border_color: tuple[int, int, int] = (255, 255, 255)
    resample: str = "bilinear"  # one of RESAMPLE_FILTERS

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(
                f"encode_format must be one of {sorted(ENCODE_FORMATS)}, got {self.encode_format!r}"
            )
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE_FILTERS)}, got {self.resample!r}")
        # One check per option, each naming the option, its flag and the value, so the error says which.
        if self.image_size < 1:
            raise ValueError(f"image_size (--image-size) must be at least 1, got {self.image_size!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality (--quality) must be in 1..100, got {self.quality!r}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels (--max-pixels) must be at least 1, got {self.max_pixels!r}")
        # Negated so that NaN fails too: `nan < 1` is false, and a NaN limit would silently turn the
        # aspect-ratio filter off (every `ratio > nan` is false as well).
        if not self.max_aspect_ratio >= 1:
            raise ValueError(
                f"max_aspect_ratio (--max-aspect-ratio) must be at least 1, got {self.max_aspect_ratio!r}"
            )


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes
    original_width: int
    original_height: int
    width: int
    height: int


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        # PIL warns (not raises) between 1x and 2x its own limit; our limit is checked explicitly below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _target_size(width: int, height: int, config: ImageConfig) -> tuple[int, int]:
    """Size to resize to before any crop or pad: the short side (center_crop) or long side fits."""
    size = config.image_size
    scale = size / min(width, height) if config.resize_mode == "center_crop" else size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def process_image(data: bytes, config: ImageConfig) -> ProcessedImage:
    """Decode, check, resize and re-encode one image. Raises ImageRejected."""
    try:
        image = _open(data)
        width, height = image.size
    except Image.DecompressionBombError as e:
        raise ImageRejected(DECOMPRESSION_BOMB, str(e)) from None
    except Exception as e:
        raise ImageRejected(DECODE_ERROR, f"cannot identify image: {type(e).__name__}: {e}") from None
    if image.format not in DECODABLE_FORMATS:
        raise ImageRejected(UNSUPPORTED_FORMAT, f"format {image.format}")
    if width * height > config.max_pixels:
        raise ImageRejected(DECOMPRESSION_BOMB, f"{width}x{height} > {config.max_pixels} pixels")
    if min(width, height) < max(1, config.min_size):
        raise ImageRejected(TOO_SMALL, f"{width}x{height} < min_size {config.min_size}")
    if max(width, height) / min(width, height) > config.max_aspect_ratio:
        raise ImageRejected(
            BAD_ASPECT_RATIO, f"{width}x{height} exceeds aspect ratio {config.max_aspect_ratio}"
        )
    try:
        image.verify()
        image = _open(data)
        target = _target_size(width, height, config)
        if image.format in ("JPEG", "MPO") and config.resize_mode != "none":
            image.draft("RGB", target)
        image.load()
        image = _to_rgb(image)
    except Image.DecompressionBombError as e:
        raise ImageRejected(DECOMPRESSION_BOMB, str(e)) from None
    except Exception as e:
        raise ImageRejected(DECODE_ERROR, f"{type(e).__name__}: {e}") from None
    image = _resize(image, target, config)
    out = io.BytesIO()
    if config.encode_format == "jpg":
        image.save(out, format="JPEG", quality=config.quality)
    else:
        image.save(out, format="WEBP", quality=config.quality)
    return ProcessedImage(out.getvalue(), width, height, image.width, image.height)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white rather than whatever colour hides under the alpha."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _resize(image: Image.Image, target: tuple[int, int], config: ImageConfig) -> Image.Image:
    if config.resize_mode == "none":
        return image
    resample = RESAMPLE_FILTERS[config.resample]
    size = config.image_size
    if config.resize_mode == "center_crop":
        # Resample only the centred square that is kept: no work on pixels the crop would throw away.
        side = min(image.width, image.height)
        left, top = (image.width - side) / 2, (image.height - side) / 2
        box = (left, top, left + side, top + side)
        return image.resize((size, size), resample, box=box, reducing_gap=3.0)
    if image.size != target:
        image = image.resize(target, resample, reducing_gap=3.0)
    if config.resize_mode == "border" and image.size != (size, size):
        canvas = Image.new("RGB", (size, size), config.border_color)
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
        image = canvas
    return image

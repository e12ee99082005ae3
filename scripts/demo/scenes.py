"""Procedural captioned scenes: the image source the embedded demo crawls and the held-out test images.

A scene is one kind of object — a (shape, colour) pair — drawn 1 to 3 times at some size and position on
a plain background, sometimes with a word written on it. Everything follows from integers: scene `i` of
stream `s` under seed `seed` is the same on every machine (`random.Random` seeded with a string is
stable across Python versions), so the HTTP server can render any image from its URL alone and a test can
check determinism.

The source is deliberately unbalanced: each shape and each colour has a weight, spread geometrically so
that the most frequent (shape, colour) pair is `SKEW` (50) times as frequent as the rarest. The crawler's
query balancing is what evens this out. A few (shape, colour) pairs (`HELD_OUT`) never occur in the
source at all; the evaluation asks the trained model about them.

Captions vary the way web alt-texts do: different sentence frames, counts and plurals, sizes, positions,
backgrounds, the written word, and some leave out the colour or the shape.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "arrow")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (240, 210, 30),
    "green": (40, 160, 60),
    "blue": (35, 85, 215),
    "purple": (125, 50, 175),
    "pink": (245, 125, 190),
    "brown": (115, 70, 35),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light grey": (200, 200, 200),
    "cream": (245, 235, 205),
    "dark grey": (65, 65, 65),
}
# Words written on some images (never a shape or colour name: the text is a distraction, not a label).
WORDS = (
    "sale",
    "open",
    "hello",
    "music",
    "coffee",
    "love",
    "stop",
    "welcome",
    "summer",
    "party",
    "moon",
    "zoo",
)
SIZES = ("small", "medium", "large")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
# (row, column) cell of a 3 × 3 grid → how a caption says where a single object is.
POSITIONS = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the centre",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}

# Each shape and colour has exactly one held-out partner: shape i never appears in colour (i + 3) mod 8.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    (shape, list(COLOURS)[(i + 3) % len(COLOURS)]) for i, shape in enumerate(SHAPES)
)
SKEW = 50.0  # frequency of the most common (shape, colour) pair over that of the rarest
# The frequency rank of each colour (0 = most common), so that the head is not simply the listing order.
_COLOUR_RANK = {"blue": 0, "red": 1, "green": 2, "yellow": 3, "purple": 4, "orange": 5, "pink": 6, "brown": 7}

CANVAS = 128  # pixels; the crawler re-encodes the images at the model's resolution
_RADIUS = {"small": (11, 16), "medium": (17, 25), "large": (26, 38)}  # pixels on the canvas


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


def shape_weights() -> dict[str, float]:
    """Relative frequency of each shape: geometric from 1 down to 1/sqrt(SKEW)."""
    step = math.sqrt(SKEW) ** (1 / (len(SHAPES) - 1))
    return {s: step**-i for i, s in enumerate(SHAPES)}


def colour_weights() -> dict[str, float]:
    step = math.sqrt(SKEW) ** (1 / (len(COLOURS) - 1))
    return {c: step ** -_COLOUR_RANK[c] for c in COLOURS}


def combo_weights(include_held_out: bool = False) -> dict[tuple[str, str], float]:
    """Relative frequency of each (shape, colour) pair in the source (held-out pairs: 0, left out)."""
    sw, cw = shape_weights(), colour_weights()
    return {
        (s, c): sw[s] * cw[c] for s in SHAPES for c in COLOURS if include_held_out or (s, c) not in HELD_OUT
    }


@dataclass(frozen=True)
class Item:
    """One drawn object: centre and radius in canvas pixels, rotation in degrees."""

    x: float
    y: float
    radius: float
    angle: float


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    count: int
    background: str
    items: tuple[Item, ...]
    cell: tuple[int, int] | None  # grid cell of a single object; None for 2-3 objects
    word: str | None
    tint: tuple[int, int, int]  # the object's RGB after a small random jitter
    noise_seed: int = field(default=0)

    @property
    def combo(self) -> tuple[str, str]:
        return self.shape, self.colour


def _rng(seed: int, stream: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{stream}/{index}")


def sample_scene(rng: random.Random, shape: str, colour: str) -> Scene:
    """A random scene of `shape` in `colour` (size, count, layout, background, written word)."""
    count = rng.choices((1, 2, 3), weights=(0.6, 0.25, 0.15))[0]
    size = rng.choice(SIZES[:2] if count > 1 else SIZES)
    background = rng.choice(list(BACKGROUNDS))
    word = rng.choice(WORDS) if rng.random() < 0.2 else None
    lo, hi = _RADIUS[size]
    items: list[Item] = []
    cell = None
    if count == 1:
        cell = (rng.randrange(3), rng.randrange(3))
        r = rng.uniform(lo, hi)
        # The centre lies in its third of the canvas and the object stays inside the canvas.
        cy, cx = ((c + rng.uniform(0.25, 0.75)) * CANVAS / 3 for c in cell)
        cx, cy = (min(max(v, r + 2), CANVAS - r - 2) for v in (cx, cy))
        items.append(Item(cx, cy, r, rng.uniform(0, 360)))
    else:
        for _ in range(200):  # rejection sampling of non-overlapping objects
            if len(items) == count:
                break
            r = rng.uniform(lo, hi)
            cx, cy = rng.uniform(r + 2, CANVAS - r - 2), rng.uniform(r + 2, CANVAS - r - 2)
            if all(math.hypot(cx - o.x, cy - o.y) > r + o.radius + 3 for o in items):
                items.append(Item(cx, cy, r, rng.uniform(0, 360)))
        count = len(items)
    base = COLOURS[colour]
    tint = tuple(min(255, max(0, v + rng.randint(-18, 18))) for v in base)
    return Scene(shape, colour, size, count, background, tuple(items), cell, word, tint, rng.randrange(2**31))


def source_scene(seed: int, index: int) -> Scene:
    """Scene `index` of the crawled source: (shape, colour) drawn by the skewed weights."""
    rng = _rng(seed, "source", index)
    weights = combo_weights()
    combo = rng.choices(list(weights), weights=list(weights.values()))[0]
    return sample_scene(rng, *combo)


def eval_scene(seed: int, index: int, combo: tuple[str, str]) -> Scene:
    """A held-out test scene of a given (shape, colour): its own random stream, never crawled."""
    return sample_scene(_rng(seed, f"eval/{combo[0]}/{combo[1]}", index), *combo)


# ------------------------------------------------------------------------------------------- captions
def caption(scene: Scene, rng: random.Random) -> str:
    """A varied caption of `scene`: about 15% name only the shape and 10% only the colour."""
    shape, colour, n = scene.shape, scene.colour, scene.count
    noun = shape if n == 1 else plural(shape)
    art = "an" if colour[0] in "aeiou" else "a"
    number = rng.choice(("a", "one")) if n == 1 else rng.choice((COUNT_WORDS[n], str(n)))
    size = f"{scene.size} " if scene.size != "medium" and rng.random() < 0.5 else ""
    where = f" {POSITIONS[scene.cell]}" if scene.cell and rng.random() < 0.5 else ""
    bg = f" on a {scene.background} background" if rng.random() < 0.3 else ""
    mode = rng.random()
    if mode < 0.15:  # the shape only
        frames = (
            "{number} {size}{noun}{where}",
            "a photo of {number} {noun}{bg}",
            "{noun} clip art",
            "a drawing of {number} {size}{noun}{where}",
            "simple {noun} icon{bg}",
        )
        text = rng.choice(frames).format(number=number, size=size, noun=noun, where=where, bg=bg)
    elif mode < 0.25:  # the colour only
        thing = "shape" if n == 1 else "shapes"
        frames = (
            "{number} {colour} {thing}{where}",
            "something {colour}{bg}",
            "a picture in {colour}",
            "{colour} {thing} on a {background} background",
            "a {size}{colour} object{where}",
        )
        text = rng.choice(frames).format(
            number=number if n > 1 else art,
            colour=colour,
            thing=thing,
            where=where,
            bg=bg,
            background=scene.background,
            size=size,
        )
    else:
        frames = (
            "{number} {size}{colour} {noun}{where}",
            "a photo of {number} {colour} {noun}{bg}",
            "{colour} {noun}{bg}",
            "an illustration of {number} {size}{colour} {noun}",
            "{number} {colour} {noun}{where}{bg}",
            "clip art: {colour} {noun}",
            "my drawing of {number} {colour} {noun}",
            "{Colour} {noun} icon",
        )
        text = rng.choice(frames).format(
            number=number, size=size, colour=colour, Colour=colour.capitalize(), noun=noun, where=where, bg=bg
        )
    if text.startswith("a ") and text[2] in "aeiou":
        text = "an " + text[2:]
    if scene.word is not None:
        text += rng.choice((' with the word "{w}"', ", labelled {w}", ' and the text "{w}"')).format(
            w=scene.word
        )
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


def source_caption(seed: int, index: int, scene: Scene) -> str:
    return caption(scene, _rng(seed, "caption", index))


# ------------------------------------------------------------------------------------------- drawing
def _rotate(points: list[tuple[float, float]], item: Item) -> list[tuple[float, float]]:
    a = math.radians(item.angle)
    ca, sa = math.cos(a), math.sin(a)
    r = item.radius
    return [(item.x + r * (px * ca - py * sa), item.y + r * (px * sa + py * ca)) for px, py in points]


def _outline(shape: str) -> list[tuple[float, float]]:
    """The shape's polygon in unit coordinates (radius 1, centred at 0)."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (math.radians(-90 + 120 * k) for k in range(3))]
    if shape == "star":
        return [
            ((1.0 if k % 2 == 0 else 0.42) * math.cos(a), (1.0 if k % 2 == 0 else 0.42) * math.sin(a))
            for k, a in ((k, math.radians(-90 + 36 * k)) for k in range(10))
        ]
    if shape == "cross":
        w = 0.32
        return [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    if shape == "arrow":
        return [(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22), (-1, 0.22)]
    if shape == "heart":
        points = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((x / 17, -(y + 2.5) / 17))
        return points
    raise ValueError(f"no outline for {shape!r}")


def render(scene: Scene, size: int = CANVAS) -> Image.Image:
    """The scene as an RGB image of size × size pixels."""
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for item in scene.items:
        r = item.radius
        if scene.shape == "circle":
            draw.ellipse((item.x - r, item.y - r, item.x + r, item.y + r), fill=scene.tint)
        elif scene.shape == "ring":
            draw.ellipse(
                (item.x - r, item.y - r, item.x + r, item.y + r),
                outline=scene.tint,
                width=max(3, round(0.32 * r)),
            )
        else:
            draw.polygon(_rotate(_outline(scene.shape), item), fill=scene.tint)
    if scene.word is not None:
        rng = random.Random(scene.noise_seed)
        font = ImageFont.load_default(size=rng.randint(15, 22))
        ink = (20, 20, 20) if sum(BACKGROUNDS[scene.background]) > 384 else (240, 240, 240)
        left, top, right, bottom = draw.textbbox((0, 0), scene.word, font=font)
        x = rng.uniform(2, max(2, CANVAS - (right - left) - 2))
        y = rng.choice((2.0, CANVAS - (bottom - top) - 6.0))
        draw.text((x, y), scene.word, fill=ink, font=font)
    # A little sensor-like noise (seeded: the same scene gives the same pixels) so that flat colours are
    # not identical across images.
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, 4.0, (CANVAS, CANVAS, 3))
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    return image if size == CANVAS else image.resize((size, size), Image.Resampling.LANCZOS)


def encode(image: Image.Image, fmt: str) -> bytes:
    """Image bytes in `fmt` ("jpg", "png" or "webp")."""
    out = io.BytesIO()
    if fmt == "jpg":
        image.save(out, "JPEG", quality=90)
    elif fmt == "png":
        image.save(out, "PNG", optimize=False, compress_level=1)
    elif fmt == "webp":
        image.save(out, "WEBP", quality=90)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return out.getvalue()


# ------------------------------------------------------------------------------------- the web source
# How a source row goes wrong, with its share of rows. Every fault is one the crawler must survive.
FAULTS: dict[str, float] = {
    "missing": 0.010,  # HTTP 404
    "truncated": 0.005,  # a JPEG cut short
    "html": 0.004,  # an HTML page where an image should be
    "private": 0.003,  # under a path robots.txt disallows
    "not_image": 0.003,  # image/jpeg content type, bytes that are not an image
    "server_error": 0.002,  # HTTP 500, every time
}
FORMATS = (("jpg", 0.7), ("png", 0.2), ("webp", 0.1))


@dataclass(frozen=True)
class SourceRow:
    index: int
    path: str  # URL path on the demo server, e.g. /img/000123.jpg
    text: str
    scene: Scene
    fault: str | None


def source_row(seed: int, index: int) -> SourceRow:
    """Row `index` of the source table: its scene, caption, URL path and fault (if any)."""
    scene = source_scene(seed, index)
    rng = _rng(seed, "row", index)
    fmt = rng.choices([f for f, _ in FORMATS], weights=[w for _, w in FORMATS])[0]
    u, fault, acc = rng.random(), None, 0.0
    for name, share in FAULTS.items():
        acc += share
        if u < acc:
            fault = name
            break
    folder = {"private": "private", None: "img"}.get(fault, "img")
    return SourceRow(index, f"/{folder}/{index:06d}.{fmt}", source_caption(seed, index, scene), scene, fault)


def source_rows(seed: int, n: int) -> Iterator[SourceRow]:
    for i in range(n):
        yield source_row(seed, i)


def body_for(row: SourceRow) -> tuple[int, str, bytes]:
    """(HTTP status, content type, body) the demo server answers for a row's path."""
    fmt = row.path.rsplit(".", 1)[1]
    mime = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}[fmt]
    if row.fault == "missing":
        return 404, "text/plain", b"not found\n"
    if row.fault == "server_error":
        return 500, "text/plain", b"internal error\n"
    if row.fault == "html":
        return 200, "text/html; charset=utf-8", b"<!doctype html><title>gallery</title><p>moved</p>"
    if row.fault == "not_image":
        return 200, "image/jpeg", b"this is not an image, just some text " * 10
    data = encode(render(row.scene), "jpg" if row.fault == "truncated" else fmt)
    if row.fault == "truncated":
        return 200, "image/jpeg", data[: len(data) // 3]
    return 200, mime, data


if __name__ == "__main__":
    raise SystemExit(
        f"{__file__} is a module of scripts/demo/run_demo.py; run that instead (--help for its options)"
    )

"""Deterministic, real, cheap images that show their request.

Clients must be able to decode, size-check and fingerprint what they get, tests must be able to tell "same
parameters" from "different seed" by the bytes alone, and a person looking at a generated dataset must be
able to tell which request made which picture. So every image is a small colour pattern derived from a
SHA-256 of its parameters, scaled up with NEAREST (no resampling cost), with the prompt's words and the seed
written on it in Pillow's built-in bitmap font (scaled up by whole pixels, so it stays sharp and legible at
1024 px without any font file), and encoded with fast settings. Encoded bytes are cached because benchmarks
ask for the same 1024x1024 image thousands of times.
"""

from __future__ import annotations

import functools
import hashlib
import io
import textwrap
import threading
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from imagegen_gateway.config import DETAILS

MAX_SEED = 2**31 - 1
#: Side of the pattern drawn before upscaling; small enough to build in pure Python in microseconds.
PATTERN_CELLS = 32

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def seed_from_prompt(prompt: str) -> int:
    """The seed used when a request names none: stable across runs, different for different prompts."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big") & MAX_SEED


@dataclass(frozen=True)
class RenderSpec:
    """Everything that makes an image different. Equal specs give byte-identical images."""

    prompt: str
    seed: int
    model: str
    width: int
    height: int
    output_format: str = "png"
    quality: str | None = None
    style: str | None = None
    negative_prompt: str | None = None
    background: str | None = None
    compression: int | None = None
    #: Position of the image within a request's ``n``: the images of one request differ.
    index: int = 0
    #: Fingerprint of the images an edit or variation started from.
    source: str | None = None

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.output_format]

    @property
    def transparent(self) -> bool:
        return self.background == "transparent" and self.output_format in ("png", "webp")

    def digest(self) -> bytes:
        """SHA-256 of the parameters that choose the picture (size and encoding only change its rendition)."""
        key = "\x1f".join(
            str(part)
            for part in (
                self.prompt, self.seed, self.model, self.quality, self.style, self.negative_prompt, self.index,
                self.source,
            )
        )
        return hashlib.sha256(key.encode("utf-8")).digest()


def _pattern(spec: RenderSpec) -> Image.Image:
    """A PATTERN_CELLS² image: a diagonal gradient between two colours, with per-cell jitter."""
    digest = spec.digest()
    noise = hashlib.shake_256(digest).digest(PATTERN_CELLS * PATTERN_CELLS)
    start, end = digest[0:3], digest[3:6]
    cells = PATTERN_CELLS
    span = 2 * (cells - 1)
    mode = "RGBA" if spec.transparent else "RGB"
    pixels = bytearray()
    for y in range(cells):
        for x in range(cells):
            t = (x + y) / span
            jitter = noise[y * cells + x] - 128
            for channel in range(3):
                value = start[channel] + (end[channel] - start[channel]) * t + jitter * 0.35
                pixels.append(min(255, max(0, int(value))))
            if mode == "RGBA":
                # A transparent frame around an opaque picture, so the alpha channel is really used.
                border = x in (0, cells - 1) or y in (0, cells - 1)
                pixels.append(0 if border else 255)
    return Image.frombytes(mode, (cells, cells), bytes(pixels))




def _texture(spec: RenderSpec, size: tuple[int, int]) -> Image.Image:
    """Deterministic smooth noise at full size: random cells a quarter of the size, scaled up bilinearly."""
    cells = (max(1, size[0] // 4), max(1, size[1] // 4))
    noise = hashlib.shake_256(spec.digest() + b"texture").digest(cells[0] * cells[1] * 3)
    return Image.frombytes("RGB", cells, noise).resize(size, Image.Resampling.BILINEAR)


#: Width in pixels of one character of Pillow's bitmap font, and the height of one line of it.
_CHAR_WIDTH, _LINE_HEIGHT = 6, 11
#: Roughly 200 image pixels per font pixel: 5x at 1024 px, 2x at 512 px, 1x at 256 px.
_PIXELS_PER_FONT_SCALE = 200
_MAX_PROMPT_LINES = 8


@functools.cache
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()


def _latin1(text: str) -> str:
    """The bitmap font covers Latin-1; anything else is drawn as ``?``."""
    return text.encode("latin-1", "replace").decode("latin-1")


def caption_lines(spec: RenderSpec, chars_per_line: int) -> list[str]:
    """The prompt's words wrapped to ``chars_per_line`` (at most :data:`_MAX_PROMPT_LINES` lines, the last one
    marked ``...`` when cut), then the seed."""
    words = _latin1(" ".join(spec.prompt.split()) or "(no prompt)")
    lines = textwrap.wrap(words, chars_per_line, break_long_words=True) or [""]
    if len(lines) > _MAX_PROMPT_LINES:
        lines = [*lines[: _MAX_PROMPT_LINES - 1], lines[_MAX_PROMPT_LINES - 1][: chars_per_line - 3] + "..."]
    return [*lines, f"seed {spec.seed}"]


def _draw_caption(image: Image.Image, spec: RenderSpec) -> None:
    """Write the caption in white on a darkened box in the upper left, scaled to the image's size."""
    scale = max(1, min(image.width, image.height) // _PIXELS_PER_FONT_SCALE)
    chars_per_line = max(4, (image.width * 9 // 10) // (_CHAR_WIDTH * scale))
    lines = caption_lines(spec, chars_per_line)
    width = max(len(line) for line in lines) * _CHAR_WIDTH + 4
    height = len(lines) * _LINE_HEIGHT + 4
    # Drawn at the font's own size, then scaled up by whole pixels with NEAREST: sharp, and cheap.
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for row, line in enumerate(lines):
        draw.text((2, 2 + row * _LINE_HEIGHT), line, fill=255, font=_font())
    mask = mask.resize((width * scale, height * scale), Image.Resampling.NEAREST)
    # The margin (1/20 of a side) is wider than the transparent frame of a transparent image (1/32 of a side):
    # the caption never touches it, whatever the prompt.
    margin_x, margin_y = max(1, image.width // 20), max(1, image.height // 20)
    box = (margin_x, margin_y, min(image.width - margin_x, margin_x + mask.width),
           min(image.height - margin_y, margin_y + mask.height))
    if box[2] <= box[0] or box[3] <= box[1]:
        return
    region = image.crop(box)
    shade = Image.new(region.mode, region.size, (0, 0, 0, 255) if region.mode == "RGBA" else (0, 0, 0))
    image.paste(Image.blend(region, shade, 0.6), box)
    ink = (255, 255, 255, 255) if image.mode == "RGBA" else (255, 255, 255)
    image.paste(ink, box, mask.crop((0, 0, box[2] - box[0], box[3] - box[1])))


def render(spec: RenderSpec, detail: str = "flat") -> bytes:
    """Encode the image of ``spec`` (no caching; see :class:`Renderer`)."""
    if spec.output_format not in _PIL_FORMATS:
        raise ValueError(f"unsupported output_format {spec.output_format!r}")
    image = _pattern(spec).resize((spec.width, spec.height), Image.Resampling.NEAREST)
    if detail == "photo":
        textured = Image.blend(image.convert("RGB"), _texture(spec, image.size), 0.5)
        if image.mode == "RGBA":
            textured.putalpha(image.getchannel("A"))
        image = textured
    _draw_caption(image, spec)
    buffer = io.BytesIO()
    if spec.output_format == "png":
        # Level 1: an order of magnitude faster than the default and still a valid, smallish PNG.
        image.save(buffer, "PNG", compress_level=1)
    elif spec.output_format == "jpeg":
        quality = spec.compression if spec.compression is not None else 90
        image.convert("RGB").save(buffer, "JPEG", quality=max(1, min(95, quality)))
    else:
        quality = spec.compression if spec.compression is not None else 90
        # method=0 is libwebp's fastest setting.
        image.save(buffer, "WEBP", quality=quality, method=0)
    return buffer.getvalue()


class Renderer:
    """:func:`render` behind a thread-safe LRU cache (rendering runs in worker threads)."""

    def __init__(self, cache_size: int = 256, detail: str = "flat") -> None:
        if detail not in DETAILS:
            raise ValueError(f"detail must be one of {', '.join(DETAILS)}")
        self._cache_size = cache_size
        self._detail = detail
        self._cache: OrderedDict[RenderSpec, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def cached(self, spec: RenderSpec) -> bytes | None:
        """The cached bytes of ``spec``, if any: lets callers skip a thread hop for a cache hit."""
        with self._lock:
            data = self._cache.get(spec)
            if data is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
            return data

    def __call__(self, spec: RenderSpec) -> bytes:
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
                return cached
            self.misses += 1
        # Encoding happens outside the lock: two threads may render the same spec once each, which is
        # harmless (same bytes) and better than serialising all rendering.
        data = render(spec, self._detail)
        if self._cache_size:
            with self._lock:
                self._cache[spec] = data
                self._cache.move_to_end(spec)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return data

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

"""Verify image bytes by decoding them completely with Pillow: format, width, height, sha256.

Opening an image only reads its header: a truncated PNG, JPEG or WebP opens fine and would be stored as good.
Every image is therefore decoded to the last pixel (``load()``), after a ceiling on the pixel count that the
header announces (a decompression bomb is refused before it is decoded). Pillow is imported on first use: the
Airflow hook imports this package at DAG-parse time, where it has no use for an image library.
"""

from __future__ import annotations

import hashlib
import io

from imagegen_provider.wire.errors import MalformedResponseError
from imagegen_provider.wire.result import ImageInfo

#: The most pixels an image may announce: 64 MP is over six times the largest documented size (3840x2160 is
#: 8.3 MP) and decodes to at most 256 MB in RGBA.
MAX_IMAGE_PIXELS = 64_000_000

#: The chunk every PNG ends with. Pillow stops reading after the last pixel row: a PNG cut inside its final
#: chunk decodes completely, but is still a truncated file (and what else was lost is anyone's guess).
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"

#: The marker every JPEG ends with (EOI). libjpeg decodes a file cut just before it without complaint.
_JPEG_END = b"\xff\xd9"

#: The formats a request's ``output_format`` names, as Pillow spells them.
_PILLOW_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}


def inspect_image(
    data: bytes,
    *,
    request_id: str | None = None,
    expected_format: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> ImageInfo:
    """Decode ``data`` completely and fingerprint it.

    :param expected_format: the request's ``output_format`` (``png``, ``jpeg``, ``webp``): another format is a
        malformed response.
    :param max_pixels: refuse images announcing more pixels than this, before decoding them.
    :raises MalformedResponseError: not an image, truncated or corrupt, too many pixels, or the wrong format.
    """
    # Imported here so that importing the hook (which reaches this module) does not load Pillow.
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise MalformedResponseError("empty image", request_id=request_id)

    # DecompressionBombError is a plain Exception, SyntaxError is how some plugins say "corrupt".
    failures = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)
    try:
        image = Image.open(io.BytesIO(data))
    except failures as exc:
        raise MalformedResponseError(f"not an image ({type(exc).__name__})", request_id=request_id) from None
    with image:
        fmt = (image.format or "").lower()
        width, height = image.size
        if width * height > max_pixels:
            raise MalformedResponseError(
                f"image announces {width}x{height} pixels, over the {max_pixels}-pixel ceiling", request_id=request_id
            )
        try:
            # Pillow would otherwise fill a truncated image with grey and call it done; never here.
            image.load()
        except failures as exc:
            raise MalformedResponseError(
                f"truncated or corrupt image ({type(exc).__name__})", request_id=request_id
            ) from None
    if not fmt or width <= 0 or height <= 0:
        raise MalformedResponseError("image header without format or size", request_id=request_id)
    _check_complete_file(fmt, data, request_id)
    expected = _PILLOW_FORMATS.get((expected_format or "").lower())
    if expected is not None and fmt != expected:
        raise MalformedResponseError(f"asked for {expected_format}, got {fmt}", request_id=request_id)
    return ImageInfo(
        format=fmt,
        width=width,
        height=height,
        sha256=hashlib.sha256(data).hexdigest(),
        num_bytes=len(data),
    )


def _check_complete_file(fmt: str, data: bytes, request_id: str | None) -> None:
    """The file ends where its format says it ends: a decoder may accept a file cut inside its trailer."""
    if fmt == "png" and not data.endswith(_PNG_END):
        raise MalformedResponseError("truncated PNG (no IEND chunk at the end)", request_id=request_id)
    if fmt == "jpeg" and not data.rstrip(b"\x00").endswith(_JPEG_END):
        raise MalformedResponseError("truncated JPEG (no end-of-image marker)", request_id=request_id)
    # A RIFF file states its own length: the 4 bytes after "RIFF" count everything after them.
    if fmt == "webp" and int.from_bytes(data[4:8], "little") + 8 != len(data):
        raise MalformedResponseError("truncated WebP (RIFF length does not match)", request_id=request_id)

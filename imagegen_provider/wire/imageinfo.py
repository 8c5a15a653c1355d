"""Verify image bytes by decoding their header with Pillow: format, width, height, sha256."""

from __future__ import annotations

import hashlib
import io

from imagegen_provider.wire.errors import MalformedResponseError
from imagegen_provider.wire.result import ImageInfo


def inspect_image(data: bytes, *, request_id: str | None = None) -> ImageInfo:
    """Decode the header of ``data`` (no full decode: Pillow opens lazily) and fingerprint it.

    :raises MalformedResponseError: the bytes are not an image Pillow recognises.
    """
    # Imported here so that importing the hook (which reaches this module) does not load Pillow.
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise MalformedResponseError("empty image", request_id=request_id)
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = (image.format or "").lower()
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        # DecompressionBombError is a plain Exception: a header claiming absurd dimensions is malformed too.
        raise MalformedResponseError(f"not an image ({type(exc).__name__})", request_id=request_id) from None
    if not fmt or width <= 0 or height <= 0:
        raise MalformedResponseError("image header without format or size", request_id=request_id)
    return ImageInfo(
        format=fmt,
        width=width,
        height=height,
        sha256=hashlib.sha256(data).hexdigest(),
        num_bytes=len(data),
    )

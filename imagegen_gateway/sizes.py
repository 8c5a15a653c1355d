"""Image sizes as gateways spell them: ``WIDTHxHEIGHT``, tiers such as ``2K``, aspect ratios such as ``16:9``.

The gateway's own reading, independent of the client's (``imagegen_provider.wire``): when the two disagree
about a request, the tests that run both on the same cases show it instead of a shared bug hiding it.
"""

from __future__ import annotations

import re
from fractions import Fraction

_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
_TIER = re.compile(r"([1-9])K", re.IGNORECASE)
_RATIO = re.compile(r"([1-9]\d{0,2}):([1-9]\d{0,2})")
#: Providers round generated sizes to multiples of this many pixels.
_GRID = 16


def read_dimensions(text: str | None) -> tuple[int, int] | None:
    """``"1536x1024"`` → ``(1536, 1024)``; anything else (including zero sides) → ``None``."""
    match = _SIZE.fullmatch(text or "")
    if match is None:
        return None
    width, height = int(match.group(1)), int(match.group(2))
    return (width, height) if width and height else None


def read_tier(text: str | None) -> int | None:
    """``"2K"`` → ``2``; anything else → ``None``."""
    match = _TIER.fullmatch(text or "")
    return int(match.group(1)) if match else None


def read_ratio(text: str | None) -> Fraction | None:
    """``"16:9"`` → ``Fraction(16, 9)``; anything else → ``None``."""
    match = _RATIO.fullmatch(text or "")
    return Fraction(int(match.group(1)), int(match.group(2))) if match else None


def drawn_pixels(size: str | None, aspect_ratio: str | None = None, resolution: str | None = None) -> tuple[int, int]:
    """The pixels to draw: an explicit ``WIDTHxHEIGHT``, else a tier (1K = 1024 px on the long edge, default 1K)
    shaped by the aspect ratio (default square), rounded to the providers' 16-pixel grid."""
    explicit = read_dimensions(size)
    if explicit is not None:
        return explicit
    long_edge = 1024 * (read_tier(size) or read_tier(resolution) or 1)
    ratio = read_ratio(aspect_ratio) or Fraction(1)
    width, height = (long_edge, long_edge / ratio) if ratio >= 1 else (long_edge * ratio, long_edge)
    return max(_GRID, round(width / _GRID) * _GRID), max(_GRID, round(height / _GRID) * _GRID)

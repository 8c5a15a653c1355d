"""Parsing of image sizes: ``WIDTHxHEIGHT``, tiers such as ``2K`` and aspect ratios such as ``16:9``."""

from __future__ import annotations

import re
from fractions import Fraction

_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")
_TIER = re.compile(r"^([1-9])K$", re.IGNORECASE)  # "0K" is no tier
_RATIO = re.compile(r"^(\d{1,3}):(\d{1,3})$")


def parse_size(size: str | None) -> tuple[int, int] | None:
    """``"1536x1024"`` → ``(1536, 1024)``; anything else → ``None``."""
    match = _SIZE.match(size or "")
    if not match:
        return None
    width, height = int(match.group(1)), int(match.group(2))
    return (width, height) if width > 0 and height > 0 else None


def parse_tier(size: str | None) -> int | None:
    """``"2K"`` → ``2``; anything else → ``None``."""
    match = _TIER.match(size or "")
    return int(match.group(1)) if match else None


def parse_ratio(ratio: str | None) -> Fraction | None:
    match = _RATIO.match(ratio or "")
    if not match or int(match.group(2)) == 0 or int(match.group(1)) == 0:
        return None
    return Fraction(int(match.group(1)), int(match.group(2)))


def pixel_size(size: str | None, aspect_ratio: str | None = None, resolution: str | None = None) -> tuple[int, int]:
    """Concrete pixels for a request, the way the router normalises tiers and ratios (1K ≈ 1024 on the long
    edge). Used by the bundled gateway and for cost estimates; defaults to 1024x1024."""
    explicit = parse_size(size)
    if explicit:
        return explicit
    tier = parse_tier(size) or parse_tier(resolution) or 1
    long_edge = 1024 * tier
    ratio = parse_ratio(aspect_ratio) or Fraction(1, 1)
    width, height = (Fraction(long_edge), long_edge / ratio) if ratio >= 1 else (long_edge * ratio, Fraction(long_edge))
    # Round to multiples of 16 like the providers do.
    return max(16, round(width / 16) * 16), max(16, round(height / 16) * 16)

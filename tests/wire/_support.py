"""Shared helpers for the wire tests: the per-seed JSON fixtures and real tiny images made with Pillow."""

from __future__ import annotations

import base64
import io
import json
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image

FIXTURES_DIR = Path(__file__).parent / "fixtures"
SEED_FIXTURES = (
    "000_indoxhub.json",
    "001_modelmax.json",
    "002_ai_gateway.json",
    "003_openai.json",
    "004_router.json",
)


@cache
def load_fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES_DIR / name).read_text(encoding="utf-8"))


def fixture_cases(section: str) -> list[tuple[str, dict[str, Any]]]:
    """``(fixture file, case)`` for every case of ``section`` ("requests", "responses", ...) of every seed."""
    return [(name, case) for name in SEED_FIXTURES for case in load_fixture(name).get(section, [])]


def case_ids(cases: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [f"{name.split('_', 1)[0]}-{case['name']}" for name, case in cases]


def image_bytes(fmt: str, size: tuple[int, int] = (2, 3), color: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    """A real, decodable image of ``fmt`` ("PNG", "JPEG", "WEBP", "GIF")."""
    buffer = io.BytesIO()
    mode = "RGBA" if fmt == "PNG" else "RGB"
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")

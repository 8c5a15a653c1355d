from __future__ import annotations

import pytest

from ._support import image_bytes


@pytest.fixture(scope="session")
def png() -> bytes:
    return image_bytes("PNG", (2, 3))


@pytest.fixture(scope="session")
def jpeg() -> bytes:
    return image_bytes("JPEG", (4, 2))


@pytest.fixture(scope="session")
def webp() -> bytes:
    return image_bytes("WEBP", (3, 1))

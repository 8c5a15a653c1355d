"""inspect_image: real image bytes → format, size, fingerprint; anything else → MalformedResponseError."""

from __future__ import annotations

import hashlib
import struct
import zlib

import pytest

from imagegen_provider.wire import ImageInfo, MalformedResponseError, inspect_image

from ._support import image_bytes


@pytest.mark.parametrize(
    ("fmt", "size", "expected_format", "extension"),
    [
        ("PNG", (2, 3), "png", "png"),
        ("PNG", (1, 1), "png", "png"),
        ("JPEG", (17, 9), "jpeg", "jpg"),
        ("WEBP", (5, 8), "webp", "webp"),
        ("GIF", (4, 4), "gif", "gif"),
    ],
)
def test_real_images(fmt, size, expected_format, extension):
    data = image_bytes(fmt, size)
    info = inspect_image(data)
    assert info == ImageInfo(format=expected_format, width=size[0], height=size[1],
                             sha256=hashlib.sha256(data).hexdigest(), num_bytes=len(data))
    assert info.extension == extension


def test_fixture_images(png, jpeg, webp):
    assert (inspect_image(png).width, inspect_image(png).height) == (2, 3)
    assert inspect_image(jpeg).format == "jpeg"
    assert inspect_image(webp).format == "webp"


def test_sha256_tells_images_apart():
    red, blue = image_bytes("PNG", (2, 2), (255, 0, 0)), image_bytes("PNG", (2, 2), (0, 0, 255))
    assert inspect_image(red).sha256 != inspect_image(blue).sha256
    assert inspect_image(red).sha256 == inspect_image(bytes(red)).sha256


def test_only_the_header_is_needed():
    # A body cut after the header still identifies (no full decode); the download verifier relies on sizes only.
    data = image_bytes("PNG", (64, 48))
    info = inspect_image(data[:-12])
    assert (info.format, info.width, info.height) == ("png", 64, 48)
    assert info.num_bytes == len(data) - 12


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("garbage", b"this is definitely not an image, just text"),
        ("html", b"<html><body>403 Forbidden</body></html>"),
        ("json", b'{"error": {"message": "expired"}}'),
        ("random-bytes", bytes(range(256)) * 4),
        ("png-signature-only", b"\x89PNG\r\n\x1a\n"),
        ("png-truncated-ihdr", image_bytes("PNG", (2, 3))[:16]),
        ("png-truncated-ihdr-2", image_bytes("PNG", (2, 3))[:20]),
        ("jpeg-soi-only", image_bytes("JPEG", (4, 2))[:4]),
        ("jpeg-truncated-header", image_bytes("JPEG", (4, 2))[:100]),
        ("webp-riff-only", image_bytes("WEBP", (3, 1))[:12]),
        ("webp-truncated-header", image_bytes("WEBP", (3, 1))[:20]),
        ("png-bad-crc", png_header(2, 3)[:-1] + b"\x00"),
        ("png-decompression-bomb", png_header(20000, 20000)),
    ],
)
def test_not_an_image(name, data):
    with pytest.raises(MalformedResponseError) as caught:
        inspect_image(data, request_id="req_img")
    assert caught.value.reason.startswith("not an image (")
    assert caught.value.request_id == "req_img"
    assert "request_id=req_img" in str(caught.value)


def test_empty_bytes():
    with pytest.raises(MalformedResponseError) as caught:
        inspect_image(b"")
    assert caught.value.reason == "empty image"
    assert caught.value.retryable is True

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


def test_a_valid_header_is_not_enough():
    # A body cut after the header (here: its last chunk) used to pass; the image is now decoded to the end.
    data = image_bytes("PNG", (64, 48))
    assert inspect_image(data).num_bytes == len(data)
    with pytest.raises(MalformedResponseError, match="truncated"):
        inspect_image(data[:-12])


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


# --- full verification ----------------------------------------------------------------------------------


def _noisy(fmt: str, side: int = 64) -> bytes:
    import io
    import os

    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_images_are_never_accepted(fmt):
    data = _noisy(fmt)
    assert inspect_image(data).format == fmt.lower()
    cuts = sorted({len(data) // 4, len(data) // 2, len(data) * 9 // 10, len(data) - 12, len(data) - 2,
                   len(data) - 1})
    for cut in cuts:
        with pytest.raises(MalformedResponseError):
            inspect_image(data[:cut])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_corrupt_pixel_data_is_not_accepted(fmt):
    data = bytearray(_noisy(fmt))
    middle = len(data) // 2
    data[middle:middle + 64] = b"\x00" * 64
    try:
        info = inspect_image(bytes(data))
    except MalformedResponseError:
        return
    # JPEG and WebP have no checksum over pixels: a zeroed run may still decode. It must then decode fully.
    assert fmt != "PNG", info


@pytest.mark.parametrize(
    ("fmt", "asked", "ok"),
    [("PNG", "png", True), ("JPEG", "jpeg", True), ("WEBP", "webp", True), ("PNG", "jpeg", False),
     ("JPEG", "webp", False), ("WEBP", "png", False), ("GIF", "png", False), ("PNG", None, True)],
)
def test_format_must_match_what_was_asked(fmt, asked, ok):
    data = image_bytes(fmt, (3, 3))
    if ok:
        assert inspect_image(data, expected_format=asked).format == fmt.lower()
    else:
        with pytest.raises(MalformedResponseError, match="asked for"):
            inspect_image(data, expected_format=asked)


def test_pixel_ceiling_is_checked_before_decoding():
    data = image_bytes("PNG", (100, 100))
    assert inspect_image(data, max_pixels=10_000).width == 100
    with pytest.raises(MalformedResponseError, match="ceiling"):
        inspect_image(data, max_pixels=9_999)
    # A header announcing 9000x9000 (81 MP, under Pillow's own bomb limit) is refused without decoding.
    with pytest.raises(MalformedResponseError, match="ceiling"):
        idat = zlib.compress(b"\x00" * 100)
        inspect_image(png_header(9000, 9000) + struct.pack(">I", len(idat)) + b"IDAT" + idat
                      + struct.pack(">I", zlib.crc32(b"IDAT" + idat)))


def test_transport_and_wire_do_not_import_pillow():
    import subprocess
    import sys

    code = (
        "import sys, imagegen_provider.wire, imagegen_provider.transport, imagegen_provider.transport.settings;"
        "assert 'PIL' not in sys.modules, sorted(m for m in sys.modules if m.startswith('PIL'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""Every body is capped on its decoded bytes as they arrive: a 300 MB JSON body, a gzip bomb (1 MB → 1 GB) and an
endless event stream each end as one failed attempt, and the client process never holds more than a few times
the cap. The client runs in a child process so that its peak RSS is its own."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from imagegen_provider.transport.body import ResponseTooLargeError, read_capped

from ._scripted import Reply, b64, openai_image_body, png_bytes

GEN = "/v1/images/generations"
MB = 1 << 20
PEAK_RSS_LIMIT_MB = 600


@functools.cache
def gzip_bomb() -> bytes:
    """About 1 MB of gzip that inflates to 1 GiB (of a JSON prefix and zeros)."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    parts = [deflater.compress(b'{"created": 1, "data": [{"b64_json": "')]
    zeros = b"A" * (16 * MB)
    parts += [deflater.compress(zeros) for _ in range(64)]
    parts.append(deflater.flush())
    return b"".join(parts)


async def huge_json() -> AsyncIterator[bytes]:
    """A 300 MB b64_json body, made as it is sent."""
    yield b'{"created": 1, "data": [{"b64_json": "'
    chunk = b"QUFB" * (MB // 4)
    for _ in range(300):
        yield chunk
    yield b'"}]}'


async def endless_events() -> AsyncIterator[bytes]:
    """Partial-image events without end, as far as the client can tell: the server gives up after 1 GiB (once
    the client has hung up, so that the session's shared server does not keep a core busy)."""
    import anyio.lowlevel

    partial = json.dumps({"type": "image_generation.partial_image", "b64_json": b64(png_bytes(64, 64)) * 400})
    event = f"event: image_generation.partial_image\ndata: {partial}\n\n".encode()
    for _ in range((1 << 30) // len(event)):
        yield event
        await anyio.lowlevel.checkpoint()


def run_client(base_url: str, kind: str = "plain") -> dict:
    script = Path(__file__).with_name("_memory_client.py")
    done = subprocess.run([sys.executable, str(script), base_url, kind], capture_output=True, text=True,
                          timeout=120, env={**os.environ})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_capped(outcome: dict, label: str) -> None:
    print(f"\n{label}: {outcome['error']} after {outcome['elapsed_s']:.2f} s, peak RSS {outcome['peak_rss_mb']:.0f} MB")
    assert outcome["error"] in ("ResponseTooLargeError", "ImageDownloadError"), outcome
    assert "cap" in outcome["message"] and outcome["attempts"] == 1
    assert outcome["peak_rss_mb"] < PEAK_RSS_LIMIT_MB, outcome


def test_300_mb_json_body(scripted):
    scripted.on(GEN, Reply(200, stream=huge_json, media_type="application/json"))
    _assert_capped(run_client(scripted.base_url + "/v1"), "300 MB b64_json body")


def test_gzip_bomb(scripted):
    bomb = gzip_bomb()
    assert len(bomb) < 2 * MB
    scripted.on(GEN, Reply(200, body=bomb, headers={"content-encoding": "gzip"}, media_type="application/json"))
    _assert_capped(run_client(scripted.base_url + "/v1"), "gzip bomb (1 MB -> 1 GiB)")


def test_gzip_bomb_as_an_image_download(scripted):
    scripted.on(GEN, lambda app, seen: Reply(200, json=openai_image_body(url=f"{app.base_url}/bomb.png")))
    scripted.on("/bomb.png", Reply(200, body=gzip_bomb(), headers={"content-encoding": "gzip"},
                                   media_type="image/png"))
    outcome = run_client(scripted.base_url + "/v1", "url")
    _assert_capped(outcome, "gzip bomb as an image download")
    assert outcome["paid"] == 1


def test_endless_event_stream(scripted):
    scripted.on(GEN, Reply(200, stream=endless_events, media_type="text/event-stream"))
    _assert_capped(run_client(scripted.base_url + "/v1", "stream"), "endless SSE stream")


# --- the reader itself, in process --------------------------------------------------------------------------


def _response(body: bytes, encoding: str | None = None, chunk: int = 4096) -> httpx.Response:
    pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)]

    class Stream(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

    headers = {"content-encoding": encoding} if encoding else {}
    return httpx.Response(200, headers=headers, stream=Stream())


@pytest.mark.parametrize("encoding", [None, "gzip", "deflate", "raw-deflate"])
async def test_read_capped_decodes_and_counts_decoded_bytes(encoding):
    body = b"0123456789" * 10_000
    if encoding == "gzip":
        wire = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    elif encoding == "raw-deflate":
        wire = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    else:
        wire = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS)
    sent = body if encoding is None else wire.compress(body) + wire.flush()
    header = "deflate" if encoding == "raw-deflate" else encoding
    assert await read_capped(_response(sent, header), max_bytes=len(body)) == body
    with pytest.raises(ResponseTooLargeError):
        # The compressed size is far under the cap; the decoded size is what counts.
        await read_capped(_response(sent, header), max_bytes=len(body) - 1)


async def test_declared_length_over_the_cap_is_refused_before_reading():
    response = httpx.Response(200, headers={"content-length": str(10 * MB)}, content=b"")
    with pytest.raises(ResponseTooLargeError, match="declares"):
        await read_capped(response, max_bytes=MB)

"""Response bodies read under a byte cap counted on the decoded bytes, as they stream in.

httpx decodes ``Content-Encoding`` itself, but its decoders have no output limit: one 1 MiB chunk of a gzip bomb
becomes a gigabyte in a single call. Bodies are therefore read raw and decoded here, by zlib with
``max_length``, one bounded piece at a time, and the read stops as soon as the cap is passed. Only the
encodings we can bound (gzip, deflate) are asked for; any other is refused, never buffered.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Iterator

import httpx

from imagegen_provider.wire.errors import MalformedResponseError

#: Decoded bytes produced per zlib call: the most one step of a bomb can allocate.
_PIECE = 1 << 20

#: What we ask for (and so what we can decode with a bound).
ACCEPT_ENCODING = "gzip, deflate"


class ResponseTooLargeError(MalformedResponseError):
    """A body (JSON, event stream or image download) went past ``max_response_bytes`` once decoded."""


class _Identity:
    def feed(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data

    def flush(self) -> Iterator[bytes]:
        return iter(())


class _Zlib:
    """gzip or deflate, at most ``_PIECE`` decoded bytes per step."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        # deflate is zlib-wrapped by the spec, raw in practice for some servers: like httpx, try both.
        self._raw_fallback = encoding == "deflate"
        wbits = zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS
        self._inflater = zlib.decompressobj(wbits)

    def feed(self, data: bytes) -> Iterator[bytes]:
        pending = data
        while pending:
            try:
                piece = self._inflater.decompress(pending, _PIECE)
            except zlib.error:
                if not self._raw_fallback:
                    raise MalformedResponseError(f"body is not valid {self._encoding}") from None
                self._raw_fallback = False
                self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                continue
            self._raw_fallback = False
            pending = self._inflater.unconsumed_tail
            if piece:
                yield piece

    def flush(self) -> Iterator[bytes]:
        tail = self._inflater.flush(_PIECE)
        if tail:
            yield tail


def _decoder(content_encoding: str | None) -> _Identity | _Zlib:
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return _Identity()
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
        return _Zlib("deflate" if codings[0] == "deflate" else "gzip")
    # Not asked for, and not decodable with a bound (brotli's ratio is unbounded too): refused, not buffered.
    raise MalformedResponseError(f"unsupported Content-Encoding {content_encoding!r}")


async def iter_capped(response: httpx.Response, *, max_bytes: int, what: str = "response body") -> AsyncIterator[bytes]:
    """The decoded body of ``response``, piece by piece; raises as soon as more than ``max_bytes`` arrived.

    :param what: names the body in the error ("image download from https://cdn/x.png").
    :raises ResponseTooLargeError: over the cap (declared or counted).
    :raises MalformedResponseError: an encoding we did not ask for, or a corrupt one.
    """
    decoder = _decoder(response.headers.get("content-encoding"))
    declared = response.headers.get("content-length", "")
    if isinstance(decoder, _Identity) and declared.isdigit() and int(declared) > max_bytes:
        raise ResponseTooLargeError(f"{what} declares {declared} bytes, over the {max_bytes}-byte cap")
    received = 0
    async for raw in response.aiter_raw():
        for piece in decoder.feed(raw):
            received += len(piece)
            if received > max_bytes:
                raise ResponseTooLargeError(f"{what} exceeds the {max_bytes}-byte cap")
            yield piece
    for piece in decoder.flush():
        received += len(piece)
        if received > max_bytes:
            raise ResponseTooLargeError(f"{what} exceeds the {max_bytes}-byte cap")
        yield piece


async def read_capped(response: httpx.Response, *, max_bytes: int, what: str = "response body") -> bytes:
    """The whole decoded body, or :class:`ResponseTooLargeError` without reading past the cap."""
    return b"".join([piece async for piece in iter_capped(response, max_bytes=max_bytes, what=what)])


class _CappedStream(httpx.AsyncByteStream):
    def __init__(self, response: httpx.Response, max_bytes: int, what: str) -> None:
        self._response = response
        self._max_bytes = max_bytes
        self._what = what

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for piece in iter_capped(self._response, max_bytes=self._max_bytes, what=self._what):
            yield piece

    async def aclose(self) -> None:
        await self._response.aclose()


def capped_view(response: httpx.Response, *, max_bytes: int, what: str = "event stream") -> httpx.Response:
    """A response whose stream is ``response``'s decoded body under the cap (and which says it is decoded),
    for readers that take an ``httpx.Response``, such as httpx-sse's ``EventSource``."""
    headers = httpx.Headers(response.headers)
    for name in ("content-encoding", "content-length"):
        headers.pop(name, None)
    return httpx.Response(
        response.status_code,
        headers=headers,
        stream=_CappedStream(response, max_bytes, what),
        request=response.request,
    )

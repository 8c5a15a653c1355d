"""Fetch images that gateways return as URLs.

The URLs point at a CDN, not at the gateway: the downloader has its own httpx client that carries no
Authorization header (the API key must never reach the image host), accepts only http(s), caps the size,
and retries 5xx. Gateway URLs expire (OpenAI's after 60 minutes), so a 403/404 is reported as expired.
"""

from __future__ import annotations

import functools
import ssl
from urllib.parse import urlsplit

import httpx

from imagegen_provider.transport.retry import RetryPolicy
from imagegen_provider.wire.errors import ImageDownloadError, ImageExpiredError, ServerError

DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024


@functools.lru_cache(maxsize=1)
def default_ssl_context() -> ssl.SSLContext:
    """One verifying TLS context shared by every client: building one loads the CA bundle, which costs
    about 0.1 s, and every :class:`ImageGenClient` holds two httpx clients (mapped tasks build many)."""
    return httpx.create_ssl_context()


def _display(url: str) -> str:
    """URL without its query string: signed CDN URLs carry credentials in the query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class ImageDownloader:
    """Downloads generated images.

    :param max_bytes: refuse images larger than this (checked on Content-Length and while streaming).
    :param transport: httpx transport, e.g. ``httpx.ASGITransport`` for the in-process gateway.
    """

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        timeout: httpx.Timeout | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.retry = retry or RetryPolicy(max_attempts=4, backoff_initial=0.25, backoff_max=5.0)
        # No auth and no default headers: this client only ever talks to image hosts.
        self._client = httpx.AsyncClient(
            timeout=timeout or httpx.Timeout(60.0, connect=10.0),
            follow_redirects=True,
            transport=transport,
            verify=default_ssl_context() if transport is None else True,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> bytes:
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageDownloadError(f"refusing to download image from a {scheme or 'relative'}: URL")
        try:
            async for attempt in self.retry.retrying():
                with attempt:
                    return await self._fetch_once(url)
        except httpx.TransportError as exc:
            # Refused, reset, timed out, or redirected to a scheme httpx will not follow. httpx's own message
            # quotes the full URL, query string (a signed URL's credentials) included: not ours.
            raise ImageDownloadError(f"cannot download image from {_display(url)}: {type(exc).__name__}") from None
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _fetch_once(self, url: str) -> bytes:
        async with self._client.stream("GET", url) as response:
            if response.status_code in (403, 404, 410):
                raise ImageExpiredError(
                    f"image URL {_display(url)} answered {response.status_code}: it has expired or never existed",
                    status=response.status_code,
                )
            if response.status_code >= 500:
                raise ServerError("image host error", status=response.status_code)
            if response.status_code != 200:
                raise ImageDownloadError(
                    f"image URL {_display(url)} answered {response.status_code}", status=response.status_code
                )
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise ImageDownloadError(
                    f"image at {_display(url)} is {declared} bytes, over the {self.max_bytes}-byte cap"
                )
            chunks: list[bytes] = []
            received = 0
            async for chunk in response.aiter_bytes():
                received += len(chunk)
                if received > self.max_bytes:
                    raise ImageDownloadError(f"image at {_display(url)} exceeds the {self.max_bytes}-byte cap")
                chunks.append(chunk)
            return b"".join(chunks)

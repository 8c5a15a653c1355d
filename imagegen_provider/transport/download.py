"""Fetch images that gateways return as URLs.

The URLs point at a CDN, not at the gateway: the downloader has its own httpx client that carries no
Authorization header (the API key must never reach the image host), accepts only http(s), connects only to
addresses the :class:`~imagegen_provider.transport.addresses.AddressPolicy` accepts (checked on the resolved
address, again on every redirect), caps the decoded size, and retries 5xx. Gateway URLs expire (OpenAI's after
60 minutes), so a 403/404 is reported as expired.
"""

from __future__ import annotations

import functools
import ssl
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx

from imagegen_provider.transport.addresses import AddressPolicy, GuardedBackend
from imagegen_provider.transport.body import ACCEPT_ENCODING, ResponseTooLargeError, read_capped
from imagegen_provider.transport.retry import RetryPolicy
from imagegen_provider.wire.errors import ImageDownloadError, ImageExpiredError, ImageGenError, ServerError

DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: Old name of the cap (it now covers every body, not only downloads).
DEFAULT_MAX_IMAGE_BYTES = DEFAULT_MAX_RESPONSE_BYTES
#: Redirects followed per download (each one re-checked).
MAX_REDIRECTS = 5


@functools.lru_cache(maxsize=1)
def default_ssl_context() -> ssl.SSLContext:
    """One verifying TLS context shared by every client: building one loads the CA bundle, which costs
    about 0.1 s, and every :class:`ImageGenClient` holds two httpx clients (mapped tasks build many)."""
    return httpx.create_ssl_context()


def without_credentials(url: str) -> str:
    """``url`` without ``user:pass@``: what may be recorded (metadata, logs) of a URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(malformed URL)"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def display_url(url: str) -> str:
    """URL without credentials and without its query string (signed CDN URLs carry credentials there), for
    error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(malformed URL)"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def guarded_transport(policy: AddressPolicy) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections go only where ``policy`` allows.

    httpx takes no network backend, so its connection pool is replaced by an identical one built on the guarded
    backend (httpx's transport only maps exceptions and responses around the pool).
    """
    context = default_ssl_context()
    transport = httpx.AsyncHTTPTransport(verify=context, trust_env=False)
    transport._pool = httpcore.AsyncConnectionPool(ssl_context=context, network_backend=GuardedBackend(policy))
    return transport


class ImageDownloader:
    """Downloads generated images.

    :param max_bytes: refuse images larger than this (declared, or counted on the decoded bytes as they arrive).
    :param transport: httpx transport, e.g. ``httpx.ASGITransport`` for the in-process gateway (then no address
        check: nothing goes on the network).
    :param policy: which addresses may be fetched from (default: public ones only).
    """

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        timeout: httpx.Timeout | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        policy: AddressPolicy | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.retry = retry or RetryPolicy(max_attempts=4, backoff_initial=0.25, backoff_max=5.0)
        self.policy = policy or AddressPolicy()
        # No auth and no default headers: this client only ever talks to image hosts. No proxies from the
        # environment either: a proxy would connect for us, past the address check.
        self._client = httpx.AsyncClient(
            timeout=timeout or httpx.Timeout(60.0, connect=10.0),
            follow_redirects=False,
            transport=transport or guarded_transport(self.policy),
            headers={"Accept-Encoding": ACCEPT_ENCODING},
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> bytes:
        _check_scheme(url)
        try:
            async for attempt in self.retry.retrying():
                with attempt:
                    return await self._follow(url)
        except httpx.TransportError as exc:
            # Refused, reset, timed out. httpx's own message quotes the full URL, query string (a signed URL's
            # credentials) included: not ours.
            raise ImageDownloadError(f"cannot download image from {display_url(url)}: {type(exc).__name__}") from None
        except ImageGenError:
            raise
        except Exception as exc:
            # A bad port, an invalid URL, a corrupt encoding: the image is lost, the run goes on.
            raise ImageDownloadError(f"cannot download image from {display_url(url)}: {type(exc).__name__}") from None
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _follow(self, url: str) -> bytes:
        """Redirects by hand: each hop's scheme checked, and its address checked when it connects."""
        for _ in range(MAX_REDIRECTS + 1):
            location = await self._fetch_once(url)
            if isinstance(location, bytes):
                return location
            url = location
            _check_scheme(url)
        raise ImageDownloadError(f"image URL {display_url(url)}: more than {MAX_REDIRECTS} redirects")

    async def _fetch_once(self, url: str) -> bytes | str:
        """The image, or the URL a redirect points at."""
        async with self._client.stream("GET", url) as response:
            if response.is_redirect and response.headers.get("location"):
                return str(response.url.join(response.headers["location"]))
            _check_status(url, response.status_code)
            try:
                return await read_capped(response, max_bytes=self.max_bytes, what=f"image at {display_url(url)}")
            except ResponseTooLargeError as exc:
                raise ImageDownloadError(str(exc)) from None


def _check_scheme(url: str) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageDownloadError(f"refusing to download image from a {scheme or 'relative'}: URL")


def _check_status(url: str, status: int) -> None:
    if status in (403, 404, 410):
        raise ImageExpiredError(
            f"image URL {display_url(url)} answered {status}: it has expired or never existed", status=status
        )
    if status >= 500:
        raise ServerError("image host error", status=status)
    if status != 200:
        raise ImageDownloadError(f"image URL {display_url(url)} answered {status}", status=status)

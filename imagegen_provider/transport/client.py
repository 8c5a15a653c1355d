"""The async client: one gateway, one dialect, pooled connections, retries, rate limit, verified images."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream
from httpx_sse import aconnect_sse

from imagegen_provider import __version__
from imagegen_provider.transport.download import DEFAULT_MAX_IMAGE_BYTES, ImageDownloader, default_ssl_context
from imagegen_provider.transport.ratelimit import RateLimiter, RateLimits
from imagegen_provider.transport.retry import RetryPolicy, parse_retry_after
from imagegen_provider.wire.dialects import Dialect, get_dialect
from imagegen_provider.wire.errors import (
    GatewayConnectionError,
    ImageGenError,
    RateLimitError,
    error_from_response,
    redact,
)
from imagegen_provider.wire.imageinfo import inspect_image
from imagegen_provider.wire.normalize import normalize_response, normalize_stream
from imagegen_provider.wire.request import ImageRequest
from imagegen_provider.wire.result import GeneratedImage, GenerationResult, ImageInfo

log = logging.getLogger(__name__)


def _scrub(error: ImageGenError, secrets: list[str | None]) -> None:
    """Redact ``secrets`` from an error's message and text attributes, in place."""
    error.args = tuple(redact(arg, secrets) if isinstance(arg, str) else arg for arg in error.args)
    for attribute in ("body_excerpt", "reason"):
        value = getattr(error, attribute, None)
        if isinstance(value, str):
            setattr(error, attribute, redact(value, secrets))


@dataclass(frozen=True)
class Timeouts:
    """Connect fails fast; read waits long, because image generation can take over two minutes."""

    connect: float = 10.0
    read: float = 300.0
    write: float = 30.0
    pool: float | None = None

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)


@dataclass(frozen=True)
class VerifiedImage:
    """An image whose bytes we hold and whose header decoded."""

    data: bytes = field(repr=False)
    info: ImageInfo
    revised_prompt: str | None = None
    #: The URL it was downloaded from, when the gateway returned a URL.
    source_url: str | None = None


@dataclass(frozen=True)
class Generation:
    """The outcome of one successful ``generate`` call."""

    images: list[VerifiedImage]
    result: GenerationResult
    attempts: int
    #: Time of the successful HTTP exchange (request sent → body read), in milliseconds.
    latency_ms: float
    #: Time spent waiting on the rate limiter, across attempts.
    queued_ms: float
    #: Request fields the dialect could not carry.
    dropped_fields: tuple[str, ...] = ()


class _LargeChunkStream(AiohttpResponseStream):
    # Image responses are megabytes of base64: read them in 1 MiB pieces, not 16 KiB ones (each piece costs
    # a trip through aiohttp's and httpx's stream layers: ~2 ms per 2 MB image).
    CHUNK_SIZE = 1 << 20


class _Transport(AiohttpTransport):
    """httpx over aiohttp's connection pool, reading bodies in large pieces."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if isinstance(response.stream, AiohttpResponseStream):
            response.stream = _LargeChunkStream(response.stream._aiohttp_response)
        return response


@contextmanager
def quiet_request_logs() -> Iterator[None]:
    """httpx logs one INFO line per request: in a batch of thousands they drown the progress lines. Raise
    its level for the duration of a run, and put it back after (the caller's process may want them)."""
    logger = logging.getLogger("httpx")
    previous = logger.level
    logger.setLevel(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(previous)


def describe_transport_error(exc: httpx.TransportError) -> str:
    """What went wrong on the wire, in words and exception class names only: the exceptions' own messages
    can quote the request. Under the aiohttp transport the httpx class is a mapping (a refused connection
    arrives as ``ConnectTimeout``); the aiohttp cause says what really happened."""
    cause = exc.__cause__
    names = {type(exc).__name__, type(cause).__name__ if cause is not None else ""}
    if names & {"ConnectError", "ClientConnectorError"}:
        kind = "could not connect"
    elif names & {"ServerDisconnectedError", "RemoteProtocolError", "ReadError", "ClientPayloadError",
                  "ClientOSError", "WriteError"}:
        kind = "connection dropped"
    elif isinstance(exc, httpx.TimeoutException):
        kind = "timed out"
    else:
        kind = "transport error"
    detail = type(cause).__name__ if cause is not None else type(exc).__name__
    return f"{kind} ({detail})"


class ImageGenClient:
    """Async client for ``POST {base_url}/images/generations`` in one dialect.

    :param base_url: includes the version prefix, as in the OpenAI SDK (``https://api.openai.com/v1``).
    :param api_key: sent as ``Authorization: Bearer``; never logged, never in errors.
    :param dialect: ``openai``, ``indoxhub`` or ``router``.
    :param accepts_seed: whether the gateway takes ``seed`` (default: the dialect's documented behaviour).
    :param limiter: share one limiter between clients of the same gateway; built from ``limits`` otherwise.
    :param transport: httpx transport, e.g. ``httpx.ASGITransport`` for the in-process gateway.
    :param keep_partial_images: keep the partial images of streamed responses.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        dialect: str | Dialect = "openai",
        accepts_seed: bool | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        limits: RateLimits | None = None,
        limiter: RateLimiter | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        download_transport: httpx.AsyncBaseTransport | None = None,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        keep_partial_images: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.dialect = get_dialect(dialect)
        self.accepts_seed = accepts_seed
        self.retry = retry or RetryPolicy()
        self.limiter = limiter or RateLimiter(limits or RateLimits())
        self.keep_partial_images = keep_partial_images
        self._api_key = api_key
        timeouts = timeouts or Timeouts()
        pool = max(4, self.limiter.limits.max_in_flight)
        headers = {"User-Agent": f"airflow-provider-imagegen/{__version__}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        if transport is None:
            # httpx's own pool (httpcore) re-checks every pooled connection on each request and response:
            # with 16+ requests in flight that was half of the client's CPU per image (3.7 ms → 2.1 ms with
            # aiohttp's pool, measured with bench's overhead case). The httpx API stays; only the pool changes.
            transport = _Transport(verify=default_ssl_context(), limits=limits)
        self._http = httpx.AsyncClient(
            timeout=timeouts.to_httpx(),
            limits=limits,
            headers=headers,
            transport=transport,
        )
        self._downloader = ImageDownloader(max_bytes=max_image_bytes, transport=download_transport)

    @property
    def api_key_for_redaction(self) -> str | None:
        """The key, so that callers can scrub it from their own messages. Never log it."""
        return self._api_key

    @property
    def endpoint(self) -> str:
        return self.base_url + self.dialect.path

    async def __aenter__(self) -> ImageGenClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._downloader.aclose()
        await self.limiter.aclose()

    def _secrets(self, request: ImageRequest | None = None) -> list[str | None]:
        secrets = [self._api_key]
        if request is not None and request.byok_api_key is not None:
            secrets.append(request.byok_api_key.get_secret_value())
        return secrets

    # -- public API ----------------------------------------------------------------------------

    async def generate(self, request: ImageRequest) -> Generation:
        """Generate the images of ``request``, retrying what is worth retrying.

        :raises ImageGenError: the final error; its ``attempts`` says how many requests were sent.
        """
        wire = self.dialect.build_body(request, accepts_seed=self.accepts_seed)
        attempts = 0
        queued = 0.0
        try:
            async for attempt in self.retry.retrying():
                with attempt:
                    attempts += 1
                    waiting = time.monotonic()
                    # The in-flight slot first, the rate budget second: a request that queued for a slot
                    # must still see a 429 pause (or a limit learned from the headers) that began while it
                    # waited, or every queued request is sent into the wall once.
                    async with self.limiter.in_flight():
                        await self.limiter.acquire(images=request.n)
                        queued += time.monotonic() - waiting
                        result, latency = await self._send(request, wire.json)
                    # Inline images are checked inside the retry: a corrupt one is lost either way, and
                    # asking again is the quickest way to get it.
                    inline = [
                        inspect_image(image.data, request_id=result.request_id) if image.data is not None else None
                        for image in result.images
                    ]
        except ImageGenError as exc:
            exc.attempts = attempts
            raise
        try:
            images = [await self._verified(image, info, result) for image, info in zip(result.images, inline)]
        except ImageGenError as exc:
            exc.attempts = attempts
            exc.paid_result = result
            raise
        return Generation(
            images=images,
            result=result,
            attempts=attempts,
            latency_ms=latency * 1000.0,
            queued_ms=queued * 1000.0,
            dropped_fields=wire.dropped,
        )

    async def list_models(self) -> list[str]:
        """``GET {base_url}/models``: the cheapest call that proves the URL and the key work."""
        try:
            response = await self._http.get(self.base_url + "/models")
        except httpx.TransportError as exc:
            raise GatewayConnectionError(f"cannot reach {self.base_url}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise error_from_response(response.status_code, response.content, secrets=self._secrets())
        payload = response.json()
        data = payload.get("data") if isinstance(payload, dict) else None
        return [str(m.get("id")) for m in data or [] if isinstance(m, dict)]

    # -- one attempt ---------------------------------------------------------------------------

    async def _send(self, request: ImageRequest, body: dict[str, Any]) -> tuple[GenerationResult, float]:
        """One HTTP exchange; the caller holds an in-flight slot and a rate-limit admission."""
        secrets = self._secrets(request)
        started = time.monotonic()
        try:
            if request.stream:
                result = await self._send_streaming(body, secrets)
            else:
                # The body goes into a local, not ``response.content``: an httpx Response and its stream
                # refer to each other, so a body stored on the response lives until the cyclic GC runs.
                # With 2-3 MB bodies that held hundreds of MB between collections (see bench overhead).
                async with self._http.stream("POST", self.endpoint, json=body) as response:
                    content = b"".join([chunk async for chunk in response.aiter_bytes()])
                await self._check(response, content, secrets)
                result = normalize_response(content, headers=response.headers, secrets=secrets)
        except httpx.TransportError as exc:
            # Timeouts, resets, dropped connections. The message is the exception class only: httpx
            # messages can quote the request.
            error = GatewayConnectionError(f"{describe_transport_error(exc)} talking to {self.endpoint}")
            log.warning("Attempt failed: %s", error)
            raise error from None
        except ImageGenError as exc:
            # Whatever built the error (a stream's error event has no idea of our key), it leaves scrubbed.
            _scrub(exc, secrets)
            # 429s are expected under a limit and handled by the limiter: one line each would drown the log.
            log.log(logging.DEBUG if isinstance(exc, RateLimitError) else logging.WARNING, "Attempt failed: %s", exc)
            raise
        return result, time.monotonic() - started

    async def _check(self, response: httpx.Response, content: bytes, secrets: list[str | None]) -> None:
        self.limiter.observe_headers(response.headers)
        if response.status_code == 200:
            return
        error = error_from_response(
            response.status_code,
            content,
            request_id=response.headers.get("x-request-id"),
            retry_after=parse_retry_after(response.headers),
            secrets=secrets,
        )
        if isinstance(error, RateLimitError):
            # Pause every waiting request now, instead of letting each of them hit the wall in turn. The
            # pause is capped like the retry wait: a gateway announcing hours must not stall the batch.
            pause = error.retry_after
            if pause is not None:
                pause = min(pause, self.retry.max_retry_after)
            await self.limiter.on_rate_limited(pause)
        raise error

    async def _send_streaming(self, body: dict[str, Any], secrets: list[str | None]) -> GenerationResult:
        async with aconnect_sse(self._http, "POST", self.endpoint, json=body) as source:
            response = source.response
            error_body = await response.aread() if response.status_code != 200 else b""
            await self._check(response, error_body, secrets)
            if "text/event-stream" not in response.headers.get("content-type", ""):
                # Providers without native streaming ignore the flag and answer with a buffered body.
                await response.aread()
                return normalize_response(response.content, headers=response.headers, secrets=secrets)
            events = [(sse.event, sse.data) async for sse in source.aiter_sse()]
        return normalize_stream(events, headers=response.headers, keep_partials=self.keep_partial_images)

    async def _verified(self, image: GeneratedImage, info: ImageInfo | None, result: GenerationResult) -> VerifiedImage:
        data = image.data
        if data is None:
            # Downloads happen outside the generation retry: the image is paid for, regenerating would pay
            # again; the downloader retries the image host itself.
            data = await self._downloader.fetch(image.url or "")
            info = inspect_image(data, request_id=result.request_id)
        assert info is not None
        return VerifiedImage(data=data, info=info, revised_prompt=image.revised_prompt, source_url=image.url)

"""The async client: one gateway, one dialect, pooled connections, retries, rate limit, verified images.

Every call to :meth:`ImageGenClient.generate` ends in a :class:`Generation` or a :class:`GenerationFailed`
carrying an :class:`~imagegen_provider.wire.errors.ImageGenError`, the attempts made and every response paid for:
nothing else escapes it, and nothing in it waits without a bound (a deadline per attempt, capped Retry-After,
capped bodies, and a circuit breaker for a gateway that refuses everything).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream
from httpx_sse import EventSource

from imagegen_provider import __version__
from imagegen_provider.transport.addresses import AddressPolicy
from imagegen_provider.transport.body import ACCEPT_ENCODING, capped_view, read_capped
from imagegen_provider.transport.breaker import CircuitBreaker
from imagegen_provider.transport.download import (
    DEFAULT_MAX_RESPONSE_BYTES,
    ImageDownloader,
    default_ssl_context,
    without_credentials,
)
from imagegen_provider.transport.pacing import refused_limit, reset_hint
from imagegen_provider.transport.ratelimit import SENT_AT, SENT_IMAGES, RateLimiter, RateLimits
from imagegen_provider.transport.retry import RetryPolicy, header_lookup, parse_retry_after
from imagegen_provider.wire.dialects import Dialect, get_dialect
from imagegen_provider.wire.errors import (
    ClientConfigurationError,
    GatewayConnectionError,
    ImageDownloadError,
    ImageGenError,
    MalformedResponseError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    UnexpectedError,
    error_from_response,
)
from imagegen_provider.wire.imageinfo import inspect_image
from imagegen_provider.wire.normalize import StreamAssembler, normalize_response
from imagegen_provider.wire.request import ImageRequest
from imagegen_provider.wire.result import GeneratedImage, GenerationResult, ImageInfo

log = logging.getLogger(__name__)

#: Total deadline of one attempt (connect, headers and body), in seconds.
DEFAULT_ATTEMPT_TIMEOUT = 360.0
#: Failure-only answers for this long open the circuit breaker, in seconds.
DEFAULT_BREAKER_SECONDS = 600.0


@dataclass(frozen=True)
class Timeouts:
    """Connect fails fast; read waits long, because image generation can take over two minutes. ``attempt``
    bounds the whole attempt: a body dripping one byte a second never trips a read timeout."""

    connect: float = 10.0
    read: float = 300.0
    write: float = 30.0
    pool: float | None = None
    attempt: float = DEFAULT_ATTEMPT_TIMEOUT

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)


@dataclass(frozen=True)
class VerifiedImage:
    """An image whose bytes we hold and which decoded completely."""

    data: bytes = field(repr=False)
    info: ImageInfo
    revised_prompt: str | None = None
    #: The URL it was downloaded from (without credentials), when the gateway returned a URL.
    source_url: str | None = None


@dataclass(frozen=True)
class Generation:
    """The outcome of one successful ``generate`` call. ``images`` may hold more images than were asked for."""

    images: list[VerifiedImage]
    result: GenerationResult
    attempts: int
    #: Time of the successful HTTP exchange (request sent → body read), in milliseconds.
    latency_ms: float
    #: Time spent waiting on the rate limiter, across attempts.
    queued_ms: float
    #: Request fields the dialect could not carry.
    dropped_fields: tuple[str, ...] = ()
    #: Responses paid for but thrown away before the good one (a corrupt image that was asked for again).
    discarded: tuple[GenerationResult, ...] = ()


class GenerationFailed(Exception):
    """``generate`` gave up. Not an :class:`ImageGenError`: it wraps one, with what the attempts cost.

    :param error: the final error (its flags say whether to stop the run).
    :param attempts: HTTP attempts made.
    :param paid: every response paid for but unusable (an image that failed verification or download).
    """

    def __init__(self, error: ImageGenError, *, attempts: int, paid: tuple[GenerationResult, ...] = ()) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts
        self.paid = paid


@dataclass
class _Progress:
    """What the attempts of one ``generate`` call have cost so far."""

    attempts: int = 0
    queued: float = 0.0
    paid: list[GenerationResult] = field(default_factory=list)


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


def _host_of(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        # A malformed base URL fails every request, as a ClientConfigurationError; not the constructor.
        return None


def unexpected(exc: Exception, where: str) -> ImageGenError:
    """The error of this package for an exception nobody anticipated. Only class names: the exceptions' own
    messages can quote the request, its URL and so its credentials."""
    if isinstance(exc, httpx.DecodingError | RecursionError):
        return MalformedResponseError(f"undecodable response ({type(exc).__name__})")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return ClientConfigurationError(f"cannot send to {where}: {type(exc).__name__}")
    if isinstance(exc, httpx.TransportError):
        return GatewayConnectionError(f"{describe_transport_error(exc)} talking to {where}")
    return UnexpectedError(f"{type(exc).__name__} while talking to {where}")


class ImageGenClient:
    """Async client for ``POST {base_url}/images/generations`` in one dialect.

    :param base_url: includes the version prefix, as in the OpenAI SDK (``https://api.openai.com/v1``).
    :param api_key: sent as ``Authorization: Bearer``; never logged, never in errors.
    :param dialect: ``openai``, ``indoxhub`` or ``router``.
    :param accepts_seed: whether the gateway takes ``seed`` (default: the dialect's documented behaviour).
    :param limits: the rate limits to build a limiter from, unless ``limiter`` is given.
    :param limiter: share one limiter between clients of the same gateway.
    :param transport: httpx transport, e.g. ``httpx.ASGITransport`` for the in-process gateway.
    :param max_response_bytes: cap on every body (JSON, event stream, image download), counted decoded.
    :param breaker_seconds: failure-only answers for this long stop every caller (0: never).
    :param allow_private_image_urls: download images from private/loopback addresses even when the gateway is not.
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
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        breaker_seconds: float = DEFAULT_BREAKER_SECONDS,
        allow_private_image_urls: bool = False,
        keep_partial_images: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.dialect = get_dialect(dialect)
        self.accepts_seed = accepts_seed
        self.retry = retry or RetryPolicy()
        self.limiter = limiter or RateLimiter(limits or RateLimits(), max_wait=self.retry.max_retry_after)
        self.keep_partial_images = keep_partial_images
        self.max_response_bytes = max_response_bytes
        self.timeouts = timeouts or Timeouts()
        self.breaker = CircuitBreaker(breaker_seconds)
        self._api_key = api_key
        self._capped_retry_after_logged = False
        self._http = self._http_client(transport)
        policy = AddressPolicy(allow_private=allow_private_image_urls, gateway_host=_host_of(self.base_url))
        self._downloader = ImageDownloader(max_bytes=max_response_bytes, transport=download_transport, policy=policy)

    def _http_client(self, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        pool = max(4, self.limiter.limits.max_in_flight)
        headers = {"User-Agent": f"airflow-provider-imagegen/{__version__}", "Accept-Encoding": ACCEPT_ENCODING}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        pool_limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        if transport is None:
            # httpx's own pool (httpcore) re-checks every pooled connection on each request and response:
            # with 16+ requests in flight that was half of the client's CPU per image (3.7 ms → 2.1 ms with
            # aiohttp's pool, measured with bench's overhead case). The httpx API stays; only the pool changes.
            transport = _Transport(verify=default_ssl_context(), limits=pool_limits)
        return httpx.AsyncClient(
            timeout=self.timeouts.to_httpx(), limits=pool_limits, headers=headers, transport=transport
        )

    @property
    def api_key_for_redaction(self) -> str | None:
        """The key, so that callers can scrub it from their own messages. Never log it."""
        return self._api_key

    @property
    def endpoint(self) -> str:
        return self.base_url + self.dialect.path

    @property
    def _shown_endpoint(self) -> str:
        """The endpoint as errors and logs may show it: without ``user:pass@``."""
        try:
            return without_credentials(self.endpoint)
        except ValueError:
            return "the gateway (malformed base URL)"

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

        :raises GenerationFailed: the final error, the attempts made and every paid-but-unusable response.
        """
        progress = _Progress()
        try:
            return await self._generate(request, progress)
        except ImageGenError as error:
            raise GenerationFailed(error, attempts=progress.attempts, paid=tuple(progress.paid)) from None
        except Exception as exc:
            # No traceback in the log: the exception's message may quote the request or a URL with credentials.
            failure = unexpected(exc, self._shown_endpoint)
            log.debug("Unexpected %s while generating, reported as %s", type(exc).__name__, type(failure).__name__)
            raise GenerationFailed(failure, attempts=progress.attempts, paid=tuple(progress.paid)) from None

    async def _generate(self, request: ImageRequest, progress: _Progress) -> Generation:
        wire = self.dialect.build_body(request, accepts_seed=self.accepts_seed)
        while True:
            self.breaker.raise_if_open()
            progress.attempts += 1
            try:
                return await self._attempt(request, wire.json, wire.dropped, progress)
            except ImageGenError as error:
                self._observe_outcome(error)
                if not self.retry.should_retry(error, progress.attempts):
                    raise
                await self.breaker.guard(asyncio.sleep(self._retry_delay(error, progress.attempts)))

    async def _attempt(
        self, request: ImageRequest, body: dict[str, Any], dropped: tuple[str, ...], progress: _Progress
    ) -> Generation:
        waiting = time.monotonic()
        # The in-flight slot first, the rate budget second: a request that queued for a slot must still see a
        # 429 pause (or a limit learned from the headers) that began while it waited, or every queued request
        # is sent into the wall once. Both waits end early if the breaker opens.
        slot = self.limiter.in_flight()
        if slot.locked():
            await self.breaker.guard(slot.acquire())
        else:
            await slot.acquire()  # free: no wait to guard (and no tasks to create)
        try:
            await self.breaker.guard(self.limiter.acquire(images=request.n))
            progress.queued += time.monotonic() - waiting
            try:
                result, latency = await self._send(request, body)
            finally:
                self.limiter.release()
        finally:
            slot.release()
        self.breaker.succeeded()
        try:
            # Verified inside the retry: a corrupt image is lost either way, and asking again is the quickest
            # way to get it. The response was paid for all the same.
            images = [await self._verified(image, result, request) for image in result.images]
        except ImageGenError:
            progress.paid.append(result)
            raise
        return Generation(
            images=images,
            result=result,
            attempts=progress.attempts,
            latency_ms=latency * 1000.0,
            queued_ms=progress.queued * 1000.0,
            dropped_fields=dropped,
            discarded=tuple(progress.paid),
        )

    def _observe_outcome(self, error: ImageGenError) -> None:
        """Refusals and failures feed the breaker; any other answer proves the gateway works."""
        if isinstance(error, RateLimitError | ServerError | GatewayConnectionError | RequestTimeoutError):
            self.breaker.failed(type(error).__name__)
        elif not isinstance(error, ImageDownloadError | MalformedResponseError):
            self.breaker.succeeded()

    def _retry_delay(self, error: ImageGenError, attempts: int) -> float:
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, float) and retry_after > self.retry.max_retry_after:
            self._log_capped_retry_after(retry_after)
        delay = self.retry.delay(error, attempts)
        if isinstance(error, RateLimitError) and retry_after is None and self.limiter.learns_windows:
            # The limiter paused every request for as long as the gateway's window needs (and probes it while
            # learning): backing off longer only leaves the slots it frees unused.
            delay = min(delay, self.limiter.pause_remaining() + random.uniform(0.0, 0.5))
        return delay

    def _log_capped_retry_after(self, retry_after: float) -> None:
        # Once per client: a gateway announcing an hour on every 429 would otherwise log it for every image.
        if not self._capped_retry_after_logged:
            self._capped_retry_after_logged = True
            log.warning(
                "Gateway asked to wait %.0f s (Retry-After); waiting at most max_retry_after=%.0f s",
                retry_after, self.retry.max_retry_after,
            )

    async def list_models(self) -> list[str]:
        """``GET {base_url}/models``: the cheapest call that proves the URL and the key work."""
        try:
            async with asyncio.timeout(self.timeouts.attempt):
                async with self._http.stream("GET", self.base_url + "/models") as response:
                    content = await read_capped(response, max_bytes=self.max_response_bytes)
        except (httpx.TransportError, TimeoutError) as exc:
            shown = without_credentials(self.base_url)
            raise GatewayConnectionError(f"cannot reach {shown}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise error_from_response(response.status_code, content, secrets=self._secrets())
        try:
            payload = httpx.Response(200, content=content).json()
        except (ValueError, RecursionError):
            raise MalformedResponseError("model list is not JSON") from None
        data = payload.get("data") if isinstance(payload, dict) else None
        return [str(m.get("id")) for m in data or [] if isinstance(m, dict)]

    # -- one attempt ---------------------------------------------------------------------------

    async def _send(self, request: ImageRequest, body: dict[str, Any]) -> tuple[GenerationResult, float]:
        """One HTTP exchange under the attempt deadline; the caller holds a slot and a rate-limit admission."""
        secrets = self._secrets(request)
        started = time.monotonic()
        sent_at = time.time()
        SENT_AT.set(sent_at)
        SENT_IMAGES.set(request.n)
        try:
            async with asyncio.timeout(self.timeouts.attempt):
                if request.stream:
                    result = await self._send_streaming(body, secrets)
                else:
                    result = await self._send_plain(body, secrets)
        except TimeoutError:
            error: ImageGenError = GatewayConnectionError(
                f"no complete answer within the {self.timeouts.attempt:g} s attempt deadline "
                f"from {self._shown_endpoint}"
            )
            log.warning("Attempt failed: %s", error)
            raise error from None
        except httpx.TransportError as exc:
            # Timeouts, resets, dropped connections. The message is the exception class only: httpx
            # messages can quote the request.
            error = unexpected(exc, self._shown_endpoint)
            log.warning("Attempt failed: %s", error)
            raise error from None
        except ImageGenError as exc:
            # 429s are expected under a limit and handled by the limiter: one line each would drown the log.
            log.log(logging.DEBUG if isinstance(exc, RateLimitError) else logging.WARNING, "Attempt failed: %s", exc)
            raise
        usage = result.usage
        tokens = usage.total_tokens or (usage.input_tokens or 0) + (usage.output_tokens or 0)
        await self.limiter.on_accepted(sent_at=sent_at, images=request.n, tokens=tokens or None)
        return result, time.monotonic() - started

    async def _send_plain(self, body: dict[str, Any], secrets: list[str | None]) -> GenerationResult:
        # The body goes into a local, not ``response.content``: an httpx Response and its stream refer to each
        # other, so a body stored on the response lives until the cyclic GC runs. With 2-3 MB bodies that held
        # hundreds of MB between collections (see bench overhead).
        async with self._http.stream("POST", self.endpoint, json=body) as response:
            content = await read_capped(response, max_bytes=self.max_response_bytes)
        await self._check(response, content, secrets)
        return normalize_response(content, headers=response.headers, secrets=secrets)

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
            # No Retry-After: the refusing budget's own reset time, when the headers name it.
            headers = header_lookup(response.headers)
            pause = error.retry_after if error.retry_after is not None else reset_hint(headers)
            if pause is not None and pause > self.retry.max_retry_after:
                self._log_capped_retry_after(pause)
                pause = self.retry.max_retry_after
            await self.limiter.on_rate_limited(pause, limit=refused_limit(headers, str(error)))
        raise error

    async def _send_streaming(self, body: dict[str, Any], secrets: list[str | None]) -> GenerationResult:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        async with self._http.stream("POST", self.endpoint, json=body, headers=headers) as response:
            if response.status_code != 200 or "text/event-stream" not in response.headers.get("content-type", ""):
                # An error, or a provider without native streaming that ignored the flag and buffered the body.
                content = await read_capped(response, max_bytes=self.max_response_bytes)
                await self._check(response, content, secrets)
                return normalize_response(content, headers=response.headers, secrets=secrets)
            await self._check(response, b"", secrets)
            assembler = StreamAssembler(
                headers=response.headers, keep_partials=self.keep_partial_images, secrets=secrets
            )
            # Events are consumed as they arrive (partials dropped unless kept), under the body cap.
            events = capped_view(response, max_bytes=self.max_response_bytes)
            async for sse in EventSource(events).aiter_sse():
                assembler.feed(sse.event, sse.data)
        return assembler.result()

    async def _verified(self, image: GeneratedImage, result: GenerationResult, request: ImageRequest) -> VerifiedImage:
        data = image.data
        if data is None:
            # Downloads are not retried by regenerating (that would pay again); the downloader retries the image
            # host itself. A download that fails ends the call with the response on record as paid.
            try:
                data = await self._downloader.fetch(image.url or "")
            except ImageDownloadError:
                raise
            except ImageGenError as exc:
                # The image host's 5xx, after the downloader's own retries: still a download failure, never a
                # reason to regenerate (and so to pay again).
                raise ImageDownloadError(f"image download failed: {exc}", status=getattr(exc, "status", None)) from None
        info = inspect_image(data, request_id=result.request_id, expected_format=request.output_format)
        source = without_credentials(image.url) if image.url else None
        return VerifiedImage(data=data, info=info, revised_prompt=image.revised_prompt, source_url=source)

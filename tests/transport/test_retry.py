"""Retry-After in its three spellings, parsed and then actually waited out; what is retried at all."""

from __future__ import annotations

import asyncio
import email.utils
import time

import httpx
import pytest

from imagegen_gateway import GatewayConfig
from imagegen_provider.transport import (
    ImageGenClient,
    RateLimiter,
    RateLimits,
    RetryPolicy,
    is_retryable,
    parse_retry_after,
)
from imagegen_provider.transport.pacing import LimitKind
from imagegen_provider.wire.errors import (
    AuthenticationError,
    BadRequestError,
    ContentPolicyError,
    GatewayConnectionError,
    ImageExpiredError,
    MalformedResponseError,
    RateLimitError,
    ServerError,
)

from ._scripted import Reply, ok_image
from .conftest import KEY, generation_fails, small_request

GEN = "/v1/images/generations"
NOW = 1_800_000_000.0


def _http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


# --- parse_retry_after ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": " 3 "}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "20"}, 0.02),
        # OpenAI sends both; the precise one wins.
        ({"retry-after-ms": "250", "retry-after": "1"}, 0.25),
        # A broken ms header falls back to the seconds.
        ({"retry-after-ms": "soon", "retry-after": "2"}, 2.0),
        ({"retry-after": "tomorrow-ish"}, None),
        ({"retry-after": ""}, None),
        ({}, None),
        # Non-finite values are broken headers: never an infinite (or NaN) pause.
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "inf", "retry-after": "4"}, 4.0),
    ],
)
def test_parse_retry_after_seconds_and_millis(headers, expected):
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date():
    assert parse_retry_after({"retry-after": _http_date(NOW + 120)}, now=NOW) == pytest.approx(120.0)
    assert parse_retry_after({"retry-after": _http_date(NOW + 2)}, now=NOW) == pytest.approx(2.0)
    # A date in the past means "now", not a negative wait.
    assert parse_retry_after({"retry-after": _http_date(NOW - 30)}, now=NOW) == 0.0
    # Without ``now``, the wall clock is used.
    live = parse_retry_after({"retry-after": _http_date(time.time() + 60)})
    assert live is not None and 58.0 <= live <= 60.0


def test_parse_retry_after_header_names_are_case_insensitive():
    assert parse_retry_after(httpx.Headers({"Retry-After": "9"})) == 9.0
    assert parse_retry_after({"Retry-After": "9"}) == 9.0
    assert parse_retry_after({"Retry-After-Ms": "900"}) == 0.9


@pytest.mark.parametrize(
    ("exc", "retryable"),
    [
        (RateLimitError("slow down", status=429), True),
        (ServerError("boom", status=503), True),
        (GatewayConnectionError("reset"), True),
        (MalformedResponseError("bad base64"), True),
        (BadRequestError("bad size", status=400), False),
        (ContentPolicyError("no", status=400), False),
        (AuthenticationError("who are you", status=401), False),
        (ImageExpiredError("gone", status=404), False),
        (httpx.ReadTimeout("slow"), True),
        (httpx.RemoteProtocolError("dropped"), True),
        (httpx.UnsupportedProtocol("file://"), False),
        (ValueError("a bug"), False),
    ],
)
def test_is_retryable(exc, retryable):
    assert is_retryable(exc) is retryable


# --- waiting it out, end to end ---------------------------------------------------------------------------


def _rate_limited(**headers: str) -> Reply:
    return Reply(429, json={"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}},
                 headers=headers)


async def _gap_between_attempts(scripted, client_for, first: Reply, **client_kwargs) -> float:
    scripted.on(GEN, first, ok_image())
    client = client_for(scripted.base_url + "/v1", retry=RetryPolicy(max_attempts=3), **client_kwargs)
    generation = await client.generate(small_request())
    assert generation.attempts == 2
    first_seen, second_seen = scripted.requests_to(GEN)
    return second_seen.at - first_seen.at


async def test_retry_after_seconds_is_waited(scripted, client_for):
    gap = await _gap_between_attempts(scripted, client_for, _rate_limited(**{"retry-after": "1"}))
    assert 0.95 <= gap < 2.0


async def test_retry_after_http_date_is_waited(scripted, client_for):
    # Computed when the 429 is sent; HTTP dates have whole seconds, so the wait is between 1 and 2 s.
    gap = await _gap_between_attempts(
        scripted, client_for, lambda app, seen: _rate_limited(**{"retry-after": _http_date(time.time() + 2)})
    )
    assert 0.95 <= gap < 2.8


async def test_retry_after_ms_is_waited_and_preferred(scripted, client_for):
    gap = await _gap_between_attempts(
        scripted, client_for, _rate_limited(**{"retry-after-ms": "700", "retry-after": "30"})
    )
    assert 0.65 <= gap < 2.0  # 0.7 s, not the 30 s of the coarse header


async def test_huge_retry_after_is_capped(scripted, client_for):
    """Neither the retry wait nor the limiter's shared pause may sleep for the gateway's hour."""
    scripted.on(GEN, _rate_limited(**{"retry-after": "3600"}), ok_image())
    client = client_for(scripted.base_url + "/v1", retry=RetryPolicy(max_attempts=2, max_retry_after=0.3))
    started = time.monotonic()
    generation = await asyncio.wait_for(client.generate(small_request()), 10)
    assert generation.attempts == 2
    assert time.monotonic() - started < 3.0
    first_seen, second_seen = scripted.requests_to(GEN)
    assert second_seen.at - first_seen.at >= 0.25


class RecordingLimiter(RateLimiter):
    """Notes each 429's announced interval and when it arrived, and when each request was let through."""

    def __init__(self, limits: RateLimits) -> None:
        super().__init__(limits)
        self.announced: list[tuple[float, float | None]] = []
        self.admitted: list[float] = []

    async def on_rate_limited(self, retry_after: float | None, *, limit: LimitKind = "requests") -> None:
        self.announced.append((time.monotonic(), retry_after))
        await super().on_rate_limited(retry_after, limit=limit)

    async def acquire(self, images: int = 1) -> float:
        waited = await super().acquire(images)
        self.admitted.append(time.monotonic())
        return waited


async def test_gateway_429_is_retried_after_its_interval(gateway_factory):
    """The bundled gateway in hidden-limit mode (no x-ratelimit headers to learn from): the second request
    meets an empty bucket, gets 429 with the exact interval, waits that long and succeeds."""
    gw = gateway_factory(GatewayConfig(api_key=KEY, rpm=60, burst=1, rate_limit_headers=False))
    limiter = RecordingLimiter(RateLimits())
    async with ImageGenClient(base_url=gw.base_url + "/v1", api_key=KEY, retry=RetryPolicy(max_attempts=3),
                              limiter=limiter) as client:
        first = await client.generate(small_request(prompt="first"))
        second = await client.generate(small_request(prompt="second"))
    assert (first.attempts, second.attempts) == (1, 2)
    stats = gw.stats()
    assert stats["rate_limited"] == 1 and stats["generation_requests"] == 3
    [(limited_at, announced)] = limiter.announced
    # One token a second: the gateway announces most of a second, to the millisecond (retry-after-ms).
    assert announced is not None and 0.5 < announced <= 1.0
    retried_at = limiter.admitted[-1]
    assert announced - 0.02 <= retried_at - limited_at <= announced + 0.6


async def test_429_without_retry_after_still_backs_off(scripted, client_for):
    # Within a second of a minute boundary the pause ends at :00 instead (where a calendar window reopens):
    # start away from one.
    await asyncio.sleep(max(0.0, time.time() % 60 - 57.0))
    scripted.on(GEN, _rate_limited(), ok_image())
    client = client_for(scripted.base_url + "/v1", retry=RetryPolicy(max_attempts=3, backoff_initial=0.01,
                                                                        backoff_max=0.05))
    generation = await client.generate(small_request())
    first_seen, second_seen = scripted.requests_to(GEN)
    assert generation.attempts == 2
    # The limiter's default pause (1 s) applies when the gateway names no interval.
    assert second_seen.at - first_seen.at >= 0.95


async def test_429_retries_exhausted_raises_rate_limit_error(scripted, client_for):
    scripted.on(GEN, _rate_limited(**{"retry-after-ms": "50"}))
    # 429s get their own allowance on top of max_attempts: being told to wait is not the request failing.
    client = client_for(scripted.base_url + "/v1", retry=RetryPolicy(max_attempts=3, rate_limited_attempts=2))
    with generation_fails(RateLimitError) as caught:
        await client.generate(small_request())
    assert caught.attempts == 5 and caught.value.retry_after == pytest.approx(0.05)
    assert len(scripted.requests_to(GEN)) == 5
    assert client.limiter.rate_limited_count == 5

"""Nothing waits without a bound: a total deadline per attempt, Retry-After capped (and the capping logged once
per client), and a circuit breaker that stops every caller when a gateway refuses everything.

The elapsed times printed here are the figures the issue asks for; the assertions on them are liveness bounds
(several times the expected value), not speed targets.
"""

from __future__ import annotations

import asyncio
import logging
import time

from imagegen_provider.transport import GenerationFailed, RateLimits, RetryPolicy
from imagegen_provider.wire.errors import CircuitOpenError, GatewayConnectionError, RateLimitError

from ._scripted import Reply, ok_image
from .conftest import generation_fails, small_request

GEN = "/v1/images/generations"


def _rate_limited(retry_after: str) -> Reply:
    return Reply(429, json={"error": {"message": "Rate limit reached"}}, headers={"retry-after": retry_after})


async def test_dripping_body_ends_at_the_attempt_deadline(scripted, client_for):
    """One byte every 2 s never trips the 300 s read timeout; the 5 s attempt deadline ends it."""
    from imagegen_provider.transport import Timeouts

    scripted.on(GEN, Reply(200, chunks=[b"{"] + [b" "] * 30, chunk_delay=2.0, media_type="application/json"))
    client = client_for(scripted.base_url + "/v1", retry=RetryPolicy(max_attempts=1),
                        timeouts=Timeouts(read=300.0, attempt=5.0))
    started = time.monotonic()
    with generation_fails(GatewayConnectionError) as caught:
        await client.generate(small_request())
    elapsed = time.monotonic() - started
    print(f"\ndrip-feed attempt ended after {elapsed:.2f} s (attempt_timeout 5 s)")
    assert "deadline" in str(caught.value) and caught.attempts == 1
    assert 4.5 <= elapsed < 15.0


async def test_gateway_refusing_everything_opens_the_breaker_for_every_caller(scripted, client_for):
    """429 to everything, Retry-After 1 s: without a breaker each of the queued images would retry for about
    25 attempts. With breaker_seconds=2 every caller, queued ones included, gets a fatal CircuitOpenError."""
    scripted.on(GEN, _rate_limited("1"))
    client = client_for(scripted.base_url + "/v1", retry=RetryPolicy(max_attempts=5, rate_limited_attempts=20),
                        limits=RateLimits(max_in_flight=1), breaker_seconds=2.0)
    started = time.monotonic()
    outcomes = await asyncio.gather(*(client.generate(small_request(prompt=f"p{i}")) for i in range(6)),
                                    return_exceptions=True)
    elapsed = time.monotonic() - started
    print(f"\n429-forever: every caller stopped after {elapsed:.2f} s (breaker_seconds 2 s)")
    assert all(isinstance(o, GenerationFailed) for o in outcomes), outcomes
    errors = [o.error for o in outcomes if isinstance(o, GenerationFailed)]
    assert all(isinstance(e, CircuitOpenError) and e.fatal for e in errors), errors
    assert elapsed < 12.0
    # After it opened, nothing more was sent.
    sent = len(scripted.requests_to(GEN))
    await asyncio.sleep(0.3)
    assert len(scripted.requests_to(GEN)) == sent and sent <= 6


async def test_breaker_closes_again_on_success(scripted, client_for):
    scripted.on(GEN, _rate_limited("0.2"), _rate_limited("0.2"), ok_image())
    client = client_for(scripted.base_url + "/v1", retry=RetryPolicy(max_attempts=5), breaker_seconds=5.0)
    generation = await client.generate(small_request())
    assert generation.attempts == 3 and not client.breaker.is_open
    assert client.breaker._failing_since is None


async def test_capped_retry_after_is_logged_once_per_client(scripted, client_for, caplog):
    caplog.set_level(logging.WARNING, logger="imagegen_provider.transport.client")
    replies = []
    for _ in range(4):
        replies += [_rate_limited("3600"), ok_image()]
    scripted.on(GEN, *replies)
    client = client_for(scripted.base_url + "/v1", retry=RetryPolicy(max_attempts=3, max_retry_after=0.1))
    for i in range(4):
        generation = await asyncio.wait_for(client.generate(small_request(prompt=f"p{i}")), 10)
        assert generation.attempts == 2
    capped = [r for r in caplog.records if "max_retry_after" in r.getMessage()]
    assert len(capped) == 1 and "3600" in capped[0].getMessage()


async def test_rate_limit_error_keeps_its_retry_after(scripted, client_for):
    scripted.on(GEN, _rate_limited("0.05"))
    client = client_for(scripted.base_url + "/v1", retry=RetryPolicy(max_attempts=1, rate_limited_attempts=0))
    with generation_fails(RateLimitError) as caught:
        await client.generate(small_request())
    assert caught.value.retry_after == 0.05 and caught.attempts == 1

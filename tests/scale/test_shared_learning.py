"""What one limiter learns reaches every limiter on the same Redis backend (real redis-server): the window
shape, the learned rate, and only one decrease for a burst of 429s seen by several processes."""

from __future__ import annotations

import asyncio
import time

import pytest

from imagegen_provider.transport.learner import WindowShape
from imagegen_provider.transport.pacing import AdaptiveRate
from imagegen_provider.transport.ratelimit import SENT_AT, RateLimiter, RateLimits


def _limits(redis_url: str, db: int, namespace: str) -> RateLimits:
    return RateLimits(backend=redis_url.rsplit("/", 1)[0] + f"/{db}", namespace=namespace, probe_first=False)


async def test_a_window_one_limiter_identifies_paces_the_others(redis_url):
    limits = _limits(redis_url, 11, f"shape-{time.time_ns()}")
    first, second = RateLimiter(limits), RateLimiter(limits)
    try:
        # The first limiter saw 30 accepted, then refusals without Retry-After for 5 s, ending just after
        # :00 of the wall clock: a calendar-minute window of 30.
        boundary = (time.time() // 60) * 60
        for i in range(30):
            await first.on_accepted(sent_at=boundary - 20 + i * 0.1)
        token = SENT_AT.set(boundary - 5.0)
        await first.on_rate_limited(None)
        SENT_AT.reset(token)
        await first.on_accepted(sent_at=boundary + 0.5)
        assert first.window_shape == WindowShape("fixed", 30)
        assert second.window_shape is None
        await second.acquire()  # polls the shared shape
        assert second.window_shape == WindowShape("fixed", 30)
        assert second.requests_per_minute == 30
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_burst_of_429s_across_limiters_is_one_decrease(redis_url):
    limits = _limits(redis_url, 12, f"rate-{time.time_ns()}")
    limiters = [RateLimiter(limits) for _ in range(4)]
    try:
        for limiter in limiters:
            await limiter.acquire()
        # Everyone learns the same first rate, then one more burst later.
        await limiters[0].on_rate_limited(0.0)
        learned = limiters[0].requests_per_minute
        assert learned is not None
        await asyncio.sleep(1.1)
        for limiter in limiters:
            await limiter.on_accepted(sent_at=time.time())
        for limiter in limiters:  # the same congestion, seen by four processes at once
            await limiter.on_rate_limited(0.0)
        rates = {round(limiter.requests_per_minute or 0, 6) for limiter in limiters}
        assert rates == {round(learned * AdaptiveRate.DECREASE, 6)}, (learned, rates)
    finally:
        for limiter in limiters:
            await limiter.aclose()


@pytest.mark.parametrize("value", [b"nan", b"-1", b"inf", b"lots"])
async def test_a_shared_rate_is_checked_before_believed(redis_url, value):
    import redis.asyncio as aioredis

    limits = _limits(redis_url, 13, f"bad-{time.time_ns()}")
    client = aioredis.from_url(limits.backend or "")
    await client.set(f"imagegen:{limits.namespace}:learned_rate", value)
    await client.aclose()
    limiter = RateLimiter(limits)
    try:
        await limiter.acquire()
        assert limiter.requests_per_minute is None
    finally:
        await limiter.aclose()

"""The client's rate limiter: windows, header feedback, the shared 429 pause, the in-flight cap, the Redis
backend, and the behaviour that matters most: a burst against a rate-limited gateway stays polite.

Timing assertions are coarse on purpose (lower bounds with slack, counts with generous margins).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Mapping

import pytest

from imagegen_gateway import GatewayConfig
from imagegen_gateway.limiter import format_duration
from imagegen_provider.transport import ImageGenClient, RateLimiter, RateLimits, RetryPolicy
from imagegen_provider.transport.pacing import AdaptiveRate, LimitKind
from imagegen_provider.transport.ratelimit import BURST_SECONDS, parse_duration, per_minute_item

from .conftest import KEY, small_request

# --- per_minute_item ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_minute", "amount", "seconds"),
    [(1200, 20, 1), (600, 10, 1), (120, 2, 1), (90, 3, 2), (7, 7, 60), (61, 61, 60), (0.4, 1, 60), (59.6, 1, 1)],
)
def test_per_minute_item_shortest_equivalent_window(per_minute, amount, seconds):
    item = per_minute_item(per_minute)
    assert (item.amount, item.get_expiry()) == (amount, seconds)


@pytest.mark.parametrize("per_minute", [1, 2, 5, 7, 13, 30, 45, 60, 100, 150, 333, 500, 999, 3000, 10_000])
def test_per_minute_item_keeps_the_rate(per_minute):
    item = per_minute_item(per_minute)
    assert item.amount * 60 / item.get_expiry() == pytest.approx(per_minute)
    assert item.get_expiry() <= 60


@pytest.mark.parametrize(("per_minute", "min_amount"), [(60, 10), (120, 10), (7, 10), (600, 10), (1, 3)])
def test_per_minute_item_min_amount_lengthens_the_window_not_the_rate(per_minute, min_amount):
    item = per_minute_item(per_minute, min_amount=min_amount)
    assert item.amount >= min_amount
    assert item.amount * 60 / item.get_expiry() == pytest.approx(per_minute)


# --- parse_duration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0), ("1.5s", 1.5), ("120ms", 0.12), ("6m0s", 360.0), ("1h2m3s", 3723.0), ("2m30.5s", 150.5),
        ("7", 7.0), ("0.25", 0.25), ("1ms", 0.001), (" 20ms ", 0.02),
        (None, None), ("", None), ("soon", None),
    ],
)
def test_parse_duration(text, seconds):
    result = parse_duration(text)
    assert result == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize("seconds", [0.004, 0.12, 0.999, 1.0, 1.5, 59.9, 61.25, 360.0, 3723.5])
def test_parse_duration_reads_what_the_gateway_writes(seconds):
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=0.001)


# --- observe_headers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "headers", "expected"),
    [
        (None, {"x-ratelimit-limit-requests": "300"}, 300.0),  # nothing configured: adopt the gateway's
        (600.0, {"x-ratelimit-limit-requests": "300"}, 300.0),  # configured higher: lowered
        (100.0, {"x-ratelimit-limit-requests": "300"}, 100.0),  # configured lower: never raised
        (100.0, {}, 100.0),
        (None, {"x-ratelimit-limit-requests": "lots"}, None),
        (None, {"x-ratelimit-limit-requests": "0"}, None),
        (None, {"x-ratelimit-limit-requests": "inf"}, None),
        (None, {"X-RateLimit-Limit-Requests": "50"}, 50.0),
    ],
)
def test_observe_headers_requests(configured, headers: Mapping[str, str], expected):
    limiter = RateLimiter(RateLimits(requests_per_minute=configured))
    limiter.observe_headers(headers)
    assert limiter.requests_per_minute == expected
    assert limiter.images_per_minute is None


def test_observe_headers_reads_litellm_forwarded_provider_limits():
    limiter = RateLimiter(RateLimits())
    limiter.observe_headers({"llm_provider-x-ratelimit-limit-requests": "500",
                             "llm_provider-x-ratelimit-limit-images": "50"})
    assert limiter.requests_per_minute == 500 and limiter.images_per_minute == 50


def test_observe_headers_images_and_repeated_announcements():
    limiter = RateLimiter(RateLimits(images_per_minute=50))
    limiter.observe_headers({"x-ratelimit-limit-images": "40", "x-ratelimit-limit-requests": "1000"})
    assert (limiter.requests_per_minute, limiter.images_per_minute) == (1000.0, 40.0)
    limiter.observe_headers({"x-ratelimit-limit-images": "45", "x-ratelimit-limit-requests": "2000"})
    assert (limiter.requests_per_minute, limiter.images_per_minute) == (1000.0, 40.0)
    # The configured limits themselves are untouched.
    assert limiter.limits.images_per_minute == 50 and limiter.limits.requests_per_minute is None


async def test_client_learns_the_gateway_limit_from_headers(gateway_factory, client_for):
    gw = gateway_factory(GatewayConfig(api_key=KEY, rpm=300, burst=50))
    learner = client_for(gw, "openai")
    stricter = client_for(gw, "openai", limits=RateLimits(requests_per_minute=100))
    laxer = client_for(gw, "openai", limits=RateLimits(requests_per_minute=900))
    for client in (learner, stricter, laxer):
        assert client.limiter.requests_per_minute != 300
        await client.generate(small_request())
    assert learner.limiter.requests_per_minute == 300
    assert stricter.limiter.requests_per_minute == 100
    assert laxer.limiter.requests_per_minute == 300


# --- pause, in-flight cap, budgets --------------------------------------------------------------------------


async def test_pause_delays_acquire():
    limiter = RateLimiter(RateLimits(probe_first=False))
    assert await limiter.acquire() < 0.05
    await limiter.pause(0.4)
    await limiter.pause(0.1)  # a shorter pause never shortens a longer one
    waited = await limiter.acquire()
    assert waited >= 0.38
    assert await limiter.acquire() < 0.05


async def test_on_rate_limited_counts_and_pauses():
    limiter = RateLimiter(RateLimits(probe_first=False))
    await limiter.on_rate_limited(0.3)
    assert limiter.rate_limited_count == 1
    assert await limiter.acquire() >= 0.28


async def test_request_budget_is_enforced():
    """600/min is 10 per second: half a second's worth (5) may leave at once, then one every 0.1 s."""
    limiter = RateLimiter(RateLimits(requests_per_minute=600))
    for _ in range(5):
        assert await limiter.acquire() < 0.05
    waits = [await limiter.acquire() for _ in range(10)]
    assert all(0.05 <= w <= 0.2 for w in waits), waits
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(limiter.acquire() for _ in range(5))), 0.3)


async def test_paced_requests_leave_evenly_not_in_window_bursts():
    """Over two seconds at 1200/min, no 100 ms holds more than the burst (10) plus two intervals."""
    limiter = RateLimiter(RateLimits(requests_per_minute=1200))
    stamps = []

    async def take() -> None:
        await limiter.acquire()
        stamps.append(time.monotonic())

    await asyncio.gather(*(take() for _ in range(50)))
    stamps.sort()
    steady = list(stamps[10:])
    gaps = [b - a for a, b in itertools.pairwise(steady)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.05, abs=0.01)
    assert max(sum(1 for t in steady if first <= t < first + 0.1) for first in steady) <= 3


async def test_images_per_minute_counts_n():
    limiter = RateLimiter(RateLimits(images_per_minute=600, probe_first=False))  # 10 images per second
    assert await limiter.acquire(images=5) < 0.05
    assert await limiter.acquire(images=5) < 0.05
    # The burst (10 images) is spent: the next image waits for its interval.
    assert await limiter.acquire(images=1) >= 0.05
    # Ten single-image requests spend the same burst as two of five.
    singles = RateLimiter(RateLimits(images_per_minute=600, probe_first=False))
    for _ in range(10):
        assert await singles.acquire(images=1) < 0.05
    assert await singles.acquire(images=1) >= 0.05


async def test_request_for_more_images_than_the_burst_is_counted_in_full():
    """300 images/min is 5 per second; a request for 10 costs 10: the next 5 images take about a second
    more than they would after a request for 5."""
    limiter = RateLimiter(RateLimits(images_per_minute=300, probe_first=False))
    assert await limiter.acquire(images=10) < 0.05
    started = time.monotonic()
    for _ in range(5):
        await limiter.acquire(images=1)
    assert time.monotonic() - started >= 0.9


async def test_first_request_probes_before_the_rest_are_sent():
    """With no configured limit, one request goes first; the rest wait for the gateway's first answer."""
    limiter = RateLimiter(RateLimits())
    assert await limiter.acquire() < 0.05
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(limiter.acquire(), 0.3)
    limiter.observe_headers({})
    assert await limiter.acquire() < 0.1


async def test_hidden_limit_is_learned_from_429s():
    """No headers, no configured limit: the rate in force follows the gateway's refusals."""
    limiter = RateLimiter(RateLimits(probe_first=False))
    assert limiter.requests_per_minute is None
    for _ in range(30):
        await limiter.acquire()
    for _ in range(20):  # the gateway accepted 10 of 30 in the last second
        await limiter.on_rate_limited(0.0)
    learned = limiter.requests_per_minute
    assert learned == pytest.approx(10 * 60, rel=0.01)
    await asyncio.sleep(1.05)
    await limiter.on_rate_limited(0.0)  # the same burst of refusals: one congestion signal, no further cut
    assert limiter.requests_per_minute == pytest.approx(learned)
    await limiter.on_accepted(sent_at=time.time())  # the burst is over...
    await limiter.on_rate_limited(0.0)  # ...and a new one a second later cuts it by 10%
    assert limiter.requests_per_minute == pytest.approx(learned * AdaptiveRate.DECREASE)


async def test_in_flight_cap_is_respected_on_the_wire(gateway_factory):
    gw = gateway_factory(GatewayConfig(api_key=KEY, latency=0.15))
    async with ImageGenClient(base_url=gw.base_url + "/v1", api_key=KEY, limits=RateLimits(max_in_flight=3)) as client:
        started = time.monotonic()
        results = await asyncio.gather(*(client.generate(small_request(prompt=f"p{i}")) for i in range(12)))
        elapsed = time.monotonic() - started
    assert len(results) == 12
    assert gw.stats()["max_in_flight"] == 3  # reached, never exceeded
    assert elapsed >= 4 * 0.15 * 0.9


async def test_configured_rpm_paces_requests(keyed_gateway):
    gw = keyed_gateway
    limits = RateLimits(requests_per_minute=600, max_in_flight=32)
    async with ImageGenClient(base_url=gw.base_url + "/v1", api_key=KEY, limits=limits) as client:
        started = time.monotonic()
        results = await asyncio.gather(*(client.generate(small_request(prompt=f"p{i}")) for i in range(25)))
        elapsed = time.monotonic() - started
    assert len(results) == 25
    # 10 a second: three windows, so at least two seconds. Unpaced, all 25 go in a fraction of a second.
    assert elapsed >= 1.8
    busiest_second = max(count for _, count in gw.stats()["accepted_timeline"])
    # A paced second holds its 10 plus at most the burst allowance (a calendar second can catch the opening
    # burst and a full second of pacing); unpaced, one second would hold all 25.
    assert busiest_second <= 10 + 10 * BURST_SECONDS + 1


# --- the 429 storm -----------------------------------------------------------------------------------------


class NoFeedbackLimiter(RateLimiter):
    """A limiter that ignores the gateway: no shared pause on 429, no limits learned from headers."""

    async def on_rate_limited(self, retry_after: float | None, *, limit: LimitKind = "requests") -> None:
        self._rate_limited += 1

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        return None


async def _storm(handle, count: int, *, limits: RateLimits | None = None, limiter: RateLimiter | None = None,
                 max_attempts: int = 25) -> tuple[int, float]:
    async with ImageGenClient(
        base_url=handle.base_url + "/v1", api_key=KEY, retry=RetryPolicy(max_attempts=max_attempts),
        limits=limits, limiter=limiter,
    ) as client:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(client.generate(small_request(prompt=f"storm {i}")) for i in range(count)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
    return sum(1 for o in outcomes if not isinstance(o, BaseException)), elapsed


async def test_429_storm_stays_small(gateway_factory):
    """A gateway allowing 240 requests/min (burst 4: one second's worth), and 40 requests at once from three
    clients (240 rather than 120/min only to halve the test's time; the shapes are the same):

    * adaptive: no configured rpm, 16 in flight. Its first wave meets the wall (unavoidable: it knows
      nothing yet); the 429 pause and the gateway's x-ratelimit headers must then hold every queued request
      back, so the wall is met about once, not once per request;
    * configured: rpm=240, so it (almost) never meets it;
    * no feedback: the same client with the pause and the header learning switched off, for comparison
      (stopped after a few attempts per request: it would take long).
    """
    count = 40
    adaptive_gw, configured_gw, blind_gw = (
        gateway_factory(GatewayConfig(api_key=KEY, rpm=240, burst=4)) for _ in range(3)
    )
    (adaptive_ok, adaptive_time), (configured_ok, _), (blind_ok, _) = await asyncio.gather(
        _storm(adaptive_gw, count, limits=RateLimits(max_in_flight=16)),
        _storm(configured_gw, count, limits=RateLimits(requests_per_minute=240, max_in_flight=16)),
        _storm(blind_gw, count, limiter=NoFeedbackLimiter(RateLimits(max_in_flight=16, probe_first=False)),
               max_attempts=4),
    )
    adaptive_429 = adaptive_gw.stats()["rate_limited"]
    configured_429 = configured_gw.stats()["rate_limited"]
    blind_429 = blind_gw.stats()["rate_limited"]

    assert adaptive_ok == count and configured_ok == count
    # The first wave (16 in flight, 4 tokens) is the bulk; a queued request must never be sent into a pause.
    assert adaptive_429 <= 16 + 4
    assert adaptive_429 < 0.5 * count
    assert configured_429 <= 4
    assert blind_429 > 3 * adaptive_429
    assert blind_ok < count
    # Finishing all 40 at 4 per second takes the time the budget allows, not much more.
    assert adaptive_time < 20


# --- Redis: one budget across limiters ----------------------------------------------------------------------


async def test_redis_limiters_share_one_budget_and_one_pause(redis_url):
    namespace = f"x-{uuid.uuid4().hex[:8]}"
    limiters = [
        RateLimiter(RateLimits(requests_per_minute=600, backend=redis_url, namespace=namespace)) for _ in range(2)
    ]
    stamps: list[float] = []

    async def take(limiter: RateLimiter) -> None:
        await limiter.acquire()
        stamps.append(time.monotonic())

    try:
        # Connect both first, so that the measured part is the budget, not connection setup.
        await asyncio.gather(*(limiter.pause(0) for limiter in limiters))
        started = time.monotonic()
        await asyncio.gather(*(take(limiter) for limiter in limiters for _ in range(7)))
        elapsed = time.monotonic() - started
        # 14 requests, 10 per second between them (7 each would fit separate budgets at once): a second
        # window is needed, and no window holds 11.
        assert elapsed >= 0.9
        stamps.sort()
        for index, first in enumerate(stamps):
            in_window = [t for t in stamps[index:] if t - first < 0.9]
            assert len(in_window) <= 10

        # A pause set through one limiter holds back the other.
        pauser, other = (
            RateLimiter(RateLimits(backend=redis_url, namespace=namespace + "-pause", probe_first=False))
            for _ in range(2)
        )
        try:
            assert await other.acquire() < 0.2
            await pauser.pause(0.6)
            # A shorter pause from another process never shortens the shared one.
            shorter = RateLimiter(RateLimits(backend=redis_url, namespace=namespace + "-pause", probe_first=False))
            await shorter.pause(0.05)
            await shorter.aclose()
            assert await other.acquire() >= 0.5
        finally:
            await pauser.aclose()
            await other.aclose()
    finally:
        for limiter in limiters:
            await limiter.aclose()


async def test_redis_budgets_are_separate_per_namespace(redis_url):
    limiters = [
        RateLimiter(RateLimits(requests_per_minute=600, backend=redis_url, namespace=f"ns-{uuid.uuid4().hex[:8]}"))
        for _ in range(2)
    ]
    try:
        await asyncio.gather(*(limiter.pause(0) for limiter in limiters))
        started = time.monotonic()
        await asyncio.gather(*(limiter.acquire() for limiter in limiters for _ in range(10)))
        assert time.monotonic() - started < 0.8
        assert all(limiter.shared for limiter in limiters)
    finally:
        for limiter in limiters:
            await limiter.aclose()

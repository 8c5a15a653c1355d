"""The pure pacing module, on a fake clock: even spacing, AIMD learning, and announced limits checked before
they are believed."""

from __future__ import annotations

import logging

import pytest

from imagegen_provider.transport import RateLimiter, RateLimits
from imagegen_provider.transport.pacing import AdaptiveRate, Pacer, announced_limit, refused_limit, reset_hint


def test_pacer_spaces_sends_after_the_burst():
    pacer, rate, now = Pacer(), 2.0, 100.0  # two per second, burst of one
    assert pacer.delay(now, rate, burst=1.0) == 0.0
    assert pacer.delay(now, rate, burst=1.0) == pytest.approx(0.5)
    assert pacer.delay(now + 0.5, rate, burst=1.0) == 0.0
    # A refund gives the slot back.
    pacer.refund(rate)
    assert pacer.delay(now + 0.5, rate, burst=1.0) == 0.0


def test_pacer_drain_forbids_a_burst_after_a_429():
    pacer, rate = Pacer(), 10.0
    pacer.drain(resume_at=50.0, rate=rate, burst=5.0)
    assert pacer.delay(49.9, rate, burst=5.0) > 0.0  # nothing before the pause ends
    assert pacer.delay(50.0, rate, burst=5.0) == 0.0  # one at the end of the pause...
    assert pacer.delay(50.0, rate, burst=5.0) == pytest.approx(0.1)  # ...then one interval apart, no burst


def test_adaptive_rate_first_refusal_then_decrease_then_probe():
    adaptive = AdaptiveRate()
    for i in range(10):
        adaptive.sent(10.0 + i * 0.05)
    for i in range(6):
        adaptive.refused(10.5 + i * 0.01)
    first = adaptive.rate
    assert first is not None and 1.0 <= first < 10.0
    adaptive.refused(12.0)
    assert adaptive.rate == pytest.approx(first * AdaptiveRate.DECREASE)
    lowered = adaptive.rate
    adaptive.maybe_increase(13.0)  # too soon after the refusal
    assert adaptive.rate == lowered
    adaptive.maybe_increase(20.0)
    assert adaptive.rate > lowered


@pytest.mark.parametrize(
    ("value", "expected", "warned"),
    [("300", 300.0, False), ("1", 1.0, False), ("0.001", None, True), ("0.5", None, True), ("0", None, False),
     ("-3", None, False), ("nan", None, False), ("inf", None, False), ("many", None, False), (None, None, False)],
)
def test_announced_limit_is_checked(caplog, value, expected, warned):
    caplog.set_level(logging.WARNING)
    assert announced_limit("x-ratelimit-limit-requests", value) == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert bool(warnings) is warned
    if warned:
        assert "x-ratelimit-limit-requests" in warnings[0]


async def test_absurd_announced_limit_never_makes_a_request_wait(caplog):
    caplog.set_level(logging.WARNING)
    limiter = RateLimiter(RateLimits(probe_first=False), max_wait=0.5)
    limiter.observe_headers({"x-ratelimit-limit-requests": "0.001", "x-ratelimit-limit-images": "0.0001"})
    assert limiter.requests_per_minute is None and limiter.images_per_minute is None
    assert "x-ratelimit-limit-requests" in caplog.text and "x-ratelimit-limit-images" in caplog.text
    for _ in range(3):
        assert await limiter.acquire() < 0.5


async def test_every_wait_is_bounded_by_max_wait():
    """A configured 1 request/min would space requests a minute apart; a single sleep never exceeds max_wait,
    and a 429 pause of an hour is cut to it."""
    limiter = RateLimiter(RateLimits(probe_first=False), max_wait=0.2)
    await limiter.on_rate_limited(3600.0)
    waited = await limiter.acquire()
    assert waited < 1.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"}, 1.5),
        ({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "1.5s"}, None),
        ({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "1s",
          "x-ratelimit-remaining-images": "0", "x-ratelimit-reset-images": "6m0s"}, 360.0),
        ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "120ms"}, 0.12),
        ({"llm_provider-x-ratelimit-remaining-requests": "0", "llm_provider-x-ratelimit-reset-requests": "2s"}, 2.0),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "soon"}, None),
        ({}, None),
    ],
)
def test_reset_hint_names_the_refusing_budget(headers, expected):
    assert reset_hint(headers) == (None if expected is None else pytest.approx(expected))


# --- which budget a 429 refused --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message", "expected"),
    [
        ({}, "Rate limit reached for images per minute. Please try again in 1s.", "images"),
        ({}, "Rate limit reached for gpt-image-1 in organization org-x on tokens per min (TPM): Limit 1000",
         "tokens"),
        ({}, "Rate limit reached for dall-e-3 on requests per min (RPM): Limit 5", "requests"),
        ({}, "Too Many Requests", "requests"),
        ({"x-ratelimit-remaining-images": "0", "x-ratelimit-remaining-requests": "3"}, "", "images"),
        ({"llm_provider-x-ratelimit-remaining-tokens": "0"}, "slow down", "tokens"),
        ({"x-ratelimit-remaining-images": "2"}, "Rate limit reached for requests per minute", "requests"),
    ],
)
def test_refused_limit_names_the_budget(headers, message, expected):
    assert refused_limit(headers, message) == expected


def test_adaptive_images_rate_counts_every_image_of_a_request():
    """Requests for 4 images: 10 requests sent in half a second, 4 of them refused: 24 images were accepted."""
    adaptive = AdaptiveRate("images")
    for i in range(10):
        adaptive.sent(10.0 + i * 0.05, 4)
    adaptive.refused(10.5, 4)
    for i in range(3):
        adaptive.refused(10.5 + i * 0.01, 4)
    # The first estimate: (40 - 16) images over the 1.02 s from a second before the first refusal to the last.
    assert adaptive.rate == pytest.approx(24 / 1.02)
    assert adaptive.per_minute() == pytest.approx(adaptive.rate * 60)


def test_adopting_a_shared_rate_delays_the_next_increase():
    adaptive = AdaptiveRate()
    adaptive.adopt(10.0, now=100.0)
    adaptive.maybe_increase(101.0)  # another process just changed the fleet's rate: wait
    assert adaptive.rate == 10.0
    adaptive.held_back(104.5)  # another process was refused
    adaptive.maybe_increase(106.0)
    assert adaptive.rate == 10.0
    adaptive.maybe_increase(108.6)
    assert adaptive.rate == 11.0


def test_after_a_cut_the_rate_creeps_back_in_small_steps():
    adaptive = AdaptiveRate()
    for i in range(20):
        adaptive.sent(10.0 + i * 0.05)
    adaptive.refused(11.0)
    first = adaptive.rate
    assert first is not None
    adaptive.maybe_increase(15.1)  # before any cut: a big step (1/s at least)
    assert adaptive.rate == pytest.approx(first + max(1.0, 0.02 * first))
    raised = adaptive.rate
    adaptive.refused(16.5)
    assert adaptive.rate == pytest.approx(raised * AdaptiveRate.DECREASE)
    cut = adaptive.rate
    adaptive.maybe_increase(20.6)  # near the limit now: 2 %
    assert adaptive.rate == pytest.approx(cut * (1 + AdaptiveRate.STEP_NEAR_LIMIT))


def test_back_near_the_rate_last_refused_the_rate_lingers():
    adaptive = AdaptiveRate()
    for i in range(20):
        adaptive.sent(10.0 + i * 0.05)
    adaptive.refused(11.0)
    adaptive.refused(12.5)  # a cut: the gateway refused at this rate
    assert adaptive.rate is not None
    ceiling = adaptive.rate / AdaptiveRate.DECREASE
    now, steps = 12.5, []
    while adaptive.rate < ceiling * 1.01:
        now += AdaptiveRate.PROBE_AFTER
        before = adaptive.rate
        adaptive.maybe_increase(now)
        steps.append(adaptive.rate / before - 1)
    kinds = ["fast" if s == pytest.approx(AdaptiveRate.STEP_NEAR_LIMIT) else
             "slow" if s == pytest.approx(AdaptiveRate.STEP_AT_CEILING) else "other" for s in steps]
    # Big steps up to 97 % of the ceiling, then small ones past it.
    assert kinds == ["fast"] * kinds.count("fast") + ["slow"] * kinds.count("slow"), kinds
    assert kinds.count("fast") and kinds.count("slow") >= 6, kinds


def test_a_cut_adopted_from_another_process_sets_the_ceiling_too():
    adaptive = AdaptiveRate()
    adaptive.adopt(10.0, now=0.0)
    adaptive.adopt(9.0, now=1.0)  # another process was refused and cut the fleet's rate
    adaptive.maybe_increase(5.1)
    assert adaptive.rate == pytest.approx(9.0 * (1 + AdaptiveRate.STEP_NEAR_LIMIT))
    adaptive.maybe_increase(9.2)
    adaptive.maybe_increase(13.3)
    adaptive.maybe_increase(17.4)  # 9.0 * 1.02 ** 4 = 9.74: past 0.97 * 10, small steps from here
    assert adaptive.rate == pytest.approx(9.0 * (1 + AdaptiveRate.STEP_NEAR_LIMIT) ** 4)
    before = adaptive.rate
    adaptive.maybe_increase(21.5)
    assert adaptive.rate == pytest.approx(before * (1 + AdaptiveRate.STEP_AT_CEILING))

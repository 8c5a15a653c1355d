"""The shared cold start (real redis-server): with nothing learned, one limiter per namespace probes the gateway
and the others wait for what it learns; a dead prober's lock lapses; the wait is bounded. And the log that
matches a learned sliding window slot by slot, on a fake clock, in memory and in Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from imagegen_provider.transport import budget as budget_module
from imagegen_provider.transport import ratelimit as ratelimit_module
from imagegen_provider.transport.budget import SharedBudget
from imagegen_provider.transport.ratelimit import COLD_IN_FLIGHT, RateLimiter, RateLimits


def _limits(redis_url: str, namespace: str) -> RateLimits:
    return RateLimits(backend=redis_url.rsplit("/", 1)[0] + "/3", namespace=namespace)


async def _admitted(limiter: RateLimiter, *, within: float) -> bool:
    try:
        await asyncio.wait_for(limiter.acquire(), within)
    except TimeoutError:
        return False
    return True


async def _close(*limiters: RateLimiter) -> None:
    for limiter in limiters:
        await limiter.aclose()


async def test_one_limiter_probes_while_the_others_wait_for_what_it_learns(redis_url):
    limits = _limits(redis_url, f"cold-{uuid.uuid4().hex[:8]}")
    limiters = [RateLimiter(limits) for _ in range(4)]
    try:
        waiting = [asyncio.ensure_future(limiter.acquire()) for limiter in limiters]
        done, pending = await asyncio.wait(waiting, timeout=3.0)
        assert len(done) == 1 and len(pending) == 3
        prober = limiters[waiting.index(done.pop())]
        others = [limiter for limiter in limiters if limiter is not prober]

        # The prober's first answer ends its single probe: then at most COLD_IN_FLIGHT requests at once
        # until the gateway first refuses one.
        prober.observe_headers({})
        for _ in range(COLD_IN_FLIGHT - 1):
            assert await _admitted(prober, within=1.0)
        assert not await _admitted(prober, within=0.5)
        prober.release()
        assert await _admitted(prober, within=1.0)
        assert not any(task.done() for task in pending)

        # A token bucket's burst of 429s with Retry-After, then an acceptance: the rate is learned, shared,
        # and the others start.
        await prober.on_rate_limited(0.2)
        assert prober.requests_per_minute is not None
        await asyncio.sleep(0.25)
        await prober.on_accepted(sent_at=time.time())
        done, pending = await asyncio.wait(pending, timeout=2.0)
        assert not pending
        assert {round(limiter.requests_per_minute or 0, 6) for limiter in others} == {
            round(prober.requests_per_minute, 6)}
    finally:
        for task in waiting:
            task.cancel()
        await _close(*limiters)


async def test_a_dead_probers_lock_lapses_and_another_limiter_probes(redis_url, monkeypatch):
    monkeypatch.setattr(budget_module, "PROBE_LOCK_SECONDS", 0.6)
    limits = _limits(redis_url, f"dead-{uuid.uuid4().hex[:8]}")
    dead, alive = RateLimiter(limits), RateLimiter(limits)
    try:
        assert await _admitted(dead, within=1.0)
        # ``dead`` never calls again (a killed process): its lock is not renewed and lapses.
        assert await _admitted(alive, within=3.0)
    finally:
        await _close(dead, alive)


async def test_a_prober_that_stops_hands_the_probe_on_at_once(redis_url):
    limits = _limits(redis_url, f"stop-{uuid.uuid4().hex[:8]}")
    first, second = RateLimiter(limits), RateLimiter(limits)
    try:
        assert await _admitted(first, within=1.0)
        assert not await _admitted(second, within=0.6)
        await first.aclose()  # its work is done before it learned anything: the lock is released
        assert await _admitted(second, within=1.0)
    finally:
        await _close(first, second)


async def test_waiting_for_the_prober_is_bounded(redis_url, monkeypatch):
    monkeypatch.setattr(ratelimit_module, "COLD_WAIT_SECONDS", 0.8)
    limits = _limits(redis_url, f"bound-{uuid.uuid4().hex[:8]}")
    prober, waiter = RateLimiter(limits), RateLimiter(limits)
    try:
        assert await _admitted(prober, within=1.0)
        keep_renewing = asyncio.ensure_future(prober.acquire())  # alive, probing, never learning anything
        assert await _admitted(waiter, within=3.0)
        keep_renewing.cancel()
    finally:
        await _close(prober, waiter)


async def test_without_probe_first_nobody_waits(redis_url):
    namespace = f"noprobe-{uuid.uuid4().hex[:8]}"
    limits = RateLimits(backend=redis_url, namespace=namespace, probe_first=False)
    limiters = [RateLimiter(limits) for _ in range(3)]
    try:
        results = await asyncio.gather(*(_admitted(limiter, within=1.0) for limiter in limiters))
        assert results == [True, True, True]
    finally:
        await _close(*limiters)


# --- the learned sliding window's log, on a fake clock ----------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def budget(request, redis_url):
    backend = None if request.param == "memory" else redis_url.rsplit("/", 1)[0] + "/4"
    shared = SharedBudget(backend, f"slots-{uuid.uuid4().hex[:8]}")
    yield shared
    await shared.aclose()


async def test_slot_log_admits_capacity_per_span_and_frees_the_oldest(budget):
    t = time.time()
    assert [await budget.take_slot(3, now=t + i * 0.1, span=1.0) for i in range(3)] == [0.0, 0.0, 0.0]
    assert await budget.take_slot(3, now=t + 0.3, span=1.0) == pytest.approx(0.7, abs=1e-3)
    # The first slot leaves the window at t + 1.
    assert await budget.take_slot(3, now=t + 1.01, span=1.0) == 0.0
    assert await budget.take_slot(3, now=t + 1.02, span=1.0) == pytest.approx(0.08, abs=1e-3)


async def test_a_refused_request_gives_its_slot_back(budget):
    t = time.time()
    for i in range(3):
        assert await budget.take_slot(3, now=t + i * 0.1, span=5.0) == 0.0
    assert await budget.take_slot(3, now=t + 0.3, span=5.0) > 0
    await budget.give_back_slot(t + 0.2 + 0.01)  # refused; it was sent just after it was admitted
    assert await budget.take_slot(3, now=t + 0.4, span=5.0) == 0.0
    # Nothing admitted in the second before a refusal: nothing to give back.
    await budget.give_back_slot(t + 3.0)
    assert await budget.take_slot(3, now=t + 0.5, span=5.0) > 0


async def test_the_log_starts_from_what_the_gateway_accepted_once(budget):
    t = time.time()
    for i in range(2):
        await budget.record_accepted(t - 2.0 + i * 0.1)
    await budget.seed_window()
    await budget.seed_window()  # a second process taking up the shape: not counted twice
    assert await budget.take_slot(3, now=t, span=5.0) == 0.0
    assert await budget.take_slot(3, now=t, span=5.0) == pytest.approx(3.0, abs=1e-3)


async def test_one_process_starts_with_few_in_flight_and_adds_one_per_accepted_answer():
    limiter = RateLimiter(RateLimits())
    try:
        assert await _admitted(limiter, within=1.0)  # the probe
        limiter.observe_headers({})  # its answer, announcing nothing
        for _ in range(COLD_IN_FLIGHT - 1):
            assert await _admitted(limiter, within=1.0)
        assert not await _admitted(limiter, within=0.3)
        await limiter.on_accepted(sent_at=time.time())  # one more in flight per accepted answer
        assert await _admitted(limiter, within=1.0)
        assert not await _admitted(limiter, within=0.3)
        await limiter.on_rate_limited(0.0)  # the first 429: from now on the learned rate paces it
        assert await _admitted(limiter, within=1.0)
    finally:
        await limiter.aclose()

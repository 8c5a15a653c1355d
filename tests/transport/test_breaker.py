"""The circuit breaker on its own: opens only after failure-only answers for its whole period, wakes guarded
waiters when it does, and a success resets it."""

from __future__ import annotations

import asyncio

import pytest

from imagegen_provider.transport.breaker import CircuitBreaker
from imagegen_provider.wire.errors import CircuitOpenError


async def test_opens_after_its_period_and_wakes_every_waiter():
    breaker = CircuitBreaker(0.2)
    breaker.failed("RateLimitError")
    breaker.raise_if_open()  # not yet
    waiters = [asyncio.ensure_future(breaker.guard(asyncio.sleep(30))) for _ in range(3)]
    done, pending = await asyncio.wait(waiters, timeout=5)
    assert not pending
    for task in done:
        with pytest.raises(CircuitOpenError, match="RateLimitError"):
            task.result()
    assert breaker.is_open
    with pytest.raises(CircuitOpenError):
        breaker.raise_if_open()


async def test_success_resets_the_period():
    breaker = CircuitBreaker(0.3)
    breaker.failed("ServerError")
    await asyncio.sleep(0.2)
    breaker.succeeded()
    breaker.failed("ServerError")
    await asyncio.sleep(0.2)
    assert not breaker.is_open  # 0.4 s of failures in all, but never 0.3 s in a row
    assert await breaker.guard(asyncio.sleep(0, result="done")) == "done"


async def test_disabled_breaker_never_opens():
    breaker = CircuitBreaker(0)
    breaker.failed("GatewayConnectionError")
    await asyncio.sleep(0.05)
    assert not breaker.is_open
    assert await breaker.guard(asyncio.sleep(0, result=1)) == 1

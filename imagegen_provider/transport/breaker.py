"""Circuit breaker: a gateway that refuses or fails everything for too long stops the run, in bounded time.

Retries and 429 pauses are each bounded, but a gateway answering 429 (or 5xx, or nothing) to every request keeps
a batch of thousands retrying for hours. The breaker watches the answers of one client: when nothing has
succeeded for ``seconds`` while every answer was a refusal or a failure, it opens, for good. Every caller then
gets a fatal :class:`CircuitOpenError`: those about to send, those sleeping between attempts, and those queued
for a slot or a rate budget (their waits run under :meth:`CircuitBreaker.guard`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from imagegen_provider.wire.errors import CircuitOpenError

T = TypeVar("T")


class CircuitBreaker:
    """:param seconds: how long failure-only answers may last; ``0`` or less disables the breaker.
    :param clock: monotonic seconds (tests may pass a fake one)."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._failing_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._opened: asyncio.Event | None = None
        self._reason = ""

    @property
    def is_open(self) -> bool:
        return self._opened is not None and self._opened.is_set()

    def _event(self) -> asyncio.Event:
        if self._opened is None:
            self._opened = asyncio.Event()
        return self._opened

    def succeeded(self) -> None:
        """An answer that was not a refusal or failure: the gateway works."""
        self._failing_since = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def failed(self, reason: str) -> None:
        """A 429, a 5xx or a transport error (timeouts included)."""
        if self.seconds <= 0 or self.is_open:
            return
        self._reason = reason
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
            # A timer, not only a check on the next answer: callers asleep in a pause must wake up too.
            self._timer = asyncio.get_running_loop().call_later(self.seconds, self._expire)
        elif now - self._failing_since >= self.seconds:
            self._open()

    def _expire(self) -> None:
        self._timer = None
        if self._failing_since is not None:
            self._open()

    def _open(self) -> None:
        self._event().set()

    def error(self) -> CircuitOpenError:
        return CircuitOpenError(
            f"circuit open: nothing succeeded for {self.seconds:g} s, every answer was a refusal or a failure"
            + (f" (last: {self._reason})" if self._reason else "")
        )

    def raise_if_open(self) -> None:
        if self.is_open:
            raise self.error()

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``, unless the breaker opens first: then cancel it and raise ``CircuitOpenError``."""
        self.raise_if_open()
        if self.seconds <= 0:
            return await awaitable
        task = asyncio.ensure_future(awaitable)
        opened = asyncio.ensure_future(self._event().wait())
        try:
            await asyncio.wait({task, opened}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.done() and not task.cancelled():
            return task.result()
        raise self.error()

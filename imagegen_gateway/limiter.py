"""The gateway's own rate limits: one limiter for requests, one for images, in one of three shapes.

* ``token-bucket`` (default): what OpenAI-style gateways document (limits replenish continuously, a burst up
  to the bucket's capacity is allowed) and what their ``x-ratelimit-*`` headers describe;
* ``sliding-window``: at most N accepted in any 60 seconds (refused requests are not counted);
* ``fixed-window``: at most N per calendar minute (resets at :00 of the wall clock), refused requests
  counted too: what LiteLLM's proxy does with a deployment ``rpm`` and ``enforce_model_rate_limits``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

Clock = Callable[[], float]

#: The limiter shapes the gateway can imitate (``--limiter``).
SHAPES = ("token-bucket", "sliding-window", "fixed-window")


def format_duration(seconds: float) -> str:
    """Duration in OpenAI's header style: ``"20ms"``, ``"1.5s"``, ``"6m0s"``, ``"1h2m3s"``."""
    if seconds <= 0:
        return "0s"
    millis = math.ceil(seconds * 1000)
    if millis < 1000:
        return f"{millis}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{minutes}m{round(rest, 3):g}s"
    return f"{hours}h{text}" if hours else text


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class TokenBucket:
    """Refills at ``per_minute / 60`` tokens a second up to ``capacity``; starts full."""

    counts_refused = False

    def __init__(self, per_minute: float, capacity: float | None, clock: Clock = time.monotonic) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        # One second's worth by default: a steady client is never throttled, a thundering herd is.
        self.capacity = capacity if capacity is not None else max(1.0, self.rate)
        self._clock = clock
        self._tokens = self.capacity
        self._updated = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        return self._tokens

    def wait_time(self, amount: float = 1.0) -> float:
        """Seconds until ``amount`` tokens may be taken (0 when they may be taken now).

        A request for more than the capacity is allowed once the bucket is full (leaving it in debt), so a
        large ``n`` is slowed down rather than refused forever.
        """
        tokens = self._refill()
        needed = min(amount, self.capacity)
        if tokens >= needed:
            return 0.0
        return (needed - tokens) / self.rate

    def take(self, amount: float = 1.0) -> None:
        self._refill()
        self._tokens -= amount

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self._refill()))

    @property
    def time_to_full(self) -> float:
        return max(0.0, (self.capacity - self._refill()) / self.rate)

    def reset(self) -> None:
        self._tokens = self.capacity
        self._updated = self._clock()


class Window(Protocol):
    """What :class:`GatewayLimiter` needs of one limit, whatever its shape."""

    per_minute: float
    #: Whether a refused request is counted against the limit too.
    counts_refused: bool

    def wait_time(self, amount: float = 1.0) -> float: ...

    def take(self, amount: float = 1.0) -> None: ...

    @property
    def remaining(self) -> int: ...

    @property
    def time_to_full(self) -> float: ...

    def reset(self) -> None: ...


class SlidingWindow:
    """At most ``per_minute`` accepted in any 60 seconds; each accepted request leaves the window 60 s later."""

    counts_refused = False
    SPAN = 60.0

    def __init__(self, per_minute: float, clock: Clock = time.monotonic) -> None:
        self.per_minute = per_minute
        self.capacity = max(1, math.floor(per_minute))
        self._clock = clock
        self._taken: deque[tuple[float, float]] = deque()

    def _used(self) -> float:
        horizon = self._clock() - self.SPAN
        while self._taken and self._taken[0][0] <= horizon:
            self._taken.popleft()
        return sum(amount for _, amount in self._taken)

    def wait_time(self, amount: float = 1.0) -> float:
        needed = min(amount, self.capacity)
        used = self._used()
        if used + needed <= self.capacity:
            return 0.0
        now, freed = self._clock(), 0.0
        for at, taken in self._taken:
            freed += taken
            if used - freed + needed <= self.capacity:
                return max(0.001, at + self.SPAN - now)
        return self.SPAN

    def take(self, amount: float = 1.0) -> None:
        self._taken.append((self._clock(), amount))

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.capacity - self._used()))

    @property
    def time_to_full(self) -> float:
        self._used()
        return max(0.0, self._taken[-1][0] + self.SPAN - self._clock()) if self._taken else 0.0

    def reset(self) -> None:
        self._taken.clear()


class FixedWindow:
    """At most ``per_minute`` per calendar minute of the wall clock, refused requests counted too."""

    counts_refused = True

    def __init__(self, per_minute: float, clock: Clock = time.time) -> None:
        self.per_minute = per_minute
        self.capacity = max(1, math.floor(per_minute))
        self._clock = clock
        self._minute = -1
        self._count = 0.0

    def _used(self) -> float:
        minute = math.floor(self._clock() / 60.0)
        if minute != self._minute:
            self._minute, self._count = minute, 0.0
        return self._count

    def wait_time(self, amount: float = 1.0) -> float:
        if self._used() + min(amount, self.capacity) <= self.capacity:
            return 0.0
        return self.time_to_full

    def take(self, amount: float = 1.0) -> None:
        self._used()
        self._count += amount

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.capacity - self._used()))

    @property
    def time_to_full(self) -> float:
        return max(0.001, 60.0 - self._clock() % 60.0)

    def reset(self) -> None:
        self._minute, self._count = -1, 0.0


def make_window(shape: str, per_minute: float, burst: float | None, clock: Clock | None = None) -> Window:
    """One limit of shape ``shape`` (see :data:`SHAPES`); ``burst`` applies to the token bucket only."""
    if shape == "sliding-window":
        return SlidingWindow(per_minute, clock or time.monotonic)
    if shape == "fixed-window":
        return FixedWindow(per_minute, clock or time.time)
    return TokenBucket(per_minute, burst, clock or time.monotonic)


@dataclass
class Decision:
    """Outcome of :meth:`GatewayLimiter.acquire`: allowed or not, how long to wait, which headers to send."""

    allowed: bool
    retry_after: float = 0.0
    #: ``"requests"`` or ``"images"``: the limit that refused the request.
    limit: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class GatewayLimiter:
    """Both limits, taken together: a request is admitted only if every configured limit has room."""

    def __init__(
        self,
        rpm: float | None = None,
        ipm: float | None = None,
        burst: float | None = None,
        image_burst: float | None = None,
        *,
        shape: str = "token-bucket",
        clock: Clock | None = None,
    ) -> None:
        self.requests = make_window(shape, rpm, burst, clock) if rpm else None
        self.images = make_window(shape, ipm, image_burst, clock) if ipm else None

    @property
    def enabled(self) -> bool:
        return self.requests is not None or self.images is not None

    def acquire(self, images: int = 1) -> Decision:
        """Take one request token and ``images`` image tokens, or none at all."""
        waits: dict[str, float] = {}
        if self.requests is not None:
            waits["requests"] = self.requests.wait_time(1)
        if self.images is not None:
            waits["images"] = self.images.wait_time(images)
        blocking = {name: wait for name, wait in waits.items() if wait > 0}
        if blocking:
            self._count_refused(images)
            limit = max(blocking, key=lambda name: blocking[name])
            return Decision(False, retry_after=blocking[limit], limit=limit, headers=self.headers())
        if self.requests is not None:
            self.requests.take(1)
        if self.images is not None:
            self.images.take(images)
        return Decision(True, headers=self.headers())

    def _count_refused(self, images: int) -> None:
        for window, amount in ((self.requests, 1), (self.images, images)):
            if window is not None and window.counts_refused:
                window.take(amount)

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-{limit,remaining,reset}-{requests,images}`` for the configured limits."""
        headers: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("images", self.images)):
            if bucket is None:
                continue
            headers[f"x-ratelimit-limit-{name}"] = _number(bucket.per_minute)
            headers[f"x-ratelimit-remaining-{name}"] = str(bucket.remaining)
            headers[f"x-ratelimit-reset-{name}"] = format_duration(bucket.time_to_full)
        return headers

    def reset(self) -> None:
        for bucket in (self.requests, self.images):
            if bucket is not None:
                bucket.reset()


def retry_after_headers(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (rounded up, at least 1, as HTTP requires integers) and the precise
    ``retry-after-ms`` that OpenAI-style clients prefer."""
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }

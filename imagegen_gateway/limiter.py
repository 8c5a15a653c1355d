"""The gateway's own rate limits: one token bucket for requests, one for images.

Token buckets because that is what OpenAI-style gateways document (limits replenish continuously, a burst
up to the bucket's capacity is allowed) and what their ``x-ratelimit-*`` headers describe: the remaining
tokens and the time until the bucket is full again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]


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


@dataclass
class Decision:
    """Outcome of :meth:`GatewayLimiter.acquire`: allowed or not, how long to wait, which headers to send."""

    allowed: bool
    retry_after: float = 0.0
    #: ``"requests"`` or ``"images"``: the limit that refused the request.
    limit: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class GatewayLimiter:
    """Both buckets, taken together: a request is admitted only if every configured bucket has room."""

    def __init__(
        self,
        rpm: float | None = None,
        ipm: float | None = None,
        burst: float | None = None,
        image_burst: float | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.requests = TokenBucket(rpm, burst, clock) if rpm else None
        self.images = TokenBucket(ipm, image_burst, clock) if ipm else None

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
            limit = max(blocking, key=lambda name: blocking[name])
            return Decision(False, retry_after=blocking[limit], limit=limit, headers=self.headers())
        if self.requests is not None:
            self.requests.take(1)
        if self.images is not None:
            self.images.take(images)
        return Decision(True, headers=self.headers())

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-{limit,remaining,reset}-{requests,images}`` for the configured buckets."""
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

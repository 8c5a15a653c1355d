"""One rate limiter for every request of a client: requests/min, images/min, requests in flight, and a
shared pause when the gateway answers 429.

The budgets are moving windows kept by the ``limits`` package, in process memory by default or in Redis
(``redis://host:port/db``) so that every process and worker using the same connection draws from one budget.
The 429 pause lives next to them: in memory, or as one Redis key that every limiter polls before sending.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from imagegen_provider.transport.retry import header_lookup

log = logging.getLogger(__name__)

_DURATION = re.compile(r"(?P<value>\d+(?:\.\d+)?)(?P<unit>ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | None) -> float | None:
    """OpenAI's ``x-ratelimit-reset-*`` durations: ``"1s"``, ``"6m0s"``, ``"120ms"``, ``"1.5s"``."""
    if not text:
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    matches = list(_DURATION.finditer(text))
    if not matches:
        return None
    return sum(float(m.group("value")) * _UNIT_SECONDS[m.group("unit")] for m in matches)


def per_minute_item(per_minute: float, min_amount: int = 1) -> RateLimitItem:
    """A moving window equivalent to ``per_minute``, as short as an integer amount allows.

    A 60-second window would let a client send a whole minute's budget in one burst, which gateways that
    enforce limits over shorter periods (as OpenAI does) answer with 429s; 1200/min becomes 20 per second.

    :param min_amount: the window must hold at least this many (the images budget: a request for ``n``
        images must fit in one window, or it would be counted as fewer images than it asks for).
    """
    rate = max(1, round(per_minute))
    divisor = math.gcd(rate, 60)
    amount, seconds = rate // divisor, 60 // divisor
    if amount < min_amount:
        scale = math.ceil(min_amount / amount)
        amount, seconds = amount * scale, seconds * scale
    return RateLimitItemPerSecond(amount, seconds)


#: The largest ``n`` of one request (every documented gateway caps it at 10).
MAX_IMAGES_PER_REQUEST = 10


@dataclass(frozen=True)
class RateLimits:
    """Configured limits; ``None`` means no limit of that kind."""

    requests_per_minute: float | None = None
    images_per_minute: float | None = None
    max_in_flight: int = 16
    #: ``None``/``"memory://"`` for in-process, ``redis://…`` for a budget shared across processes.
    backend: str | None = None
    #: Separates budgets in a shared backend: usually the connection id.
    namespace: str = "default"

    def __repr__(self) -> str:
        # The backend URL may carry a Redis password: never print it.
        backend = None if self.backend is None else _without_password(self.backend)
        return (
            f"RateLimits(requests_per_minute={self.requests_per_minute!r}, "
            f"images_per_minute={self.images_per_minute!r}, max_in_flight={self.max_in_flight!r}, "
            f"backend={backend!r}, namespace={self.namespace!r})"
        )


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    user = parts.username or ""
    netloc = f"{user}:***@{host}" if user else f":***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class RateLimiter:
    """Admission control for one gateway.

    :param limits: the configured limits; the gateway's ``x-ratelimit-limit-*`` headers tighten them.
    """

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self._rpm = limits.requests_per_minute
        self._ipm = limits.images_per_minute
        self._storage: Storage | None = None
        self._strategy: MovingWindowRateLimiter | None = None
        self._redis: Any = None
        self._pause_until = 0.0
        self._in_flight: asyncio.Semaphore | None = None
        self._rate_limited = 0
        self._recent_429: deque[float] = deque(maxlen=256)

    # -- configuration -------------------------------------------------------------------------

    @property
    def requests_per_minute(self) -> float | None:
        return self._rpm

    @property
    def images_per_minute(self) -> float | None:
        return self._ipm

    @property
    def shared(self) -> bool:
        return bool(self.limits.backend) and not self.limits.backend.startswith("memory")

    @property
    def rate_limited_count(self) -> int:
        """How many 429s this limiter was told about."""
        return self._rate_limited

    def _key(self, kind: str) -> tuple[str, str]:
        return ("imagegen", f"{self.limits.namespace}:{kind}")

    def _ensure_started(self) -> None:
        # Created lazily, inside the running loop: limits' memory storage and redis clients bind to it.
        if self._strategy is not None:
            return
        backend = self.limits.backend
        if self.shared:
            import redis.asyncio as aioredis

            uri = backend if backend.startswith("async+") else "async+" + backend
            self._storage = storage_from_string(uri, implementation="redispy")
            self._redis = aioredis.from_url(backend.removeprefix("async+"))
        else:
            self._storage = MemoryStorage()
        self._strategy = MovingWindowRateLimiter(self._storage)
        self._in_flight = asyncio.Semaphore(max(1, self.limits.max_in_flight))

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    # -- admission -----------------------------------------------------------------------------

    def in_flight(self) -> asyncio.Semaphore:
        """Hold this while a request is on the wire."""
        self._ensure_started()
        assert self._in_flight is not None
        return self._in_flight

    async def acquire(self, images: int = 1) -> float:
        """Wait until one request carrying ``images`` images may be sent. Returns the seconds waited."""
        self._ensure_started()
        assert self._strategy is not None
        started = time.monotonic()
        while True:
            pause = await self._pause_remaining()
            if pause > 0:
                await asyncio.sleep(pause + random.uniform(0, 0.05))
                continue
            wait = await self._try_take(images)
            if wait <= 0:
                return time.monotonic() - started
            # Jitter so that processes sharing one budget do not wake in lockstep.
            await asyncio.sleep(wait + random.uniform(0, min(0.02, wait)))

    async def _try_take(self, images: int) -> float:
        """Take one request and ``images`` images from the budgets, or say how long to wait."""
        assert self._strategy is not None
        checks: list[tuple[RateLimitItem, tuple[str, str], int]] = []
        if self._rpm:
            checks.append((per_minute_item(self._rpm), self._key("requests"), 1))
        if self._ipm:
            item = per_minute_item(self._ipm, min_amount=MAX_IMAGES_PER_REQUEST)
            checks.append((item, self._key("images"), min(images, item.amount)))
        for item, key, cost in checks:
            if not await self._strategy.test(item, *key, cost=cost):
                return await self._wait_for(item, key)
        for item, key, cost in checks:
            if not await self._strategy.hit(item, *key, cost=cost):
                # Another coroutine or process took the slot between test and hit: wait, whichever budget it
                # was. A request already counted against an earlier budget is a small over-count; sending it
                # anyway would be an over-send of this one.
                return await self._wait_for(item, key)
        return 0.0

    async def _wait_for(self, item: RateLimitItem, key: tuple[str, str]) -> float:
        assert self._strategy is not None
        stats = await self._strategy.get_window_stats(item, *key)
        return max(0.001, stats.reset_time - time.time())

    # -- feedback from the gateway -------------------------------------------------------------

    async def _pause_remaining(self) -> float:
        now = time.time()
        if self._redis is not None:
            value = await self._redis.get(f"imagegen:{self.limits.namespace}:pause_until")
            if value is not None:
                self._pause_until = max(self._pause_until, float(value))
        return self._pause_until - now

    async def pause(self, seconds: float) -> None:
        """Stop every request of this limiter (and, with a shared backend, of every process) for ``seconds``."""
        self._ensure_started()
        until = time.time() + max(0.0, seconds)
        if until <= self._pause_until:
            return
        self._pause_until = until
        if self._redis is not None:
            key = f"imagegen:{self.limits.namespace}:pause_until"
            current = await self._redis.get(key)
            if current is None or float(current) < until:
                await self._redis.set(key, repr(until), px=max(1, int(seconds * 1000) + 1000))

    async def on_rate_limited(self, retry_after: float | None) -> None:
        """A 429 arrived: pause everyone for Retry-After (or a short default) so waiting requests do not
        hit the wall one after another."""
        self._rate_limited += 1
        self._recent_429.append(time.monotonic())
        await self.pause(retry_after if retry_after is not None else 1.0)

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Tune the budgets from ``x-ratelimit-limit-requests`` / ``-images`` when the gateway sends them.

        The gateway's own limit wins when it is lower than the configured one (or none was configured).
        """
        headers = header_lookup(headers)
        for header, attr in (("x-ratelimit-limit-requests", "_rpm"), ("x-ratelimit-limit-images", "_ipm")):
            value = headers.get(header)
            if not value:
                continue
            try:
                announced = float(value)
            except ValueError:
                continue
            current = getattr(self, attr)
            if announced > 0 and math.isfinite(announced) and (current is None or announced < current):
                log.info("Gateway announces %s=%s; limiting to it", header, value)
                setattr(self, attr, announced)

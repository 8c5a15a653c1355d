"""One rate limiter for every request of a client: requests/min, images/min, requests in flight, and a
shared pause when the gateway answers 429.

Within a process, sends are paced evenly (GCRA, below) with a burst of half a second's worth. With a shared
backend (``redis://host:port/db``) every process also draws from one budget kept by the ``limits`` package
as moving windows in Redis, so that all workers using the same connection stay under one limit. The 429 pause
lives next to the budgets: in memory, or as one Redis key that every limiter polls before sending.
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


class _Window(RateLimitItemPerSecond):
    """A moving window whose storage key ignores its size.

    ``limits`` puts the amount in the key, so a window resized at run time (a limit learned from headers or
    from 429s) would start empty and let a burst through; with one key the requests already counted stay
    counted, whatever the current size.
    """

    def key_for(self, *identifiers: str) -> str:
        return "/".join([self.namespace, *identifiers])


def _window(item: RateLimitItem) -> _Window:
    return _Window(item.amount, item.multiples)


#: Requests (or images) that may leave at once after an idle spell, in seconds' worth of the rate. Gateways
#: enforce per-minute limits over short periods, typically a token bucket holding about one second's worth;
#: staying at half of that leaves their bucket half full, so network jitter never meets an empty one.
BURST_SECONDS = 0.5


class _Pacer:
    """Generic cell rate algorithm: each send reserves ``cost / rate`` seconds on a virtual schedule; a send
    may go when the schedule is less than ``burst`` sends ahead of now.

    Hand-written (a dozen lines) because the ``limits`` package only offers windows: a window hands out its
    whole budget the moment it frees, so sends leave in bursts at every window boundary, and a token-bucket
    gateway meets each burst with an empty bucket. Paced sends leave evenly. Its state is one float, so the
    rate can change at every call (limits learned from headers or from 429s).
    """

    def __init__(self) -> None:
        self._schedule = 0.0

    def delay(self, now: float, rate: float, burst: float, cost: float = 1.0) -> float:
        """Reserve ``cost`` at ``rate`` per second and return 0, or return how long to wait (nothing reserved)."""
        interval = 1.0 / rate
        after = max(self._schedule, now) + cost * interval
        earliest = after - max(burst, cost) * interval
        if earliest > now:
            return earliest - now
        self._schedule = after
        return 0.0

    def refund(self, rate: float, cost: float = 1.0) -> None:
        self._schedule -= cost / rate

    def drain(self, resume_at: float, rate: float, burst: float) -> None:
        """No burst credit until ``resume_at``: after a 429 the gateway's bucket is empty, so sends resume
        one interval apart instead of all at once."""
        self._schedule = max(self._schedule, resume_at + (max(burst, 1.0) - 1.0) / rate)


#: Before the gateway has answered once, a client with no configured limit sends one request at a time (at
#: most one per this many seconds, so that a dropped first request cannot stall it): the first answer
#: usually announces the limit in ``x-ratelimit-*`` headers, and a blind first wave would only meet it.
PROBE_INTERVAL = 2.0


class _AdaptiveRate:
    """Learns a gateway's hidden request rate from 429s: multiplicative decrease, slow increase (AIMD).

    Used only when neither the configuration nor ``x-ratelimit-*`` headers give a limit. The first 429 sets
    the rate to what the gateway actually accepted in the last second (requests sent minus those refused);
    further 429s cut it by 15% at most once a second; four seconds without 429s raise it by 1/s (or 2%,
    whichever is larger).
    """

    DECREASE = 0.85
    MIN_INTERVAL = 1.0
    #: Quiet time before probing a higher rate: long enough for a gateway's burst allowance to drain, so
    #: that the probe is answered before the next one.
    PROBE_AFTER = 4.0

    def __init__(self) -> None:
        self.rate: float | None = None
        self._sent: deque[float] = deque(maxlen=4096)
        self._refused: deque[float] = deque(maxlen=4096)
        self._last_change = 0.0
        self._last_refusal = 0.0
        self._first_refusal = 0.0

    def sent(self, now: float) -> None:
        self._sent.append(now)

    def refused(self, now: float) -> None:
        self._refused.append(now)
        self._last_refusal = now
        if self.rate is None or now - self._first_refusal < self.MIN_INTERVAL:
            # The first wave's refusals arrive one by one: keep refining what the gateway accepted, over a
            # window that starts a second before the first refusal and grows (a sliding window would drop
            # the wave's sends before their refusals, and conclude the gateway accepted nothing).
            if self.rate is None:
                self._first_refusal = now
            since = self._first_refusal - 1.0
            sent = sum(1 for t in self._sent if t >= since)
            refused = sum(1 for t in self._refused if t >= since)
            estimate = max(1.0, (sent - refused) / (now - since))
            self.rate = estimate if self.rate is None else min(self.rate, estimate)
            self._last_change = now
            log.debug("First refusals from the gateway; pacing at %.2f requests/s", self.rate)
            return
        elif now - self._last_change >= self.MIN_INTERVAL:
            self.rate = max(1.0 / 60.0, self.rate * self.DECREASE)
            self._last_change = now
        else:
            return
        log.info("Gateway refused a request without announcing its limit; pacing at %.2f requests/s", self.rate)

    def maybe_increase(self, now: float) -> None:
        if self.rate is None or now - self._last_change < self.PROBE_AFTER or now - self._last_refusal < self.PROBE_AFTER:
            return
        self.rate += max(1.0 if self.rate >= 1 else 1.0 / 60.0, 0.02 * self.rate)
        self._last_change = now

    def per_minute(self) -> float | None:
        return None if self.rate is None else self.rate * 60.0


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
    #: With no configured request limit, send one request and wait for the gateway's first answer (which
    #: usually announces its limit) before sending more.
    probe_first: bool = True

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
        self._request_pacer = _Pacer()
        self._image_pacer = _Pacer()
        self._rate_limited = 0
        # With no configured limit the client learns one: from headers, or else from 429s.
        self._adaptive: _AdaptiveRate | None = _AdaptiveRate() if limits.requests_per_minute is None else None
        self._answered = limits.requests_per_minute is not None or not limits.probe_first
        self._last_probe = -PROBE_INTERVAL

    # -- configuration -------------------------------------------------------------------------

    @property
    def requests_per_minute(self) -> float | None:
        """The request limit in force: configured, announced by the gateway, or learned from 429s."""
        if self._rpm is None and self._adaptive is not None:
            return self._adaptive.per_minute()
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
        now = time.monotonic()
        if not self._answered:
            if now - self._last_probe < PROBE_INTERVAL:
                return min(0.05, PROBE_INTERVAL - (now - self._last_probe))
            self._last_probe = now
        if self._adaptive is not None:
            self._adaptive.maybe_increase(now)
        rpm, ipm = self.requests_per_minute, self._ipm
        images = min(images, MAX_IMAGES_PER_REQUEST)
        if rpm:
            rate = rpm / 60.0
            wait = self._request_pacer.delay(now, rate, max(1.0, rate * BURST_SECONDS))
            if wait > 0:
                return wait
        if ipm:
            rate = ipm / 60.0
            wait = self._image_pacer.delay(now, rate, max(MAX_IMAGES_PER_REQUEST, rate * BURST_SECONDS), images)
            if wait > 0:
                if rpm:
                    self._request_pacer.refund(rpm / 60.0)
                return wait
        if self.shared:
            wait = await self._take_shared(rpm, ipm, images)
            if wait > 0:
                if rpm:
                    self._request_pacer.refund(rpm / 60.0)
                if ipm:
                    self._image_pacer.refund(ipm / 60.0, images)
                return wait
        if self._adaptive is not None:
            self._adaptive.sent(now)
        return 0.0

    async def _take_shared(self, rpm: float | None, ipm: float | None, images: int) -> float:
        """Draw from the budgets every process shares (moving windows in Redis)."""
        assert self._strategy is not None
        checks: list[tuple[RateLimitItem, tuple[str, str], int]] = []
        if rpm:
            checks.append((_window(per_minute_item(rpm)), self._key("requests"), 1))
        if ipm:
            item = _window(per_minute_item(ipm, min_amount=MAX_IMAGES_PER_REQUEST))
            checks.append((item, self._key("images"), min(images, item.amount)))
        for item, key, cost in checks:
            if not await self._strategy.test(item, *key, cost=cost):
                return await self._wait_for(item, key)
        for item, key, cost in checks:
            if not await self._strategy.hit(item, *key, cost=cost):
                # Another process took the slot between test and hit: wait, whichever budget it was. A
                # request already counted against an earlier budget is a small over-count; sending it anyway
                # would be an over-send of this one.
                return await self._wait_for(item, key)
        return 0.0

    async def _wait_for(self, item: RateLimitItem, key: tuple[str, str]) -> float:
        assert self._strategy is not None
        stats = await self._strategy.get_window_stats(item, *key)
        return max(0.001, stats.reset_time - time.time())

    # -- feedback from the gateway -------------------------------------------------------------

    @property
    def _pause_key(self) -> str:
        return f"imagegen:{self.limits.namespace}:pause_until"

    async def _pause_remaining(self) -> float:
        now = time.time()
        if self._redis is not None:
            value = await self._redis.zscore(self._pause_key, "until")
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
            # A sorted set with ZADD GT keeps the latest deadline atomically (Redis >= 6.2): two processes
            # rate-limited at once can never shorten each other's pause. A deadline in the past is no pause,
            # so the key needs no expiry.
            await self._redis.zadd(self._pause_key, {"until": until}, gt=True)

    async def on_rate_limited(self, retry_after: float | None) -> None:
        """A 429 arrived: pause everyone for Retry-After (or a short default) so waiting requests do not
        hit the wall one after another."""
        self._rate_limited += 1
        self._answered = True
        now = time.monotonic()
        if self._adaptive is not None and self._rpm is None:
            self._adaptive.refused(now)
        seconds = retry_after if retry_after is not None else 1.0
        rpm = self.requests_per_minute
        if rpm:
            rate = rpm / 60.0
            self._request_pacer.drain(now + seconds, rate, max(1.0, rate * BURST_SECONDS))
        await self.pause(seconds)

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Tune the budgets from ``x-ratelimit-limit-requests`` / ``-images`` when the gateway sends them.

        The gateway's own limit wins when it is lower than the configured one (or none was configured).
        Called for every response, whatever its status: the first one ends the probing start.
        """
        self._answered = True
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

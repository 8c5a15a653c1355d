"""One rate limiter for every request of a client: requests/min, images/min, requests in flight, and a
shared pause when the gateway answers 429.

The ideas live in their own modules: :mod:`~imagegen_provider.transport.pacing` (even spacing, learning a
hidden rate, believing announced limits: pure) and :mod:`~imagegen_provider.transport.budget` (the budget and
pause shared across processes). This module composes them into admission control for one gateway.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from imagegen_provider.transport.budget import SharedBudget, is_shared_backend, per_minute_item
from imagegen_provider.transport.learner import (
    WINDOW_SECONDS,
    Episodes,
    WindowShape,
    identify,
    pause_without_retry_after,
    revised_capacity,
    window_start,
)
from imagegen_provider.transport.options import Option, option, read_float, read_int
from imagegen_provider.transport.pacing import (
    BURST_SECONDS,
    MAX_IMAGES_PER_REQUEST,
    PROBE_INTERVAL,
    AdaptiveRate,
    Pacer,
    announced_limit,
    parse_duration,
)
from imagegen_provider.transport.retry import MAX_RETRY_AFTER_SECONDS, header_lookup

log = logging.getLogger(__name__)

#: When the current task's request left (wall clock): set by the client before it sends, read when the answer
#: comes back, so that refusals and acceptances are counted by send time (what a gateway's window counts).
SENT_AT: ContextVar[float | None] = ContextVar("imagegen_sent_at", default=None)

#: How often a process looks for a window shape another process sharing the backend learned.
SHAPE_POLL_SECONDS = 1.0

__all__ = [
    "BURST_SECONDS", "MAX_IMAGES_PER_REQUEST", "RateLimiter", "RateLimits", "parse_duration", "per_minute_item",
]


@dataclass(frozen=True)
class RateLimits:
    """Configured limits; ``None`` means no limit of that kind."""

    requests_per_minute: float | None = option(
        Option("rpm", "--rpm", "Requests per minute (default: learned from the gateway).", read_float,
               zero_is_default=True),
        default=None,
    )
    images_per_minute: float | None = option(
        Option("images_per_minute", "--ipm", "Images per minute.", read_float, zero_is_default=True), default=None
    )
    max_in_flight: int = option(
        Option("max_in_flight", "--max-in-flight", "Requests in flight at once.", read_int, zero_is_default=True),
        default=16,
    )
    #: ``None``/``"memory://"`` for in-process, ``redis://…`` for a budget shared across processes.
    backend: str | None = option(
        Option("rate_limit_backend", "--rate-limit-backend",
               "redis://host:6379/0 to share --rpm/--ipm with every other process using the same backend."),
        default=None,
    )
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
    :param max_wait: the longest single wait (a 429 pause, a pacing interval): no announced or learned number
        makes a request wait longer than this at a time.
    """

    def __init__(self, limits: RateLimits, *, max_wait: float = MAX_RETRY_AFTER_SECONDS) -> None:
        self.limits = limits
        self.max_wait = max_wait
        self._rpm = limits.requests_per_minute
        self._ipm = limits.images_per_minute
        self._budget: SharedBudget | None = None
        self._pause_until = 0.0
        self._in_flight: asyncio.Semaphore | None = None
        self._request_pacer = Pacer()
        self._image_pacer = Pacer()
        self._rate_limited = 0
        # With no configured limit the client learns one: from headers, or else from 429s.
        self._adaptive: AdaptiveRate | None = AdaptiveRate() if limits.requests_per_minute is None else None
        self._answered = limits.requests_per_minute is not None or not limits.probe_first
        self._last_probe = -PROBE_INTERVAL
        #: The gateway's window, once identified (see :mod:`~imagegen_provider.transport.learner`).
        self._shape: WindowShape | None = None
        self._episodes = Episodes()
        self._shape_polled = 0.0
        self._rate_polled = 0.0
        #: Limiters alive on the shared backend (this one included), and this limiter's name among them.
        self._members = 1
        self._member_id = f"{id(self):x}-{random.getrandbits(32):x}"
        #: Send times of this process's accepted requests (the last few seconds' worth).
        self._accepted_here: deque[float] = deque(maxlen=4096)

    # -- configuration -------------------------------------------------------------------------

    @property
    def requests_per_minute(self) -> float | None:
        """The request limit in force: configured, announced by the gateway, or learned from 429s."""
        if self._rpm is None and self._shape is not None:
            return self._shape.per_minute
        if self._rpm is None and self._adaptive is not None:
            return self._adaptive.per_minute()
        return self._rpm

    @property
    def window_shape(self) -> WindowShape | None:
        """The gateway's window, when refusals without ``Retry-After`` identified one."""
        return self._shape

    @property
    def _learning(self) -> bool:
        return self._adaptive is not None and self._rpm is None

    @property
    def images_per_minute(self) -> float | None:
        return self._ipm

    @property
    def shared(self) -> bool:
        return is_shared_backend(self.limits.backend)

    @property
    def rate_limited_count(self) -> int:
        """How many 429s this limiter was told about."""
        return self._rate_limited

    def _started(self) -> SharedBudget:
        # Created lazily, inside the running loop.
        if self._budget is None:
            self._budget = SharedBudget(self.limits.backend, self.limits.namespace)
            self._in_flight = asyncio.Semaphore(max(1, self.limits.max_in_flight))
        return self._budget

    async def aclose(self) -> None:
        if self._budget is not None:
            await self._budget.aclose()

    # -- admission -----------------------------------------------------------------------------

    def in_flight(self) -> asyncio.Semaphore:
        """Hold this while a request is on the wire."""
        self._started()
        assert self._in_flight is not None
        return self._in_flight

    async def acquire(self, images: int = 1) -> float:
        """Wait until one request carrying ``images`` images may be sent. Returns the seconds waited."""
        self._started()
        started = time.monotonic()
        while True:
            pause = await self._pause_remaining()
            if pause > 0:
                await asyncio.sleep(min(pause, self.max_wait) + random.uniform(0, 0.05))
                continue
            wait = await self._try_take(images)
            if wait <= 0:
                return time.monotonic() - started
            # Jitter so that processes sharing one budget do not wake in lockstep.
            wait = min(wait, self.max_wait)
            await asyncio.sleep(wait + random.uniform(0, min(0.02, wait)))

    def _probing_wait(self, now: float) -> float:
        """Before the first answer, with no configured limit: one request per probe interval."""
        if self._answered:
            return 0.0
        if now - self._last_probe < PROBE_INTERVAL:
            return min(0.05, PROBE_INTERVAL - (now - self._last_probe))
        self._last_probe = now
        return 0.0

    def _request_rate(self, rpm: float) -> float:
        """This process's request rate (per second) under ``rpm``. A learned limit is everyone's: each process
        sharing the backend paces evenly at its share, so that the shared window (which admits a whole
        window's worth at once) never sees the processes' sends bunch up."""
        rate = rpm / 60.0
        return rate / self._members if self.shared and self._learning else rate

    def _take_local(self, now: float, rpm: float | None, ipm: float | None, images: int) -> float:
        if rpm:
            rate = self._request_rate(rpm)
            wait = self._request_pacer.delay(now, rate, max(1.0, rate * BURST_SECONDS))
            if wait > 0:
                return wait
        if ipm:
            rate = ipm / 60.0
            wait = self._image_pacer.delay(now, rate, max(MAX_IMAGES_PER_REQUEST, rate * BURST_SECONDS), images)
            if wait > 0:
                if rpm:
                    self._request_pacer.refund(self._request_rate(rpm))
                return wait
        return 0.0

    async def _try_take(self, images: int) -> float:
        """Take one request and ``images`` images from the budgets, or say how long to wait."""
        now = time.monotonic()
        wait = self._probing_wait(now)
        if wait > 0:
            return wait
        if self._adaptive is not None:
            before = self._adaptive.rate
            self._adaptive.maybe_increase(now)
            await self._share_rate_change(before, now, lock=AdaptiveRate.PROBE_AFTER)
        await self._adopt_shared_shape(now)
        if self._learning:
            await self._sync_shared_rate(now)
        rpm, ipm = self.requests_per_minute, self._ipm
        images = min(images, MAX_IMAGES_PER_REQUEST)
        # A learned sliding window is matched exactly (its slots used as they free, no even spacing): after a
        # first burst it frees at the burst's pace, and spacing would leave most of a minute unused.
        sliding = self._learning and self._shape is not None and self._shape.kind == "sliding"
        paced_rpm = None if sliding else rpm
        wait = self._take_local(now, paced_rpm, ipm, images)
        if wait > 0:
            return wait
        # A learned window is enforced through the budget's moving window even in one process: it keeps every
        # 60 s (and so every calendar minute) within the window's capacity, where the pacer alone allows a burst.
        if self.shared or (self._shape is not None and self._learning):
            wait = await self._started().take(rpm, ipm, images, whole_minute=sliding)
            if wait > 0:
                if paced_rpm:
                    self._request_pacer.refund(self._request_rate(paced_rpm))
                if ipm:
                    self._image_pacer.refund(ipm / 60.0, images)
                return wait
        if self._adaptive is not None:
            self._adaptive.sent(now)
        return 0.0

    # -- feedback from the gateway -------------------------------------------------------------

    async def _pause_remaining(self) -> float:
        shared = await self._started().shared_pause_until()
        if shared is not None:
            self._pause_until = max(self._pause_until, shared)
        return self._pause_until - time.time()

    async def pause(self, seconds: float) -> None:
        """Stop every request of this limiter (and, with a shared backend, of every process) for ``seconds``
        (at most ``max_wait``)."""
        budget = self._started()
        until = time.time() + min(max(0.0, seconds), self.max_wait)
        if until <= self._pause_until:
            return
        self._pause_until = until
        await budget.share_pause(until)

    async def on_rate_limited(self, retry_after: float | None) -> None:
        """A 429 arrived: pause everyone for Retry-After (or, without one, as long as the gateway's window
        needs, see :func:`~imagegen_provider.transport.learner.pause_without_retry_after`) so waiting requests
        do not hit the wall one after another. A burst of refusals is one congestion signal."""
        self._rate_limited += 1
        self._answered = True
        now, wall = time.monotonic(), time.time()
        sent_at = SENT_AT.get() or wall
        new_episode = self._episodes.refused(sent_at=sent_at, retry_after=retry_after)
        adaptive = self._adaptive if self._learning and self._shape is None else None
        if adaptive is not None and (new_episode or adaptive.refining(now)):
            before = adaptive.rate
            adaptive.refused(now)
            await self._share_rate_change(before, now, lock=AdaptiveRate.MIN_INTERVAL, first=before is None)
        if retry_after is not None or not self._learning:
            seconds = min(retry_after if retry_after is not None else 1.0, self.max_wait)
        else:
            seconds = min(await self._window_pause(wall), self.max_wait)
        rpm = self.requests_per_minute
        if rpm:
            rate = self._request_rate(rpm)
            self._request_pacer.drain(now + seconds, rate, max(1.0, rate * BURST_SECONDS))
        await self.pause(seconds)

    async def _window_pause(self, wall: float) -> float:
        """The pause after a refusal without Retry-After; inside a known window, also revise its capacity."""
        budget = self._started()
        oldest: float | None = None
        if self._shape is None:
            recent = await budget.accepted_since(wall - WINDOW_SECONDS)
            oldest = recent[0] if recent else None
        else:
            accepted = await budget.accepted_since(window_start(self._shape.kind, wall))
            revised = revised_capacity(self._shape, now=wall,
                                       accepted_between=lambda a, b: sum(1 for t in accepted if a <= t < b))
            if revised != self._shape:
                log.info("Gateway window refused after %d accepted; capacity now %d per minute",
                         revised.capacity, revised.capacity)
                await self._set_shape(revised)
            oldest = accepted[0] if accepted else None
        return pause_without_retry_after(shape=self._shape, now=wall, elapsed=self._episodes.elapsed(wall),
                                         oldest_in_window=oldest)

    async def on_accepted(self, *, sent_at: float) -> None:
        """The gateway accepted a request sent at ``sent_at`` (wall clock). Ends an episode of refusals; one
        without Retry-After that lasted long identifies the gateway's window."""
        if not self._learning:
            return
        budget = self._started()
        self._accepted_here.append(sent_at)
        await budget.record_accepted(sent_at)
        retry_after_seen = self._episodes.retry_after_seen
        start = self._episodes.accepted(sent_at=sent_at)
        if start is None or retry_after_seen:
            return
        accepted = await budget.accepted_since(start - WINDOW_SECONDS)
        shape = identify(episode_start=start, resumed_at=sent_at,
                         accepted_between=lambda a, b: sum(1 for t in accepted if a <= t < b),
                         known=self._shape.kind if self._shape is not None else None)
        if shape is not None and shape != self._shape:
            log.info("Gateway refuses without Retry-After over a %s window of %d requests; pacing to it",
                     shape.kind, shape.capacity)
            await self._set_shape(shape)

    async def _share_rate_change(self, before: float | None, now: float, *, lock: float, first: bool = False) -> None:
        """With a shared backend, one learned rate for every process: a change this process made is published
        if no other process changed it within ``lock`` seconds, else the shared rate is taken up instead.

        A process sees only its own share of the traffic, so its first estimate (what the gateway accepted
        from it in the last second) is scaled by everyone's acceptances over its own."""
        adaptive = self._adaptive
        if not self.shared or adaptive is None or adaptive.rate is None or adaptive.rate == before:
            return
        budget = self._started()
        if first:
            wall = time.time()
            everyone = len(await budget.accepted_since(wall - 2.0))
            mine = sum(1 for t in self._accepted_here if t >= wall - 2.0)
            if everyone > mine > 0:
                adaptive.adopt(adaptive.rate * everyone / mine)
        if await budget.claim_rate_change(lock):
            await budget.share_rate(adaptive.rate)
            return
        shared = await budget.shared_rate()
        adaptive.adopt(shared if shared is not None else before or adaptive.rate)

    async def _sync_shared_rate(self, now: float) -> None:
        if self._adaptive is None or not self.shared or now - self._rate_polled < SHAPE_POLL_SECONDS / 2:
            return
        self._rate_polled = now
        self._members = await self._started().members(self._member_id, time.time())
        shared = await self._started().shared_rate() if self._shape is None else None
        if shared is not None:
            self._adaptive.adopt(shared)

    async def _set_shape(self, shape: WindowShape) -> None:
        self._shape = shape
        await self._started().share_shape(shape)

    async def _adopt_shared_shape(self, now: float) -> None:
        """With a shared backend, take up (at most once a second) the window another process identified."""
        if not (self.shared and self._learning) or now - self._shape_polled < SHAPE_POLL_SECONDS:
            return
        self._shape_polled = now
        shared = await self._started().shared_shape()
        if shared is not None and shared != self._shape:
            self._shape = shared

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Tune the budgets from ``x-ratelimit-limit-requests`` / ``-images`` when the gateway sends them.

        The gateway's own limit wins when it is lower than the configured one (or none was configured), and
        when it is believable (see :func:`~imagegen_provider.transport.pacing.announced_limit`). Called for
        every response, whatever its status: the first one ends the probing start.
        """
        self._answered = True
        headers = header_lookup(headers)
        for header, attr in (("x-ratelimit-limit-requests", "_rpm"), ("x-ratelimit-limit-images", "_ipm")):
            # LiteLLM's proxy forwards the upstream provider's own headers under an ``llm_provider-`` prefix.
            if header not in headers and f"llm_provider-{header}" in headers:
                header = f"llm_provider-{header}"
            announced = announced_limit(header, headers.get(header))
            current = getattr(self, attr)
            if announced is not None and (current is None or announced < current):
                log.info("Gateway announces %s=%s; limiting to it", header, announced)
                setattr(self, attr, announced)

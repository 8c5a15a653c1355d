"""One rate limiter for every request of a client: requests/min, images/min, requests in flight, and a
shared pause when the gateway answers 429.

The ideas live in their own modules: :mod:`~imagegen_provider.transport.pacing` (even spacing, learning a
hidden rate, believing announced limits: pure) and :mod:`~imagegen_provider.transport.budget` (the budget and
pause shared across processes). This module composes them into admission control for one gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from imagegen_provider.transport.budget import (
    PROBE_LOCK_SECONDS,
    SharedBudget,
    is_shared_backend,
    per_minute_item,
)
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
    LimitKind,
    Pacer,
    announced_limit,
    parse_duration,
)
from imagegen_provider.transport.retry import MAX_RETRY_AFTER_SECONDS, header_lookup

log = logging.getLogger(__name__)

#: When the current task's request left (wall clock): set by the client before it sends, read when the answer
#: comes back, so that refusals and acceptances are counted by send time (what a gateway's window counts).
SENT_AT: ContextVar[float | None] = ContextVar("imagegen_sent_at", default=None)

#: How many images the current task's request asked for: set with :data:`SENT_AT`, read when it is refused.
SENT_IMAGES: ContextVar[int] = ContextVar("imagegen_sent_images", default=1)

#: Usage above this many tokens per image is not believed (gpt-image-1 high quality 1536x1024 is ~6,200).
MAX_TOKENS_PER_IMAGE = 100_000

#: A learned sliding window's slot is reused this long after 60 s from its admission: the gateway counts a
#: request from when it arrives and is handled, later than it was admitted (on a loaded machine, by up to a
#: second), and a slot reused before the gateway freed it is a 429. Costs at most 1/61 of the window.
SLOT_MARGIN_SECONDS = 1.0

#: How often a process looks for a window shape another process sharing the backend learned.
SHAPE_POLL_SECONDS = 1.0

#: The cold start with a shared backend (nothing learned yet, ``probe_first``): one process, holding the
#: probe lock, probes the gateway for everyone, with at most this many requests in flight until its first 429
#: (the first wave into a hidden wall is refused whole: a fleet's 4 × 16 in flight would be 64 refusals).
COLD_IN_FLIGHT = 4
#: How often a waiting process looks whether the prober learned something (or left).
COLD_POLL_SECONDS = 0.25
#: The longest a process waits for the prober: two windows (a sliding window the prober filled frees after
#: one; a calendar window after less). Then it learns on its own, as without a shared backend.
COLD_WAIT_SECONDS = 2 * WINDOW_SECONDS
#: A prober whose requests met no 429 for this long ends the cold start: the gateway does not limit at one
#: process's pace, and the others need not wait longer.
COLD_QUIET_SECONDS = 30.0
#: How often the prober renews its lock (it lapses after :data:`PROBE_LOCK_SECONDS`).
PROBE_RENEW_SECONDS = 1.0

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
    #: usually announces its limit) before sending more; then few in flight until the first 429 (see
    #: :data:`COLD_IN_FLIGHT`), and with a shared backend one process probes for all of them.
    probe_first: bool = True

    def __repr__(self) -> str:
        # The backend URL may carry a Redis password: never print it.
        backend = None if self.backend is None else _without_password(self.backend)
        return (
            f"RateLimits(requests_per_minute={self.requests_per_minute!r}, "
            f"images_per_minute={self.images_per_minute!r}, max_in_flight={self.max_in_flight!r}, "
            f"backend={backend!r}, namespace={self.namespace!r})"
        )


@dataclass
class ColdStart:
    """Where this process stands in a shared cold start (monotonic times)."""

    #: Still cold: with a shared backend, nothing learned yet and no other process said it was.
    enabled: bool
    #: This process holds the probe lock.
    prober: bool = False
    began: float | None = None
    probing_since: float = 0.0
    polled: float = -math.inf
    renewed: float = -math.inf
    #: The prober learned what the others need (a window, a rate whose episode ended, no limit at all).
    settled: bool = False


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
        self._adaptive_images: AdaptiveRate | None = (
            AdaptiveRate("images") if limits.images_per_minute is None else None)
        #: Announced tokens/min, and what one image costs in tokens (from the responses' usage): a tokens
        #: limit is enforced as the images/min it allows.
        self._tpm: float | None = None
        self._tokens_per_image: float | None = None
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
        #: Requests admitted and not yet released (see :meth:`release`), and answers accepted.
        self._outstanding = 0
        self._accepted_count = 0
        self._released: asyncio.Event | None = None
        self._cold = ColdStart(enabled=self.shared and self._learning and limits.probe_first)

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
        """The image limit in force: configured or announced, else learned from 429s that named images or
        tokens; and no more images than an announced tokens/min allows at the tokens an image costs."""
        limits = [self._ipm if self._ipm is not None else self._adaptive_images_per_minute()]
        if self._tpm is not None and self._tokens_per_image:
            limits.append(self._tpm / self._tokens_per_image)
        known = [limit for limit in limits if limit]
        return min(known) if known else None

    def _adaptive_images_per_minute(self) -> float | None:
        return self._adaptive_images.per_minute() if self._adaptive_images is not None else None

    @property
    def _learned_images(self) -> AdaptiveRate | None:
        """The images learner, while no images limit is configured or announced."""
        return self._adaptive_images if self._ipm is None else None

    @property
    def learns_windows(self) -> bool:
        """Whether 429s without Retry-After pause requests as long as a learned (or probed) window needs."""
        return self._learning

    def pause_remaining(self) -> float:
        """Seconds until the current 429 pause ends, as this process last saw it (0 when none)."""
        return max(0.0, self._pause_until - time.time())

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
        """Wait until one request carrying ``images`` images may be sent. Returns the seconds waited. Call
        :meth:`release` once the request is answered (or failed)."""
        self._started()
        started = time.monotonic()
        while True:
            pause = await self._pause_remaining()
            if pause > 0:
                await self._renew_probe(time.monotonic())
                # A prober sleeps in pieces, to renew its lock while paused.
                step = PROBE_LOCK_SECONDS / 4 if self._cold.prober else self.max_wait
                await asyncio.sleep(min(pause, self.max_wait, step) + random.uniform(0, 0.05))
                continue
            if self._cold_capped():
                await self._wait_for_release(at_most=COLD_POLL_SECONDS)
                continue
            wait = await self._try_take(images)
            if wait <= 0:
                self._outstanding += 1
                return time.monotonic() - started
            # Jitter so that processes sharing one budget do not wake in lockstep.
            wait = min(wait, self.max_wait)
            await asyncio.sleep(wait + random.uniform(0, min(0.02, wait)))

    def release(self) -> None:
        """The request admitted by :meth:`acquire` is over (answered, failed or abandoned)."""
        self._outstanding = max(0, self._outstanding - 1)
        if self._released is not None:
            self._released.set()
            self._released = None

    async def _wait_for_release(self, *, at_most: float) -> None:
        if self._released is None:
            self._released = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), at_most)

    # -- the shared cold start -----------------------------------------------------------------------

    def _cold_capped(self) -> bool:
        """Before the gateway first refuses anything, with nothing configured: few requests in flight, so that
        the first wave into a hidden limit is small. The prober of a shared backend keeps
        :data:`COLD_IN_FLIGHT` (its first wave stands for the whole fleet's); a process of its own starts
        there and adds one per accepted answer (TCP's slow start: doubling every round trip, so a gateway
        without a limit is at full concurrency within a few round trips)."""
        if self._rate_limited or not self._learning or not self.limits.probe_first:
            return False
        if self._cold.enabled and self._cold.prober:
            return self._outstanding >= COLD_IN_FLIGHT
        return not self.shared and self._outstanding >= COLD_IN_FLIGHT + self._accepted_count

    async def _cold_wait(self, now: float) -> float:
        """With a shared backend and nothing learned: one process (holding the probe lock) probes the gateway,
        the others wait (at most :data:`COLD_WAIT_SECONDS`) for what it learns, instead of all meeting a hidden
        wall at once. 0 when this process may send."""
        cold = self._cold
        if not cold.enabled:
            return 0.0
        if cold.began is None:
            cold.began = now
        if cold.prober:
            if self._rate_limited == 0 and now - cold.probing_since >= COLD_QUIET_SECONDS:
                cold.settled = True  # no 429 in all that time: nothing to wait for
            if cold.settled or not self._learning:
                await self._end_cold_start()
            else:
                await self._renew_probe(now)
            return 0.0
        if now - cold.polled < COLD_POLL_SECONDS:
            return COLD_POLL_SECONDS - (now - cold.polled)
        cold.polled = now
        budget = self._started()
        if await budget.is_warm() or now - cold.began >= COLD_WAIT_SECONDS:
            await self._end_cold_start()
            return 0.0
        if await budget.claim_probe():
            log.info("Probing the gateway for every process sharing %s (nothing learned yet)", self.limits.namespace)
            cold.prober, cold.probing_since, cold.renewed = True, now, now
            return 0.0
        return COLD_POLL_SECONDS

    async def _renew_probe(self, now: float) -> None:
        cold = self._cold
        if cold.enabled and cold.prober and now - cold.renewed >= PROBE_RENEW_SECONDS:
            cold.renewed = now
            cold.prober = await self._started().claim_probe()

    async def _settle(self) -> None:
        """This process learned what every process sharing the backend needs: the cold start is over."""
        self._cold.settled = True
        if self._cold.enabled and self._cold.prober:
            await self._end_cold_start()

    async def _end_cold_start(self) -> None:
        cold = self._cold
        cold.enabled = False
        if cold.prober:
            cold.prober = False
            budget = self._started()
            await budget.mark_warm()
            await budget.release_probe()

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

    def _image_burst(self, rate: float) -> float:
        """Images that may leave at once. A configured or announced limit lets a request for the most images
        through at once; a learned one only half a second's worth (a request for more still goes alone), as
        the gateway's bucket holding about a second's worth must not meet a burst of several requests."""
        if self._learned_images is not None and self._ipm is None:
            return max(1.0, rate * BURST_SECONDS)
        return max(MAX_IMAGES_PER_REQUEST, rate * BURST_SECONDS)

    def _image_rate(self, ipm: float) -> float:
        """This process's image rate (per second) under ``ipm``: its share of a learned one, as for requests."""
        rate = ipm / 60.0
        return rate / self._members if self.shared and self._learned_images is not None else rate

    def _take_local(self, now: float, rpm: float | None, ipm: float | None, images: int) -> float:
        if rpm:
            rate = self._request_rate(rpm)
            wait = self._request_pacer.delay(now, rate, max(1.0, rate * BURST_SECONDS))
            if wait > 0:
                return wait
        if ipm:
            rate = self._image_rate(ipm)
            wait = self._image_pacer.delay(now, rate, self._image_burst(rate), images)
            if wait > 0:
                if rpm:
                    self._request_pacer.refund(self._request_rate(rpm))
                return wait
        return 0.0

    async def _try_take(self, images: int) -> float:
        """Take one request and ``images`` images from the budgets, or say how long to wait."""
        now = time.monotonic()
        await self._sync_shared_rate(now)
        wait = await self._cold_wait(now) or self._probing_wait(now)
        if wait > 0:
            return wait
        for adaptive in (self._adaptive, self._learned_images):
            if adaptive is not None:
                before = adaptive.rate
                adaptive.maybe_increase(now)
                await self._share_rate_change(adaptive, before, now, lock=AdaptiveRate.PROBE_AFTER)
        await self._adopt_shared_shape(now)
        rpm, ipm = self.requests_per_minute, self.images_per_minute
        images = min(images, MAX_IMAGES_PER_REQUEST)
        sliding = self._shape if self._learning and self._shape is not None and self._shape.kind == "sliding" else None
        paced_rpm = None if sliding is not None else rpm
        wait = self._take_local(now, paced_rpm, ipm, images)
        if wait > 0:
            return wait
        wait = await self._take_shared(paced_rpm, ipm, images, sliding=sliding)
        if wait > 0:
            if paced_rpm:
                self._request_pacer.refund(self._request_rate(paced_rpm))
            if ipm:
                self._image_pacer.refund(self._image_rate(ipm), images)
            return wait
        if self._adaptive is not None:
            self._adaptive.sent(now)
        if self._adaptive_images is not None:
            self._adaptive_images.sent(now, images)
        return 0.0

    async def _take_shared(self, rpm: float | None, ipm: float | None, images: int, *,
                           sliding: WindowShape | None) -> float:
        """The budget's windows: every process's together with a shared backend, and this process's for a
        learned window (which counts every 60 s, where the pacer alone would allow a burst)."""
        if not (self.shared or (self._shape is not None and self._learning)):
            return 0.0
        budget = self._started()
        if sliding is None:
            return await budget.take(rpm, ipm, images)
        # A learned sliding window is matched slot by slot, not spaced evenly: after a first burst it frees at
        # the burst's pace, and spacing would leave most of a minute unused. Its log started from what the
        # gateway accepted before (see _set_shape), so the slots the gateway still counts stay taken.
        wall = time.time()
        wait = await budget.take_slot(sliding.capacity, now=wall, span=WINDOW_SECONDS + SLOT_MARGIN_SECONDS)
        if wait > 0 or not ipm:
            return wait
        wait = await budget.take(None, ipm, images)
        if wait > 0:
            await budget.give_back_slot(wall)
        return wait

    # -- feedback from the gateway -------------------------------------------------------------

    async def _pause_remaining(self) -> float:
        shared = await self._started().shared_pause_until()
        if shared is not None and shared > self._pause_until:
            self._pause_until = shared
            if self._adaptive is not None:
                self._adaptive.held_back(time.monotonic())  # another process met the limit
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

    async def on_rate_limited(self, retry_after: float | None, *, limit: LimitKind = "requests") -> None:
        """A 429 arrived: pause everyone for Retry-After (or, without one, as long as the gateway's window
        needs, see :func:`~imagegen_provider.transport.learner.pause_without_retry_after`) so waiting requests
        do not hit the wall one after another. A burst of refusals is one congestion signal.

        :param limit: the budget that refused (see :func:`~imagegen_provider.transport.pacing.refused_limit`):
            a refusal of images (or tokens) teaches the images rate, not the request rate.
        """
        self._rate_limited += 1
        self._answered = True
        now, wall = time.monotonic(), time.time()
        sent_at = SENT_AT.get() or wall
        new_episode = self._episodes.refused(sent_at=sent_at, retry_after=retry_after)
        if self._learning and self._shape is not None and self._shape.kind == "sliding":
            # A sliding window does not count what it refused: neither does the log matching it.
            await self._started().give_back_slot(sent_at)
        learner = self._learner_for(limit)
        if learner is not None and (new_episode or learner.refining(now)):
            before = learner.rate
            learner.refused(now, SENT_IMAGES.get() if learner is self._adaptive_images else 1)
            await self._share_rate_change(learner, before, now, lock=AdaptiveRate.MIN_INTERVAL,
                                          first=before is None)
        if retry_after is not None or limit != "requests" or not self._learning:
            seconds = min(retry_after if retry_after is not None else 1.0, self.max_wait)
        else:
            seconds = min(await self._window_pause(wall), self.max_wait)
        self._drain_pacers(now + seconds)
        await self.pause(seconds)

    def _learner_for(self, limit: LimitKind) -> AdaptiveRate | None:
        """What a refusal of ``limit`` teaches: the request rate (unless a window was identified), or the
        images rate (a tokens limit is learned in images: an image costs about the same tokens each time)."""
        if limit == "requests":
            return self._adaptive if self._learning and self._shape is None else None
        return self._learned_images

    def _drain_pacers(self, resume_at: float) -> None:
        rpm, ipm = self.requests_per_minute, self.images_per_minute
        if rpm:
            rate = self._request_rate(rpm)
            self._request_pacer.drain(resume_at, rate, max(1.0, rate * BURST_SECONDS))
        if ipm:
            rate = self._image_rate(ipm)
            self._image_pacer.drain(resume_at, rate, self._image_burst(rate))

    async def _window_pause(self, wall: float) -> float:
        """The pause after a refusal without Retry-After; inside a known window, also revise its capacity."""
        budget = self._started()
        oldest: float | None = None
        if self._shape is None:
            start = self._episodes.start if self._episodes.start is not None else wall
            recent = await budget.accepted_since(start - WINDOW_SECONDS)
            oldest = recent[0] if recent and recent[0] < start else None
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

    async def on_accepted(self, *, sent_at: float, images: int = 1, tokens: int | None = None) -> None:
        """The gateway accepted a request sent at ``sent_at`` (wall clock) for ``images`` images, using
        ``tokens`` tokens when its usage says. Ends an episode of refusals; one without Retry-After that lasted
        long identifies the gateway's window."""
        self._accepted_count += 1
        if tokens is not None and 0 < tokens < MAX_TOKENS_PER_IMAGE * images:
            per_image = tokens / images
            # A moving average: image sizes and qualities vary within a run, a single odd one must not swing it.
            previous = self._tokens_per_image
            self._tokens_per_image = per_image if previous is None else 0.8 * previous + 0.2 * per_image
        if not self._learning:
            return
        budget = self._started()
        self._accepted_here.append(sent_at)
        await budget.record_accepted(sent_at)
        retry_after_seen = self._episodes.retry_after_seen
        start = self._episodes.accepted(sent_at=sent_at)
        if start is None:
            return
        if retry_after_seen:
            await self._settle()  # a token bucket: the rate learned from its refusals is in force
            return
        accepted = await budget.accepted_since(start - WINDOW_SECONDS)
        shape = identify(episode_start=start, resumed_at=sent_at,
                         accepted_between=lambda a, b: sum(1 for t in accepted if a <= t < b),
                         oldest=accepted[0] if accepted and accepted[0] < start else None,
                         known=self._shape.kind if self._shape is not None else None)
        if shape is not None and shape != self._shape:
            log.info("Gateway refuses without Retry-After over a %s window of %d requests; pacing to it",
                     shape.kind, shape.capacity)
            await self._set_shape(shape)
        if self._shape is not None:
            # A short episode without Retry-After settles nothing (a window that filled just before it
            # freed looks like one): the prober goes on until a window is identified.
            await self._settle()

    async def _share_rate_change(self, adaptive: AdaptiveRate, before: float | None, now: float, *, lock: float,
                                 first: bool = False) -> None:
        """With a shared backend, one learned rate (of requests, of images) for every process: a change this
        process made is published if no other process changed it within ``lock`` seconds, else the shared rate
        is taken up instead.

        A process sees only its own share of the traffic, so its first estimate of the request rate (what the
        gateway accepted from it in the last second) is scaled by everyone's acceptances over its own."""
        if not self.shared or adaptive.rate is None or adaptive.rate == before:
            return
        budget = self._started()
        unit = adaptive.unit
        if first and adaptive is self._adaptive:
            wall = time.time()
            everyone = len(await budget.accepted_since(wall - 2.0))
            mine = sum(1 for t in self._accepted_here if t >= wall - 2.0)
            if everyone > mine > 0:
                adaptive.adopt(adaptive.rate * everyone / mine, now=now)
        if await budget.claim_rate_change(lock, unit=unit):
            await budget.share_rate(adaptive.rate, unit=unit)
            return
        shared = await budget.shared_rate(unit=unit)
        adaptive.adopt(shared if shared is not None else before or adaptive.rate, now=now)

    async def _sync_shared_rate(self, now: float) -> None:
        """With a shared backend and something to learn, at most twice a second: count the living limiters
        (this one included) and take up the rates other processes learned."""
        images = self._learned_images
        learning = self._learning or images is not None
        if not (self.shared and learning) or now - self._rate_polled < SHAPE_POLL_SECONDS / 2:
            return
        self._rate_polled = now
        budget = self._started()
        self._members = await budget.members(self._member_id, time.time())
        requests = self._adaptive if self._learning and self._shape is None else None
        shared = await budget.shared_rate() if requests is not None else None
        if requests is not None and shared is not None:
            requests.adopt(shared, now=now)
        shared_images = await budget.shared_rate(unit="images") if images is not None else None
        if images is not None and shared_images is not None:
            images.adopt(shared_images, now=now)

    async def _set_shape(self, shape: WindowShape) -> None:
        await self._take_up_shape(shape)
        await self._started().share_shape(shape)

    async def _take_up_shape(self, shape: WindowShape) -> None:
        if shape.kind == "sliding" and (self._shape is None or self._shape.kind != "sliding"):
            # The window still counts what it accepted before it was identified: its log starts from them.
            await self._started().seed_window()
        self._shape = shape

    async def _adopt_shared_shape(self, now: float) -> None:
        """With a shared backend, take up (at most once a second) the window another process identified."""
        if not (self.shared and self._learning) or now - self._shape_polled < SHAPE_POLL_SECONDS:
            return
        self._shape_polled = now
        shared = await self._started().shared_shape()
        if shared is not None and shared != self._shape:
            await self._take_up_shape(shared)

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Tune the budgets from ``x-ratelimit-limit-requests`` / ``-images`` when the gateway sends them.

        The gateway's own limit wins when it is lower than the configured one (or none was configured), and
        when it is believable (see :func:`~imagegen_provider.transport.pacing.announced_limit`). Called for
        every response, whatever its status: the first one ends the probing start.
        """
        self._answered = True
        headers = header_lookup(headers)
        for header, attr in (("x-ratelimit-limit-requests", "_rpm"), ("x-ratelimit-limit-images", "_ipm"),
                             ("x-ratelimit-limit-tokens", "_tpm")):
            # LiteLLM's proxy forwards the upstream provider's own headers under an ``llm_provider-`` prefix.
            if header not in headers and f"llm_provider-{header}" in headers:
                header = f"llm_provider-{header}"
            announced = announced_limit(header, headers.get(header))
            current = getattr(self, attr)
            if announced is not None and (current is None or announced < current):
                log.info("Gateway announces %s=%s; limiting to it", header, announced)
                setattr(self, attr, announced)

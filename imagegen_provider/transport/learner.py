"""Identifying the gateway's limiter, not just its rate. Pure: no I/O, no clock (every method takes ``now``,
wall-clock seconds, because calendar-minute windows reset at :00 of the wall clock).

A gateway that answers 429 with ``Retry-After`` says when to come back: the token-bucket learner
(:class:`~imagegen_provider.transport.pacing.AdaptiveRate`) and the pause handle it. A gateway that refuses
without ``Retry-After`` may count over a whole minute, and then the refusals last until the window frees:

* a **fixed window** (LiteLLM's proxy with ``enforce_model_rate_limits``: per calendar minute, refused
  requests counted too) accepts again right after :00;
* a **sliding window** accepts again when the oldest accepted request leaves the last 60 seconds.

Either way the capacity is what the gateway accepted over its window before it refused: requests sent in
the calendar minute, or in the 60 seconds before the first refusal. A client that knows the shape spreads the
capacity evenly over the window and never sends more than the capacity per window.

Hand-written: ``limits`` keeps windows for a client's own admission, it does not infer a server's window
from its refusals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

#: The window every documented per-minute limit counts over.
WINDOW_SECONDS = 60.0
#: Refusals without ``Retry-After`` lasting at least this long come from a window, not from a token bucket
#: (whose refusals end within a second or two, as it refills continuously).
LONG_EPISODE_SECONDS = 3.0
#: A fixed window accepts again within this many seconds after :00.
BOUNDARY_SLACK_SECONDS = 3.0
#: How far past the boundary (or the freed slot) a paused client resumes: enough for clocks a few tens of
#: milliseconds apart, not enough to matter for throughput.
RESUME_MARGIN_SECONDS = 0.1

WindowKind = Literal["fixed", "sliding"]

#: The share of the last 60 s' acceptances that must fall in the refusing calendar minute for a fixed window.
FIXED_SHARE = 0.8

#: Accepted requests sent in ``[start, end)`` (wall clock), as the caller counts them (this process, or every
#: process sharing the budget).
AcceptedBetween = Callable[[float, float], int]


@dataclass(frozen=True)
class WindowShape:
    """A learned window: its kind and how many requests it accepts per window."""

    kind: WindowKind
    capacity: int

    def encode(self) -> str:
        return f"{self.kind}:{self.capacity}"

    @classmethod
    def decode(cls, text: str | bytes | None) -> WindowShape | None:
        """The shape another process shared, or ``None`` for anything unexpected (the value is not trusted)."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        kind, _, number = (text or "").partition(":")
        if kind not in ("fixed", "sliding") or not number.isdigit() or not 0 < int(number) < 10_000_000:
            return None
        return cls(kind="fixed" if kind == "fixed" else "sliding", capacity=int(number))

    @property
    def per_minute(self) -> float:
        return float(self.capacity)


def minute_start(now: float) -> float:
    return math.floor(now / WINDOW_SECONDS) * WINDOW_SECONDS


def window_start(kind: WindowKind, now: float) -> float:
    """Where the window counting a request sent at ``now`` begins."""
    return minute_start(now) if kind == "fixed" else now - WINDOW_SECONDS


def identify(*, episode_start: float, resumed_at: float, accepted_between: AcceptedBetween,
             oldest: float | None = None, known: WindowKind | None = None) -> WindowShape | None:
    """The window behind an episode of refusals without ``Retry-After`` that began at ``episode_start`` (the
    first refused request's send time) and ended when a request sent at ``resumed_at`` was accepted; ``None``
    when the episode was too short to be a window's.

    :param accepted_between: counts accepted requests by send time.
    :param oldest: the send time of the oldest request accepted in the 60 s before the episode: a sliding
        window frees its first slot 60 s after it (and the probing pause tries then, see
        :func:`pause_without_retry_after`); resuming at :00 instead, long after, is a calendar window's.
    :param known: the window kind already identified, if any (a known fixed window stays fixed: after a
        minute of steady pacing, the last 60 s span two calendar minutes).
    """
    if resumed_at - episode_start < LONG_EPISODE_SECONDS:
        return None
    crossed = minute_start(resumed_at) > minute_start(episode_start)
    last_minute = accepted_between(episode_start - WINDOW_SECONDS, episode_start)
    if crossed and resumed_at - minute_start(resumed_at) < BOUNDARY_SLACK_SECONDS:
        start = minute_start(episode_start)
        in_calendar_minute = accepted_between(start, start + WINDOW_SECONDS)
        sliding_fits = oldest is None or abs(oldest + WINDOW_SECONDS - resumed_at) < BOUNDARY_SLACK_SECONDS
        # A calendar window refused once its own minute was full: most of what was accepted in the last 60 s
        # fell in that minute, or a sliding window would have accepted again long before :00. A sliding window
        # that happened to free at :00 refused after acceptances spread over two calendar minutes: its
        # capacity is the last 60 s, not the calendar minute.
        if known == "fixed" or not sliding_fits or in_calendar_minute >= FIXED_SHARE * last_minute:
            return WindowShape("fixed", max(1, in_calendar_minute))
    return WindowShape("sliding", max(1, last_minute))


class Episodes:
    """Groups 429s into congestion episodes: a burst of refusals is one signal, not one per answer.

    An episode begins with a refusal after an acceptance and ends with the next acceptance of a request sent
    after the episode began (a request sent earlier and answered late proves nothing about the present).
    """

    def __init__(self) -> None:
        self.start: float | None = None
        self.retry_after_seen = False
        self._last_refusal = 0.0

    def refused(self, *, sent_at: float, retry_after: float | None) -> bool:
        """Record a refusal; ``True`` when it begins a new episode."""
        self._last_refusal = max(self._last_refusal, sent_at)
        if self.start is not None:
            self.retry_after_seen = self.retry_after_seen or retry_after is not None
            return False
        self.start = sent_at
        self.retry_after_seen = retry_after is not None
        return True

    def accepted(self, *, sent_at: float) -> float | None:
        """Record an acceptance; the start of the episode it ends, if it ends one."""
        if self.start is None or sent_at < self.start:
            return None
        start, self.start = self.start, None
        return start

    def elapsed(self, now: float) -> float:
        return 0.0 if self.start is None else max(0.0, now - self.start)


def pause_without_retry_after(*, shape: WindowShape | None, now: float, elapsed: float,
                              oldest_in_window: float | None) -> float:
    """How long everyone waits after a refusal that named no time.

    * a fixed window: until the next minute boundary;
    * a sliding window: until the oldest accepted request in the last 60 s leaves it;
    * unknown: as long as the episode has lasted (at least 1 s: probes at 1, 2, 4, 8... s, a handful of
      refusals per minute), but never past the next minute boundary (where a calendar window accepts
      again) nor past the moment a sliding window would free its oldest acceptance (for an unknown window,
      ``oldest_in_window`` is the oldest acceptance in the 60 s before the episode began: once that moment
      has passed by more than a few seconds, refused, the window is not a sliding one, and later
      acceptances' moments are not chased).
    """
    to_boundary = minute_start(now) + WINDOW_SECONDS - now + RESUME_MARGIN_SECONDS
    if shape is not None and shape.kind == "fixed":
        return to_boundary
    sliding_frees = None if oldest_in_window is None else (
        oldest_in_window + WINDOW_SECONDS - now + RESUME_MARGIN_SECONDS)
    if shape is not None and sliding_frees is not None:
        return max(0.2, sliding_frees)
    if sliding_frees is None or sliding_frees < -BOUNDARY_SLACK_SECONDS:
        sliding_frees = to_boundary
    else:
        # Just after the moment, a request that raced it may have been refused: go on probing it.
        sliding_frees = max(0.2, sliding_frees)
    # Unknown: also probe when a sliding window would free its first slot, so either kind is seen at once.
    return min(max(1.0, elapsed), to_boundary, sliding_frees)


def revised_capacity(shape: WindowShape, *, now: float, accepted_between: AcceptedBetween) -> WindowShape:
    """After a refusal inside a known window: the capacity is what the window accepted before refusing
    (trusted only when it is at least half the previous estimate: a stray 429 must not halve the rate)."""
    start = window_start(shape.kind, now)
    accepted = accepted_between(start, now + 1.0)
    if accepted * 2 < shape.capacity or accepted == shape.capacity:
        return shape
    return WindowShape(shape.kind, max(1, accepted))

"""Pacing: when the next request may leave, from rates alone. Pure: no I/O, no clock of its own (every method
takes ``now``), so it is tested with a fake clock.

* :class:`Pacer` spaces sends evenly (GCRA);
* :class:`AdaptiveRate` learns a hidden rate from 429s (AIMD);
* :func:`announced_limit` reads a limit from ``x-ratelimit-limit-*`` headers, refusing absurd values.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from collections.abc import Mapping
from typing import Literal

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


#: Requests (or images) that may leave at once after an idle spell, in seconds' worth of the rate. Gateways
#: enforce per-minute limits over short periods, typically a token bucket holding about one second's worth;
#: staying at half of that leaves their bucket half full, so network jitter never meets an empty one.
BURST_SECONDS = 0.5


#: The most images one request may ask for (every documented gateway caps ``n`` at 10).
MAX_IMAGES_PER_REQUEST = 10

#: Announced limits below this many per minute are not believed: ``x-ratelimit-limit-requests: 0.001`` would
#: space requests 1000 minutes apart. A gateway that means it answers 429, and the 429 pause applies.
MIN_ANNOUNCED_PER_MINUTE = 1.0


def announced_limit(header: str, value: str | None) -> float | None:
    """A per-minute limit from header ``header``, or ``None``: missing, not a number, not finite, zero or
    negative (all ignored silently, as before), or absurdly low (ignored with a warning naming the header)."""
    if not value:
        return None
    try:
        announced = float(value)
    except ValueError:
        return None
    if not math.isfinite(announced) or announced <= 0:
        return None
    if announced < MIN_ANNOUNCED_PER_MINUTE:
        log.warning("Ignoring %s=%.40s: below %g per minute, not a believable limit", header, value,
                    MIN_ANNOUNCED_PER_MINUTE)
        return None
    return announced


#: The budgets a gateway may describe in ``x-ratelimit-remaining-*`` / ``x-ratelimit-reset-*`` (OpenAI's and
#: LiteLLM's names; LiteLLM forwards the provider's own under an ``llm_provider-`` prefix).
RESET_KINDS = ("requests", "images", "tokens")
#: One of :data:`RESET_KINDS`: the budget a 429 refused.
LimitKind = Literal["requests", "images", "tokens"]

#: How OpenAI's (and the bundled gateway's) 429 messages name the budget: "Rate limit reached for images per
#: minute", "... on tokens per min (TPM)", "... on requests per min (RPM)".
_NAMED_LIMIT = re.compile(r"\b(requests|images|tokens) per min", re.IGNORECASE)


def refused_limit(headers: Mapping[str, str], message: str) -> LimitKind:
    """Which budget a 429 refused: the images or tokens budget whose ``x-ratelimit-remaining-*`` is 0, else the
    one the error message names, else requests. ``headers`` must have lower-case keys (or be case-insensitive).
    """
    for kind in ("images", "tokens"):
        for prefix in ("", "llm_provider-"):
            remaining = headers.get(f"{prefix}x-ratelimit-remaining-{kind}")
            if remaining is not None and remaining.strip() in ("0", "0.0"):
                return "images" if kind == "images" else "tokens"
    named = _NAMED_LIMIT.search(message)
    if named is None:
        return "requests"
    word = named.group(1).lower()
    return "images" if word == "images" else "tokens" if word == "tokens" else "requests"


def reset_hint(headers: Mapping[str, str]) -> float | None:
    """When a 429 names no Retry-After: the longest ``x-ratelimit-reset-<kind>`` among the budgets whose
    ``x-ratelimit-remaining-<kind>`` is 0 (the one that refused), or ``None``. ``headers`` must have
    lower-case keys (or be case-insensitive)."""
    waits = []
    for prefix in ("", "llm_provider-"):
        for kind in RESET_KINDS:
            remaining = headers.get(f"{prefix}x-ratelimit-remaining-{kind}")
            if remaining is None or remaining.strip() not in ("0", "0.0"):
                continue
            wait = parse_duration(headers.get(f"{prefix}x-ratelimit-reset-{kind}"))
            if wait is not None and math.isfinite(wait) and wait >= 0:
                waits.append(wait)
    return max(waits) if waits else None


class Pacer:
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


class AdaptiveRate:
    """Learns a gateway's hidden request rate from 429s: multiplicative decrease, slow increase (AIMD).

    Used only when neither the configuration nor ``x-ratelimit-*`` headers give a limit. The first 429 sets
    the rate to what the gateway actually accepted in the last second (requests sent minus those refused);
    further 429s cut it by 10% at most once a second; four seconds without 429s raise it by 1/s (or 2%,
    whichever is larger) until the first cut, by 2% after it, and by 0.5% once back within 3% of the rate last
    refused: a rate cut once is close to the limit, and a token bucket refuses again only once the excess has
    drained it, so small steps meet it rarely.
    """

    DECREASE = 0.9
    #: The increase, as a share of the rate, once a 429 has cut it.
    STEP_NEAR_LIMIT = 0.02
    #: Back within this share of the rate the gateway last refused (the ceiling), the rate rises by
    #: :data:`STEP_AT_CEILING` instead: the limit is most likely there, and each step past it costs a burst of
    #: 429s, so the rate lingers where it was refused rather than crossing it every few seconds (the plateau of
    #: TCP CUBIC, in its simplest form).
    NEAR_CEILING = 0.97
    STEP_AT_CEILING = 0.005
    MIN_INTERVAL = 1.0
    #: Quiet time before probing a higher rate: long enough for a gateway's burst allowance to drain, so
    #: that the probe is answered before the next one.
    PROBE_AFTER = 4.0

    def __init__(self, unit: str = "requests") -> None:
        #: What the rate counts: ``requests``, or ``images`` (a request for ``n`` images counts ``n``).
        self.unit = unit
        self.rate: float | None = None
        self._sent: deque[tuple[float, int]] = deque(maxlen=4096)
        self._refused: deque[tuple[float, int]] = deque(maxlen=4096)
        self._last_change = 0.0
        self._last_refusal = 0.0
        self._first_refusal = 0.0
        #: A 429 after the first estimate cut the rate: it is near the limit.
        self._cut = False
        #: The rate at the last cut (this process's or, adopted, another's): where the gateway refused.
        self._ceiling: float | None = None

    def sent(self, now: float, amount: int = 1) -> None:
        self._sent.append((now, amount))

    def refused(self, now: float, amount: int = 1) -> None:
        self._refused.append((now, amount))
        self._last_refusal = now
        if self.rate is None or now - self._first_refusal < self.MIN_INTERVAL:
            # The first wave's refusals arrive one by one: keep refining what the gateway accepted, over a
            # window that starts a second before the first refusal and grows (a sliding window would drop
            # the wave's sends before their refusals, and conclude the gateway accepted nothing).
            if self.rate is None:
                self._first_refusal = now
            since = self._first_refusal - 1.0
            sent = sum(amount for t, amount in self._sent if t >= since)
            refused = sum(amount for t, amount in self._refused if t >= since)
            estimate = max(1.0, (sent - refused) / (now - since))
            self.rate = estimate if self.rate is None else min(self.rate, estimate)
            self._last_change = now
            log.debug("First refusals from the gateway; pacing at %.2f %s/s", self.rate, self.unit)
            return
        elif now - self._last_change >= self.MIN_INTERVAL:
            self._ceiling = self.rate
            self.rate = max(1.0 / 60.0, self.rate * self.DECREASE)
            self._last_change = now
            self._cut = True
        else:
            return
        log.info("Gateway refused a request without announcing its limit; pacing at %.2f %s/s", self.rate, self.unit)

    def adopt(self, rate: float, *, now: float) -> None:
        """Take up a rate another process (sharing the budget) learned: a change like this process's own, so
        the next increase waits :data:`PROBE_AFTER` (four processes must not each raise the fleet's rate)."""
        if rate != self.rate:
            if self.rate is not None and rate < self.rate:
                # Another process's cut: the fleet was refused at about this process's rate.
                self._ceiling, self._cut = self.rate, True
            self.rate = rate
            self._last_change = now

    def held_back(self, now: float) -> None:
        """Another process sharing the budget was refused: the fleet's rate is not quiet, so no increase yet."""
        self._last_refusal = max(self._last_refusal, now)

    def refining(self, now: float) -> bool:
        """Whether the first wave's refusals are still refining the first estimate."""
        return self.rate is None or now - self._first_refusal < self.MIN_INTERVAL

    def maybe_increase(self, now: float) -> None:
        if self.rate is None or now - max(self._last_change, self._last_refusal) < self.PROBE_AFTER:
            return
        if self._cut:
            near_ceiling = self._ceiling is not None and self.rate >= self.NEAR_CEILING * self._ceiling
            step = self.STEP_AT_CEILING if near_ceiling else self.STEP_NEAR_LIMIT
            self.rate += max(1.0 / 60.0, step * self.rate)
        else:
            self.rate += max(1.0 if self.rate >= 1 else 1.0 / 60.0, 0.02 * self.rate)
        self._last_change = now

    def per_minute(self) -> float | None:
        return None if self.rate is None else self.rate * 60.0



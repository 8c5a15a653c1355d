"""Figures from the gateway's ``accepted_timeline`` (successful generations per wall-clock second)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def timeline(raw: Iterable[Sequence[int]]) -> dict[int, int]:
    return {int(second): int(count) for second, count in raw}


def timeline_utilisation(tl: dict[int, int], rpm: float) -> dict[str, Any]:
    """Accepted 200s per minute over the run, divided by the limit.

    The span is ``last - first`` whole seconds between the first and the last second with an accepted request:
    the run starts somewhere in its first second and ends somewhere in its last, so on average those two
    partial seconds add up to one (``last - first + 1`` would err low by a second, 3 % of a 30-s run)."""
    if not tl:
        return {"accepted": 0, "span_s": 0, "accepted_per_min": 0.0, "utilisation": 0.0}
    first, last = min(tl), max(tl)
    total = sum(tl.values())
    span = max(1, last - first)
    per_min = total * 60.0 / span
    # Steady state: whole seconds only, the first and last (partial) seconds left out.
    inner = [tl.get(s, 0) for s in range(first + 1, last)]
    steady = sum(inner) * 60.0 / len(inner) if inner else per_min
    return {
        "accepted": total,
        "span_s": span,
        "accepted_per_min": round(per_min, 1),
        "utilisation": round(per_min / rpm, 4),
        "steady_utilisation": round(steady / rpm, 4),
    }


def rolling_per_minute(tl: dict[int, int], start: int, end: int, window: int = 10) -> list[tuple[int, float]]:
    """(second, accepted/min over the trailing ``window`` seconds) for every second in ``[start, end]``; the
    first seconds use the part of the window that has elapsed since ``start``."""
    points = []
    for second in range(start, end + 1):
        lo = max(start, second - window + 1)
        count = sum(tl.get(s, 0) for s in range(lo, second + 1))
        points.append((second, count * 60.0 / (second - lo + 1)))
    return points


def convergence(tl: dict[int, int], rpm: float, t0: float, *, threshold: float = 0.9, window: int = 10) -> dict[str, Any]:
    """How long until the accepted rate, over 10-s windows, stays at or above ``threshold`` × the limit.

    Windows are whole ``window``-second spans starting at each second from the run's first accepted second;
    the last ones, once 95 % of the requests have been accepted (the client is running out of work, so the
    rate falls whatever its limiter does), are not judged. Result: seconds from the client's start ``t0`` to
    the start of the first window of the streak that lasts to the end (``None``: never), and the share of
    judged windows that were at or above the threshold.
    """
    if not tl:
        return {"converged_after_s": None, "windows_ok_share": 0.0, "windows": 0}
    first, last = min(tl), max(tl)
    total = sum(tl.values())
    running, t95 = 0, last
    for second in range(first, last + 1):
        running += tl.get(second, 0)
        if running >= 0.95 * total:
            t95 = second
            break
    need = threshold * rpm / 60.0 * window
    starts = list(range(first, t95 - window + 2))
    if not starts:
        return {"converged_after_s": None, "windows_ok_share": 0.0, "windows": 0, "note": "run shorter than a window"}
    ok = [sum(tl.get(s, 0) for s in range(start, start + window)) >= need for start in starts]
    streak_start = None
    for start, good in zip(reversed(starts), reversed(ok)):
        if not good:
            break
        streak_start = start
    return {
        "converged_after_s": None if streak_start is None else round(max(0.0, streak_start - t0), 1),
        "windows_ok_share": round(sum(ok) / len(ok), 3),
        "windows": len(ok),
    }

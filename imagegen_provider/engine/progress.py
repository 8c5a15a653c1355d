"""Counters of a run and the progress line logged at a steady interval."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("imagegen_provider.progress")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class Progress:
    total: int
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    cost_usd: float = 0.0
    started: float = field(default_factory=time.monotonic)
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=2000))

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def record(self, succeeded: bool, cost: float | None) -> None:
        if succeeded:
            self.succeeded += 1
        else:
            self.failed += 1
        if cost:
            self.cost_usd += cost
        self._recent.append(time.monotonic())

    def images_per_minute(self) -> float:
        """Rate over the last minute (or the run so far, when shorter)."""
        now = time.monotonic()
        window = min(60.0, now - self.started)
        if window <= 0:
            return 0.0
        recent = sum(1 for t in self._recent if t >= now - window)
        return recent * 60.0 / window

    def line(self) -> str:
        rate = self.images_per_minute()
        remaining = max(0, self.total - self.done - self.skipped)
        eta = remaining / rate * 60.0 if rate > 0 else None
        return (
            f"progress: {self.done + self.skipped}/{self.total} images "
            f"({self.succeeded} succeeded, {self.failed} failed, {self.skipped} already done) | "
            f"{rate:.1f} images/min | ETA {_duration(eta)} | cost so far ${self.cost_usd:.4f}"
        )

    def log(self) -> None:
        log.info("%s", self.line())

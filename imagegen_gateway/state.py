"""Mutable state of one gateway: counters, balance, URL images, limiter, faults, renderer.

Everything here is touched only from the event loop (the renderer, which runs in threads, locks itself), so
a check-and-update without an ``await`` in between is atomic: that is how the balance is never overdrawn
by concurrent requests.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from imagegen_gateway.config import GatewayConfig
from imagegen_gateway.faults import FaultInjector
from imagegen_gateway.files import UploadStore
from imagegen_gateway.limiter import GatewayLimiter
from imagegen_gateway.render import Renderer, RenderSpec

LAST_BODIES = 50
# Keys that may carry secrets in a request body: never kept, never shown by /_gateway/stats.
_SECRET_KEYS = frozenset({"byok_api_key", "api_key", "authorization"})
_TIMELINE_SECONDS = 86_400


def scrub(value: Any) -> Any:
    """A copy of a JSON value without secret-bearing keys, at any depth."""
    if isinstance(value, Mapping):
        return {k: scrub(v) for k, v in value.items() if str(k).lower() not in _SECRET_KEYS}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


@dataclass
class StoredFile:
    data: bytes
    content_type: str
    expires_at: float


class FileStore:
    """Images handed out as URLs: bounded (LRU) and expiring, like a provider's CDN links."""

    def __init__(self, capacity: int, ttl_seconds: float) -> None:
        self.capacity = capacity
        self.ttl_seconds = ttl_seconds
        self._files: OrderedDict[str, StoredFile] = OrderedDict()

    def put(self, data: bytes, content_type: str, extension: str) -> str:
        """Store ``data`` and return its unguessable token (used as the URL's last path segment)."""
        token = f"{secrets.token_urlsafe(16)}.{extension}"
        self._files[token] = StoredFile(data, content_type, time.monotonic() + self.ttl_seconds)
        while len(self._files) > self.capacity:
            self._files.popitem(last=False)
        return token

    def get(self, token: str) -> StoredFile | None:
        stored = self._files.get(token)
        if stored is None:
            return None
        if time.monotonic() >= stored.expires_at:
            del self._files[token]
            return None
        self._files.move_to_end(token)
        return stored

    def __len__(self) -> int:
        return len(self._files)


@dataclass
class Stats:
    """What went on the wire, for tests and benchmark plots (``GET /_gateway/stats``)."""

    total_requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_route: Counter[str] = field(default_factory=Counter)
    generation_requests: int = 0
    rate_limited: int = 0
    images_generated: int = 0
    charged_images: int = 0
    spent_usd: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    dropped_connections: int = 0
    content_policy_rejections: int = 0
    file_requests: int = 0
    file_requests_with_authorization: int = 0
    file_not_found: int = 0
    bytes_served: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    batches_created: int = 0
    #: Batch lines served, and those whose custom_id an earlier batch already carried (an image paid twice).
    batch_lines: int = 0
    batch_lines_resubmitted: int = 0
    #: Batch lines charged for a custom_id an earlier line was already charged for: an image paid twice.
    batch_lines_charged_twice: int = 0
    accepted_per_second: Counter[int] = field(default_factory=Counter)
    last_request_bodies: deque[Any] = field(default_factory=lambda: deque(maxlen=LAST_BODIES))
    last_request_paths: deque[str] = field(default_factory=lambda: deque(maxlen=LAST_BODIES))

    def record_body(self, path: str, body: Any) -> None:
        self.last_request_bodies.append(scrub(body))
        self.last_request_paths.append(path)

    def record_accepted(self, now: float | None = None) -> None:
        second = math.floor(time.time() if now is None else now)
        self.accepted_per_second[second] += 1
        if len(self.accepted_per_second) > _TIMELINE_SECONDS:
            del self.accepted_per_second[min(self.accepted_per_second)]


class GatewayState:
    """Held by ``app.state.gateway``."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.renderer = Renderer(config.render_cache_size, config.image_detail)
        #: Renders in progress, so concurrent requests for the same image wait for one render.
        self.rendering: dict[RenderSpec, anyio.Event] = {}
        self.files = FileStore(config.url_cache_size, config.url_ttl_seconds)
        self.limiter = GatewayLimiter(config.rpm, config.ipm, config.burst, config.image_burst,
                                      shape=config.limiter)
        self.faults = FaultInjector(config)
        self.stats = Stats()
        #: Files of the Files API (batch input, output and error files), on disk.
        self.uploads = UploadStore()
        self.balance_usd = config.balance_usd
        self.started_at = time.time()

    def can_afford(self, cost_usd: float) -> bool:
        # A tiny epsilon so that a balance of exactly N images pays for N images despite float rounding.
        return self.balance_usd is None or cost_usd <= self.balance_usd + 1e-9

    def charge(self, cost_usd: float, images: int) -> None:
        if self.balance_usd is not None:
            self.balance_usd = round(max(0.0, self.balance_usd - cost_usd), 9)
        self.stats.spent_usd = round(self.stats.spent_usd + cost_usd, 9)
        self.stats.charged_images += images

    def reset(self) -> None:
        """Zero counters, refill the buckets, restore the balance and replay the fault sequence from its seed."""
        self.stats = Stats()
        self.limiter.reset()
        self.faults.reseed()
        self.balance_usd = self.config.balance_usd

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "total_requests": s.total_requests,
            "by_status": {str(code): count for code, count in sorted(s.by_status.items())},
            "by_route": dict(sorted(s.by_route.items())),
            "generation_requests": s.generation_requests,
            "rate_limited": s.rate_limited,
            "images_generated": s.images_generated,
            "charged_images": s.charged_images,
            "spent_usd": round(s.spent_usd, 6),
            "balance_usd": None if self.balance_usd is None else round(self.balance_usd, 6),
            "faults": dict(sorted(s.faults.items())),
            "dropped_connections": s.dropped_connections,
            "content_policy_rejections": s.content_policy_rejections,
            "file_requests": s.file_requests,
            "file_requests_with_authorization": s.file_requests_with_authorization,
            "file_not_found": s.file_not_found,
            "files_stored": len(self.files),
            "bytes_served": s.bytes_served,
            "in_flight": s.in_flight,
            "max_in_flight": s.max_in_flight,
            "batches_created": s.batches_created,
            "batch_lines": s.batch_lines,
            "batch_lines_resubmitted": s.batch_lines_resubmitted,
            "batch_lines_charged_twice": s.batch_lines_charged_twice,
            "uploaded_files": len(self.uploads),
            "accepted_timeline": [[second, count] for second, count in sorted(s.accepted_per_second.items())],
            "render_cache": {"hits": self.renderer.hits, "misses": self.renderer.misses},
            "last_request_bodies": list(s.last_request_bodies),
            "last_request_paths": list(s.last_request_paths),
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }

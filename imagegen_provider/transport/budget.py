"""The budget every process using one connection shares: moving windows kept by the ``limits`` package (in
memory, or in Redis with ``redis://host:port/db``), and the 429 pause as one Redis key every process polls.

Within a process the :mod:`~imagegen_provider.transport.pacing` pacers space sends evenly; this budget only keeps
several processes, together, under one limit.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import random
import time
from collections import deque
from typing import Any

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from redis.exceptions import LockError

from imagegen_provider.transport.learner import WindowShape
from imagegen_provider.transport.pacing import MAX_IMAGES_PER_REQUEST

#: How long accepted requests are remembered: two windows, enough to count any window a refusal ends.
LEDGER_SECONDS = 150.0
#: A learned shape nobody confirmed for this long is forgotten (the gateway's limits may have changed).
SHAPE_TTL_SECONDS = 3600
#: The probe lock lapses this long after its holder last renewed it: a prober that died (or hung) hands the
#: cold start to another process within this time. The holder renews it every second or so.
PROBE_LOCK_SECONDS = 10.0

#: One learned sliding window's log (sorted set scored by send time): admit one request at ``now`` if fewer
#: than ``capacity`` were admitted since ``now - span``; else answer how long until the slot frees.
#: KEYS[1] log; ARGV: now, span, capacity, member, expiry (s). Returns "0" (admitted) or the wait.
_TAKE_SLOT = """
local now, span, capacity = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - span)
local used = redis.call('ZCARD', KEYS[1])
if used < capacity then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return '0'
end
local entry = redis.call('ZRANGE', KEYS[1], used - capacity, used - capacity, 'WITHSCORES')
return tostring(math.max(0.001, tonumber(entry[2]) + span - now))
"""
#: Give back the slot of a refused request sent at ARGV[1]: the latest entry admitted up to a second before.
_GIVE_BACK = """
local found = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[1], tonumber(ARGV[1]) - 1, 'LIMIT', 0, 1)
if found[1] then redis.call('ZREM', KEYS[1], found[1]) end
return 0
"""


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


class _Window(RateLimitItemPerSecond):
    """A moving window whose storage key ignores its size.

    ``limits`` puts the amount in the key, so a window resized at run time (a limit learned from headers or
    from 429s) would start empty and let a burst through; with one key the requests already counted stay
    counted, whatever the current size.
    """

    def key_for(self, *identifiers: bytes | str | int | float) -> str:
        return "/".join([self.namespace, *(str(i) for i in identifiers)])


def _window(item: RateLimitItem) -> RateLimitItem:
    return _Window(item.amount, item.multiples)


def is_shared_backend(backend: str | None) -> bool:
    return bool(backend) and not str(backend).startswith("memory")


class SharedBudget:
    """Request and image windows, and the pause deadline, for one namespace (usually the connection id).

    Created inside the running loop: ``limits``' memory storage and the redis clients bind to it.
    """

    def __init__(self, backend: str | None, namespace: str) -> None:
        self.namespace = namespace
        self._redis: Any = None
        self._storage: Storage
        if backend and is_shared_backend(backend):
            import redis.asyncio as aioredis

            uri = backend if backend.startswith("async+") else "async+" + backend
            storage = storage_from_string(uri, implementation="redispy")
            assert isinstance(storage, Storage), "an async+ URI gives an async storage"
            self._storage = storage
            self._redis = aioredis.from_url(backend.removeprefix("async+"))
        else:
            self._storage = MemoryStorage()
        self._strategy = MovingWindowRateLimiter(self._storage)
        self._accepted: deque[float] = deque()
        #: In memory: the learned sliding window's log (send times, sorted) and whether it was seeded.
        self._slots: list[float] = []
        self._seeded = False
        self._probe_lock: Any = None

    async def aclose(self) -> None:
        if self._redis is not None:
            await self.release_probe()
            await self._redis.aclose()
            self._redis = None

    def _key(self, kind: str) -> tuple[str, str]:
        return ("imagegen", f"{self.namespace}:{kind}")

    async def take(self, rpm: float | None, ipm: float | None, images: int) -> float:
        """Draw one request and ``images`` images from the windows: 0, or how long to wait (nothing drawn)."""
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
        stats = await self._strategy.get_window_stats(item, *key)
        return max(0.001, stats.reset_time - time.time())

    @property
    def _pause_key(self) -> str:
        return f"imagegen:{self.namespace}:pause_until"

    async def shared_pause_until(self) -> float | None:
        """The latest pause deadline any process set (wall-clock seconds), if the backend is shared."""
        if self._redis is None:
            return None
        value = await self._redis.zscore(self._pause_key, "until")
        return None if value is None else float(value)

    async def share_pause(self, until: float) -> None:
        if self._redis is not None:
            # A sorted set with ZADD GT keeps the latest deadline atomically (Redis >= 6.2): two processes
            # rate-limited at once can never shorten each other's pause. A deadline in the past is no pause,
            # so the key needs no expiry.
            await self._redis.zadd(self._pause_key, {"until": until}, gt=True)

    # -- what the gateway accepted, and what was learned from it ---------------------------------------------

    @property
    def _accepted_key(self) -> str:
        return f"imagegen:{self.namespace}:accepted"

    @property
    def _shape_key(self) -> str:
        return f"imagegen:{self.namespace}:shape"

    async def record_accepted(self, sent_at: float) -> None:
        """One request sent at ``sent_at`` (wall clock) was accepted: counted by every process sharing the
        backend, so that a window's capacity is learned from everyone's traffic."""
        if self._redis is None:
            self._accepted.append(sent_at)
            while self._accepted and self._accepted[0] < sent_at - LEDGER_SECONDS:
                self._accepted.popleft()
            return
        # A sorted set scored by send time; the member only has to be unique.
        member = f"{sent_at:.6f}:{random.getrandbits(48):x}"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self._accepted_key, {member: sent_at})
            pipe.zremrangebyscore(self._accepted_key, "-inf", sent_at - LEDGER_SECONDS)
            pipe.expire(self._accepted_key, int(LEDGER_SECONDS) * 2)
            await pipe.execute()

    async def accepted_since(self, start: float) -> list[float]:
        """Send times of the accepted requests sent at or after ``start``, oldest first."""
        if self._redis is None:
            return sorted(t for t in self._accepted if t >= start)
        values = await self._redis.zrangebyscore(self._accepted_key, start, "+inf", withscores=True)
        return sorted(float(score) for _, score in values)

    async def share_shape(self, shape: WindowShape) -> None:
        if self._redis is not None:
            await self._redis.set(self._shape_key, shape.encode(), ex=SHAPE_TTL_SECONDS)

    async def shared_shape(self) -> WindowShape | None:
        if self._redis is None:
            return None
        return WindowShape.decode(await self._redis.get(self._shape_key))

    # -- the learned request rate (token buckets), one for every process ---------------------------------------

    def _rate_key(self, unit: str) -> str:
        suffix = "" if unit == "requests" else f":{unit}"
        return f"imagegen:{self.namespace}:learned_rate{suffix}"

    async def shared_rate(self, *, unit: str = "requests") -> float | None:
        """The rate (``unit`` per second: requests or images) some process learned last, if believable."""
        if self._redis is None:
            return None
        value = await self._redis.get(self._rate_key(unit))
        try:
            rate = float(value) if value is not None else math.nan
        except ValueError:
            return None
        return rate if math.isfinite(rate) and 0.0 < rate < 1e6 else None

    async def claim_rate_change(self, seconds: float, *, unit: str = "requests") -> bool:
        """Whether this process may change the shared rate now: one change per ``seconds`` for everyone, so
        that a burst of 429s seen by four processes is one decrease, not four."""
        if self._redis is None:
            return True
        key = f"{self._rate_key(unit)}:lock"
        return bool(await self._redis.set(key, "1", nx=True, px=max(1, int(seconds * 1000))))

    async def share_rate(self, rate: float, *, unit: str = "requests") -> None:
        if self._redis is not None:
            await self._redis.set(self._rate_key(unit), repr(rate), ex=SHAPE_TTL_SECONDS)

    async def members(self, member: str, now: float, *, alive: float = 5.0) -> int:
        """Mark ``member`` (one limiter) alive at ``now``; how many limiters were alive in the last ``alive``
        seconds (at least 1). Learned limits are shared, so each process paces at its share of them."""
        if self._redis is None:
            return 1
        key = f"imagegen:{self.namespace}:members"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {member: now})
            pipe.zremrangebyscore(key, "-inf", now - alive)
            pipe.zcard(key)
            pipe.expire(key, int(alive * 4))
            results = await pipe.execute()
        return max(1, int(results[2]))

    # -- a learned sliding window, matched slot by slot --------------------------------------------------------

    @property
    def _slots_key(self) -> str:
        return f"imagegen:{self.namespace}:window"

    async def seed_window(self) -> None:
        """Start the learned sliding window's log from the requests the gateway accepted (by anyone) before
        the window was identified: they hold its slots until they leave it. Once per namespace (a second copy
        would count them twice), so the first process to call it wins."""
        if self._redis is None:
            if not self._seeded:
                self._seeded = True
                for sent_at in self._accepted:
                    bisect.insort(self._slots, sent_at)
            return
        if not await self._redis.set(f"{self._slots_key}:seeded", "1", nx=True, ex=SHAPE_TTL_SECONDS):
            return
        accepted = await self._redis.zrangebyscore(self._accepted_key, time.time() - LEDGER_SECONDS, "+inf",
                                                   withscores=True)
        if accepted:
            await self._redis.zadd(self._slots_key, dict(accepted))
            await self._redis.expire(self._slots_key, int(LEDGER_SECONDS) * 2)

    async def take_slot(self, capacity: int, *, now: float, span: float) -> float:
        """Admit one request at ``now`` (wall clock) into a window of ``capacity`` per ``span`` seconds: 0, or
        how long until the oldest slot frees (nothing taken)."""
        if self._redis is None:
            del self._slots[:bisect.bisect_right(self._slots, now - span)]
            if len(self._slots) < capacity:
                bisect.insort(self._slots, now)
                return 0.0
            return max(0.001, self._slots[len(self._slots) - capacity] + span - now)
        member = f"{now:.6f}:{random.getrandbits(48):x}"
        wait = await self._redis.eval(_TAKE_SLOT, 1, self._slots_key, repr(now), repr(span), capacity, member,
                                      int(LEDGER_SECONDS) * 2)
        return float(wait)

    async def give_back_slot(self, sent_at: float) -> None:
        """A request sent at ``sent_at`` was refused: a sliding window did not count it, so neither does the log."""
        if self._redis is None:
            index = bisect.bisect_right(self._slots, sent_at) - 1
            if index >= 0 and self._slots[index] >= sent_at - 1.0:
                del self._slots[index]
            return
        await self._redis.eval(_GIVE_BACK, 1, self._slots_key, repr(sent_at))

    # -- the cold start: one prober per namespace ------------------------------------------------------------

    @property
    def _warm_key(self) -> str:
        return f"imagegen:{self.namespace}:warm"

    async def claim_probe(self) -> bool:
        """Whether this process is (or just became) the one that probes the gateway while nothing is learned.
        A redis-py lock with a timeout: it lapses :data:`PROBE_LOCK_SECONDS` after its last renewal, so a dead
        prober never blocks the others for longer. Always ``True`` in memory (one process)."""
        if self._redis is None:
            return True
        if self._probe_lock is None:
            self._probe_lock = self._redis.lock(f"imagegen:{self.namespace}:probe", timeout=PROBE_LOCK_SECONDS,
                                                blocking=False, thread_local=False)
        try:
            if await self._probe_lock.owned():
                await self._probe_lock.reacquire()
                return True
            return bool(await self._probe_lock.acquire(blocking=False))
        except LockError:
            # It lapsed between the two calls: another process may hold it now; ask again next time.
            return False

    async def release_probe(self) -> None:
        if self._probe_lock is None or self._redis is None:
            return
        lock, self._probe_lock = self._probe_lock, None
        with contextlib.suppress(LockError):  # never held, or it lapsed: nothing to give back
            await lock.release()

    async def mark_warm(self) -> None:
        """Something was learned (or the gateway showed no limit at one process's pace): the cold start is over
        for every process sharing the namespace."""
        if self._redis is not None:
            await self._redis.set(self._warm_key, "1", ex=SHAPE_TTL_SECONDS)

    async def is_warm(self) -> bool:
        if self._redis is None:
            return True
        return bool(await self._redis.exists(self._warm_key))

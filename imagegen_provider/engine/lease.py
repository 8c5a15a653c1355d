"""One writer per output shard: a lease object under ``metadata/_leases/``, kept alive by a heartbeat.

Two runs writing the same shard of the same output would pay twice for every image (neither sees the
other's images until they are recorded) and fold each other's journals. The lease makes the second run fail
fast, naming the holder. A holder that died (SIGKILL, lost machine) stops heartbeating; its lease is stale
after ``stale_after`` seconds and the next run takes over.

Creation is atomic where the store allows it: ``O_CREAT | O_EXCL`` on a local filesystem, a conditional PUT
(``If-None-Match: *``, s3fs's ``pipe_file(mode="create")``) on S3. Other fsspec filesystems get the same
``mode="create"``, which fsspec implements as check-then-write where the backend has nothing better; an fsspec
too old for ``mode`` gets write-then-read-back with a unique token. Both narrow the race (two writers starting
within the same round trip) without closing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from imagegen_provider.engine.storage import StorageLocation, _is_local

log = logging.getLogger(__name__)

LEASE_DIR = "metadata/_leases"
#: Without a heartbeat for this long, a lease is stale and may be taken over.
DEFAULT_STALE_AFTER = 120.0


class LeaseHeldError(RuntimeError):
    """Another live run holds the lease of this output shard."""


@dataclass(frozen=True)
class LeaseInfo:
    """What a lease object says about its holder."""

    shard: str
    run_id: str
    host: str
    pid: int
    since: str
    heartbeat: str
    stale_after: float
    token: str

    def age(self, now: datetime | None = None) -> float:
        """Seconds since the last heartbeat (by this machine's clock: keep ``stale_after`` well above skew)."""
        beat = datetime.fromisoformat(self.heartbeat)
        return ((now or datetime.now(UTC)) - beat).total_seconds()

    @property
    def live(self) -> bool:
        return self.age() < self.stale_after and not self._holder_dead()

    def _holder_dead(self) -> bool:
        """On the holder's own host a dead pid is known at once (a SIGKILLed run need not wait for staleness).
        A reused pid only makes us wait for the heartbeat to go stale."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # exists, owned by another user
        return False

    def describe(self) -> str:
        return (
            f"run {self.run_id} on host {self.host} (pid {self.pid}) since {self.since}, "
            f"last heartbeat {self.age():.0f}s ago"
        )

    @classmethod
    def parse(cls, data: bytes) -> LeaseInfo | None:
        try:
            values = json.loads(data)
            info = cls(**{name: values[name] for name in cls.__dataclass_fields__})
            info.age()  # a heartbeat that is not a timestamp cannot say whether its holder lives
            float(info.stale_after)
            return info
        except (ValueError, KeyError, TypeError):
            # A half-written or foreign object: treated as no lease (it cannot name a live holder).
            return None


def _lease_path(shard: str) -> str:
    return f"{LEASE_DIR}/{shard}.json"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def read_lease(output: StorageLocation, shard: str) -> LeaseInfo | None:
    try:
        return LeaseInfo.parse(output.read_bytes(_lease_path(shard)))
    except FileNotFoundError:
        return None


def live_leases(output: Any, storage_options: Any = None) -> list[LeaseInfo]:
    """Leases of runs still writing ``output`` (finalize must not fold their journals)."""
    location = StorageLocation.from_url(output, storage_options)
    found = []
    for relative in location.list_files(LEASE_DIR, suffix=".json"):
        try:
            info = LeaseInfo.parse(location.read_bytes(relative))
        except FileNotFoundError:
            continue
        if info is not None and info.live:
            found.append(info)
    return found


def _create_exclusive(output: StorageLocation, relative: str, data: bytes) -> bool:
    """Create ``relative`` only if it does not exist. Returns False when it already did."""
    path = output.path(relative)
    if _is_local(output.fs):
        output.fs.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True
    try:
        # s3fs: a PUT with If-None-Match: * (S3 answers 412 when the key exists).
        output.fs.pipe_file(path, data, mode="create")
        return True
    except TypeError:
        pass  # this filesystem has no exclusive create: fall through to write-then-read-back
    except (FileExistsError, OSError) as exc:
        if isinstance(exc, FileExistsError) or "PreconditionFailed" in repr(exc) or "412" in str(exc):
            return False
        raise
    # Racy fallback: two writers that both see no object both write; the read-back tells the loser only if
    # the winner's write landed between its write and its read.
    if output.exists(relative):
        return False
    output.fs.pipe_file(path, data)
    return True


class Lease:
    """The lease of one shard of one output, held by this process.

    :param output: the output root.
    :param shard: the shard label (one lease per shard).
    :param run_id: recorded in the lease, to name the holder.
    :param stale_after: seconds without a heartbeat after which another run may take over.
    """

    def __init__(self, output: StorageLocation, *, shard: str, run_id: str, stale_after: float = DEFAULT_STALE_AFTER):
        self.output = output
        self.info = LeaseInfo(
            shard=shard, run_id=run_id, host=socket.gethostname(), pid=os.getpid(), since=_now(), heartbeat=_now(),
            stale_after=stale_after, token=uuid.uuid4().hex,
        )
        self._held = False

    @property
    def relative(self) -> str:
        return _lease_path(self.info.shard)

    def _encode(self) -> bytes:
        return json.dumps(asdict(self.info)).encode()

    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseHeldError` naming the live holder."""
        for _ in range(3):
            if _create_exclusive(self.output, self.relative, self._encode()):
                current = read_lease(self.output, self.info.shard)
                if current is not None and current.token == self.info.token:
                    self._held = True
                    return
            current = read_lease(self.output, self.info.shard)
            if current is not None and current.live:
                raise LeaseHeldError(
                    f"output {self.output.uri} (shard {self.info.shard}) is being written by {current.describe()}; "
                    f"one writer per output shard (a lease without heartbeat for {current.stale_after:.0f}s is "
                    "taken over)"
                )
            self._take_over(current)
        raise LeaseHeldError(f"could not take the lease of {self.output.uri_of(self.relative)}: contended")

    def _take_over(self, stale: LeaseInfo | None) -> None:
        # Re-read just before removing, so that a lease another taker has just created is not removed.
        again = read_lease(self.output, self.info.shard)
        if again is not None and stale is not None and again.token != stale.token:
            return
        if stale is not None:
            log.warning("Taking over the stale lease of %s", stale.describe())
        with contextlib.suppress(FileNotFoundError):
            self.output.remove([self.relative])

    def still_ours(self) -> bool:
        current = read_lease(self.output, self.info.shard)
        return current is not None and current.token == self.info.token

    def beat(self) -> bool:
        """Renew the heartbeat. Returns False when the lease was taken from us (we were thought dead)."""
        if not self.still_ours():
            return False
        self.info = LeaseInfo(**{**asdict(self.info), "heartbeat": _now()})
        self.output.write_bytes(self.relative, self._encode(), atomic=True)
        return True

    async def keep_alive(self, on_lost: Callable[[str], None]) -> None:
        """Heartbeat every quarter of ``stale_after`` until cancelled; ``on_lost`` when the lease is gone."""
        while True:
            await asyncio.sleep(self.info.stale_after / 4)
            try:
                ours = await asyncio.to_thread(self.beat)
            except Exception as exc:
                # A failed heartbeat is not yet a lost lease; storage failures are caught by the writes.
                log.warning("Lease heartbeat failed: %s: %s", type(exc).__name__, exc)
                continue
            if not ours:
                on_lost(f"lease of shard {self.info.shard} was taken over by another run")
                return

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            if self.still_ours():
                self.output.remove([self.relative])
        except Exception as exc:
            log.warning("Could not release the lease %s: %s: %s", self.output.uri_of(self.relative),
                        type(exc).__name__, exc)

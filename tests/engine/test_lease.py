"""One writer per output shard: the lease is created atomically, names its holder, is kept alive, goes
stale, is taken over from a dead holder, and is released."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from imagegen_provider.engine.lease import Lease, LeaseHeldError, live_leases, read_lease
from imagegen_provider.engine.storage import StorageLocation


def _lease(output: StorageLocation, shard: str = "all", run_id: str = "run-a", stale_after: float = 120.0) -> Lease:
    return Lease(output, shard=shard, run_id=run_id, stale_after=stale_after)


def test_second_lease_on_the_same_shard_fails_naming_the_holder(tmp_path):
    output = StorageLocation.from_url(str(tmp_path / "out"))
    first = _lease(output)
    first.acquire()
    with pytest.raises(LeaseHeldError) as raised:
        _lease(output, run_id="run-b").acquire()
    message = str(raised.value)
    assert "run run-a" in message and f"pid {first.info.pid}" in message and first.info.host in message
    assert first.info.since in message
    other = _lease(output, shard="rows-000000000-000000010", run_id="run-c")
    other.acquire()  # another shard of the same output has its own lease
    assert sorted(info.run_id for info in live_leases(str(tmp_path / "out"))) == ["run-a", "run-c"]
    first.release()
    other.release()
    assert live_leases(str(tmp_path / "out")) == []
    _lease(output, run_id="run-d").acquire()  # released: free again


def test_stale_lease_is_taken_over(tmp_path, caplog):
    output = StorageLocation.from_url(str(tmp_path / "out"))
    old = _lease(output, run_id="run-old")
    old.acquire()
    # Its holder stopped heartbeating long ago (same host, but not a pid of ours: made to look remote).
    data = json.loads(output.read_bytes(old.relative))
    data["heartbeat"] = (datetime.now(UTC) - timedelta(seconds=600)).isoformat()
    data["host"] = "another-host"
    output.write_bytes(old.relative, json.dumps(data).encode())
    assert live_leases(str(tmp_path / "out")) == []
    caplog.set_level(logging.WARNING)
    new = _lease(output, run_id="run-new")
    new.acquire()
    assert read_lease(output, "all").run_id == "run-new"
    assert "Taking over the stale lease of run run-old on host another-host" in caplog.text
    assert not old.beat()  # the old holder learns it lost the lease at its next heartbeat


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    output = StorageLocation.from_url(str(tmp_path / "out"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held = _lease(output, run_id="run-killed")
    held.acquire()
    data = json.loads(output.read_bytes(held.relative))
    data["pid"] = int(dead.stdout)
    output.write_bytes(held.relative, json.dumps(data).encode())
    _lease(output, run_id="run-retry").acquire()
    assert read_lease(output, "all").run_id == "run-retry"


async def test_heartbeat_renews_and_reports_a_lost_lease(tmp_path):
    output = StorageLocation.from_url(str(tmp_path / "out"))
    lease = _lease(output, stale_after=0.2)
    lease.acquire()
    before = read_lease(output, "all").heartbeat
    assert lease.beat() and read_lease(output, "all").heartbeat > before
    lost: list[str] = []
    output.remove([lease.relative])  # another run took it over
    await lease.keep_alive(lost.append)  # returns once the loss is seen
    assert lost and "taken over" in lost[0]


def test_lease_on_s3_uses_a_conditional_put(s3_server):
    options = s3_server["storage_options"]
    url = f"s3://{s3_server['bucket']}/lease-{uuid.uuid4().hex}"
    output = StorageLocation.from_url(url, options)
    first = _lease(output, run_id="run-s3-a")
    first.acquire()
    with pytest.raises(LeaseHeldError, match="run run-s3-a"):
        _lease(StorageLocation.from_url(url, options), run_id="run-s3-b").acquire()
    assert [info.run_id for info in live_leases(url, options)] == ["run-s3-a"]
    first.release()
    assert live_leases(url, options) == []


def test_unreadable_lease_object_names_no_holder(tmp_path):
    output = StorageLocation.from_url(str(tmp_path / "out"))
    for garbage in (b"", b"{not json", json.dumps({"run_id": "x"}).encode(), json.dumps(
        {"shard": "all", "run_id": "x", "host": "h", "pid": 1, "since": "s", "heartbeat": "yesterday",
         "stale_after": 120, "token": "t"}).encode()):
        output.write_bytes("metadata/_leases/all.json", garbage)
        assert live_leases(str(tmp_path / "out")) == []
        lease = _lease(output)
        lease.acquire()  # a half-written or foreign object is taken over
        lease.release()


def test_lease_on_an_fsspec_memory_filesystem():
    url = f"memory://lease-{uuid.uuid4().hex}"
    first = _lease(StorageLocation.from_url(url), run_id="run-mem-a")
    first.acquire()
    with pytest.raises(LeaseHeldError, match="run run-mem-a"):
        _lease(StorageLocation.from_url(url), run_id="run-mem-b").acquire()
    first.release()
    _lease(StorageLocation.from_url(url), run_id="run-mem-c").acquire()

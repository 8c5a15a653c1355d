"""Real ``imagegen run`` processes: SIGTERM mid-run (no request starts after the signal, the rerun pays
nothing twice) and two writers on one output (the second fails fast naming the first)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import SMALL_ARGS, cli, prompts, recorded_rows, report, stored_images

IS_ROOT = os.geteuid() == 0


def _wait_for_requests(hostile, count: int, process, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(hostile.ledger.received) < count:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run sent nothing"
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_dispatch_flushes_and_the_rerun_pays_nothing_twice(tmp_path, hostile, rescue_dir, signum):
    name = signal.Signals(signum).name
    hostile.hostility.latency = 1.0
    table, output = prompts(tmp_path, 20), tmp_path / "out"
    args = ["run", table, str(output), "--base-url", hostile.base_url, *SMALL_ARGS, "--max-in-flight", "4"]
    first = cli(*args)
    _wait_for_requests(hostile, 5, first)
    # Requests start in bursts a second apart (the gateway's latency): signal between two bursts, so that a
    # request sent just before the signal is not counted as one started after it.
    time.sleep(0.3)
    signalled = time.monotonic()
    first.send_signal(signum)
    _out, err = first.communicate(timeout=120)
    text = err.decode()
    paid = hostile.ledger.charged_requests
    started_after = hostile.ledger.received_after(signalled)
    report(f"{name} mid-run", paid=paid, stored=stored_images(output), recorded=recorded_rows(output, rescue_dir),
           exit=first.returncode, requests_started_after_signal=started_after)
    assert first.returncode == 128 + signum, text[-3000:]
    assert [line for line in text.splitlines() if line.startswith(f"stopped by {name}")], text[-3000:]
    assert "Traceback" not in text
    assert started_after == 0, ([(round(t - signalled, 3), p) for t, p, _s in hostile.ledger.received], text[-4000:])
    # The requests in flight at the signal finished within the grace period and are on record.
    assert recorded_rows(output, rescue_dir) == paid == stored_images(output)

    rerun = cli(*args)
    _out, err = rerun.communicate(timeout=180)
    report(f"{name}: rerun", paid=hostile.ledger.charged_requests, stored=stored_images(output),
           recorded=recorded_rows(output, rescue_dir), exit=rerun.returncode)
    assert rerun.returncode == 0, err.decode()[-3000:]
    assert hostile.ledger.charged_twice() == []
    assert hostile.ledger.charged_requests == 20 == stored_images(output)


def test_second_writer_on_the_same_output_fails_fast_naming_the_first(tmp_path, hostile, rescue_dir):
    # Slow enough (about 10 s in all) that the first is still running when the second has started and given up.
    hostile.hostility.latency = 2.0
    table, output = prompts(tmp_path, 8), tmp_path / "out"
    args = ["run", table, str(output), "--base-url", hostile.base_url, *SMALL_ARGS, "--max-in-flight", "2"]
    first = cli(*args)
    _wait_for_requests(hostile, 1, first)
    second = cli(*args)
    _out, err = second.communicate(timeout=60)
    text = err.decode()
    assert first.poll() is None  # the first was still running when the second gave up
    _first_out, first_err = first.communicate(timeout=120)
    report("two writers on one output", paid=hostile.ledger.charged_requests, stored=stored_images(output),
           recorded=recorded_rows(output, rescue_dir), exit_first=first.returncode, exit_second=second.returncode)
    assert second.returncode == 2, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is being written by run" in errors[0] and f"(pid {first.pid})" in errors[0]
    assert "Traceback" not in text
    assert first.returncode == 0, first_err.decode()[-3000:]
    assert hostile.ledger.charged_twice() == [] and hostile.ledger.charged_requests == 8

    # The lease was released: a third run starts, finds everything stored and pays nothing.
    third = cli(*args)
    _out, err = third.communicate(timeout=60)
    assert third.returncode == 0, err.decode()[-3000:]
    assert hostile.ledger.charged_requests == 8


@pytest.mark.skipif(not IS_ROOT, reason="remounting read-only needs root")
def test_output_turning_read_only_mid_run_stops_and_keeps_the_ledger(tmp_path, hostile, rescue_dir):
    hostile.hostility.latency = 0.5
    table, disk = prompts(tmp_path, 24), tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    try:
        output = disk / "out"
        args = ["run", table, str(output), "--base-url", hostile.base_url, *SMALL_ARGS, "--max-in-flight", "4"]
        first = cli(*args)
        _wait_for_requests(hostile, 6, first)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        _out, err = first.communicate(timeout=120)
        text = err.decode()
        paid, stored = hostile.ledger.charged_requests, stored_images(output)
        report("output turns read-only mid-run", paid=paid, stored=stored,
               recorded=recorded_rows(output, rescue_dir), exit=first.returncode)
        assert first.returncode == 3, text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Read-only file system" in errors[0] and "Traceback" not in text
        ledger = Path(errors[0].split("saved to ", 1)[1].split(" and are imported", 1)[0])
        assert ledger.is_file() and ledger.is_relative_to(rescue_dir)
        assert paid < 24 and paid - stored <= 4
        assert recorded_rows(output, rescue_dir) == paid

        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        rerun = cli(*args)
        _out, err = rerun.communicate(timeout=180)
        report("read-only mid-run: rerun", paid=hostile.ledger.charged_requests, stored=stored_images(output),
               recorded=recorded_rows(output, rescue_dir), exit=rerun.returncode)
        assert rerun.returncode == 0, err.decode()[-3000:]
        assert hostile.ledger.charged_requests == 24 and hostile.ledger.charged_twice() == []
        assert stored_images(output) == 24
        assert not ledger.exists()  # imported into the output's metadata
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)

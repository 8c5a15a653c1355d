"""The output refuses writes: a file where the folder should be, a read-only folder, a disk that fills up
mid-run. Nothing is paid before the output proved writable; once it refuses a write, dispatch stops, the
paid rows it refused go to the rescue ledger named in the one error line, and the rerun completes paying
nothing twice: the images that were paid but could not be stored (at most max_in_flight) were kept in the
rescue folder and the rerun stores them."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from imagegen_provider.cli import main
from imagegen_provider.engine.storage import StorageLocation

from .conftest import SMALL_ARGS, SMALL_PRICE, prompts, recorded_rows, report, stored_images

IS_ROOT = os.geteuid() == 0


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_output_path_is_a_file_fails_before_any_request(tmp_path, hostile, capsys):
    table = prompts(tmp_path, 40)
    output = tmp_path / "out"
    output.write_text("not a folder")
    code, out, err = _run(capsys, "run", table, str(output), "--base-url", hostile.base_url, *SMALL_ARGS)
    report("output is a file", paid=hostile.ledger.charged_requests, stored=0, recorded=0, exit=code)
    assert code == 2 and not out
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "is not writable" in lines[0] and "nothing was sent" in lines[0]
    assert "Traceback" not in err
    assert hostile.ledger.received == []


@pytest.mark.skipif(not IS_ROOT, reason="a read-only mount needs root (chmod does not stop root)")
def test_read_only_output_fails_before_any_request(tmp_path, hostile, capsys):
    table = prompts(tmp_path, 10)
    with tmpfs(tmp_path / "ro", "ro,size=1m") as output:
        code, _out, err = _run(capsys, "run", table, str(output / "out"), "--base-url", hostile.base_url, *SMALL_ARGS)
    report("read-only folder", paid=hostile.ledger.charged_requests, stored=0, recorded=0, exit=code)
    assert code == 2 and "is not writable" in err and "Read-only file system" in err
    assert hostile.ledger.received == []


def _full_disk_figures(case: str, hostile, output: Path, rescue: Path, code: int) -> tuple[int, int]:
    paid, stored = hostile.ledger.charged_requests, stored_images(output)
    recorded = recorded_rows(output, rescue)
    report(case, paid=paid, stored=stored, recorded=recorded, exit=code)
    return paid, stored


def _check_full_disk_run(code: int, err: str, paid: int, stored: int, output: Path, rescue_dir: Path) -> None:
    assert code == 3, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "refused a write" in lines[0] and "Traceback" not in err
    assert 0 < paid < 40  # stopped dispatching
    assert paid - stored <= 4  # paid but not stored: at most max_in_flight
    assert recorded_rows(output, rescue_dir) == paid  # every payment is on record, in the output or the ledger
    assert "kept in" in lines[0] and "not paid again" in lines[0]
    if "saved to" in lines[0]:
        ledger = lines[0].split("saved to ", 1)[1].split(" and are imported", 1)[0]
        assert Path(ledger).is_file() and Path(ledger).is_relative_to(rescue_dir)


def _check_rerun(hostile, output: Path, first_paid: int, first_stored: int, code: int) -> None:
    assert code == 0
    # The images paid but not stored were kept in the rescue folder and stored by the rerun: nothing was paid
    # twice, and the dataset's cost counts each payment once.
    assert first_paid > first_stored
    assert hostile.ledger.charged_requests == 40 and hostile.ledger.charged_twice() == []
    assert stored_images(output) == 40
    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["complete"] and summary["succeeded"] == 40
    assert summary["total_cost_usd"] == pytest.approx(40 * SMALL_PRICE)


@pytest.mark.skipif(not IS_ROOT, reason="mounting a 2 MB tmpfs needs root (see the in-process ENOSPC case)")
def test_disk_fills_up_mid_run(tmp_path, hostile, capsys, rescue_dir):
    table = prompts(tmp_path, 40)
    args = ["--base-url", hostile.base_url, *SMALL_ARGS, "--max-in-flight", "4"]
    with tmpfs(tmp_path / "disk", "size=2m") as disk:
        output = disk / "out"
        code, _out, err = _run(capsys, "run", table, str(output), *args)
        paid, stored = _full_disk_figures("full disk (2 MB tmpfs)", hostile, output, rescue_dir, code)
        _check_full_disk_run(code, err, paid, stored, output, rescue_dir)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        code, _out, err = _run(capsys, "run", table, str(output), *args)
        _full_disk_figures("full disk: rerun after growing it", hostile, output, rescue_dir, code)
        _check_rerun(hostile, output, paid, stored, code)
        assert not list(rescue_dir.rglob("ledger-*.jsonl"))  # imported into the output


def test_disk_fills_up_mid_run_in_process(tmp_path, hostile, capsys, rescue_dir, monkeypatch):
    """The same without root: every write after the first 12 fails with ENOSPC, as on a full disk."""
    table = prompts(tmp_path, 40)
    output = tmp_path / "out"
    original = StorageLocation.write_bytes
    writes = {"count": 0, "full": True}

    def write_bytes(self, relative, data, *, atomic=False):
        writes["count"] += 1
        if writes["full"] and writes["count"] > 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, relative, data, atomic=atomic)

    monkeypatch.setattr(StorageLocation, "write_bytes", write_bytes)
    args = ["--base-url", hostile.base_url, *SMALL_ARGS, "--max-in-flight", "4"]
    code, _out, err = _run(capsys, "run", table, str(output), *args)
    paid, stored = _full_disk_figures("full disk (ENOSPC in-process)", hostile, output, rescue_dir, code)
    _check_full_disk_run(code, err, paid, stored, output, rescue_dir)
    assert "No space left on device" in err
    writes["full"] = False
    code, _out, err = _run(capsys, "run", table, str(output), *args)
    _full_disk_figures("full disk (ENOSPC): rerun", hostile, output, rescue_dir, code)
    _check_rerun(hostile, output, paid, stored, code)

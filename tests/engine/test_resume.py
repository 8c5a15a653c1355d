"""Resuming an output: what succeeded is never requested again, failures and lost files are; a run killed
with SIGKILL loses at most the images in flight, and never a cost record of a stored image."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import pandas as pd
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileOpener

from imagegen_gateway import GatewayConfig
from imagegen_provider.engine import finalize_output
from imagegen_provider.engine import metadata as metadata_module
from imagegen_provider.engine.metadata import MetadataSink, read_metadata, recover_journal
from imagegen_provider.engine.storage import StorageLocation

from ._support import SMALL_PRICE, all_files, current, history, image_files, numbered, run_batch, write_prompts


def _requests(gateway) -> int:
    return gateway.stats()["generation_requests"]


async def test_rerun_skips_what_succeeded_and_retries_what_failed(tmp_path, gateway_factory):
    ids, texts = numbered(12)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    faulty = gateway_factory(GatewayConfig(fail_503_rate=0.5, fault_seed=3))
    first = await run_batch(faulty, prompts=path, output=str(output), images_per_prompt=2, max_attempts=1)
    assert first.failed > 0 and first.succeeded > 0  # the seeded fault sequence fails some, not all
    assert first.failures_by_type == {"ServerError": first.failed}
    failed_keys = set(
        current(output).query("status == 'failed'")[["prompt_id", "image_index"]].itertuples(index=False, name=None)
    )

    healthy = gateway_factory()
    second = await run_batch(healthy, prompts=path, output=str(output), images_per_prompt=2)
    assert (second.skipped_existing, second.succeeded, second.failed) == (first.succeeded, first.failed, 0)
    assert _requests(healthy) == first.failed
    retried = {(b["prompt"]) for b in healthy.stats()["last_request_bodies"]}
    assert retried == {texts[ids.index(pid)] for pid, _ in failed_keys}

    third = await run_batch(healthy, prompts=path, output=str(output), images_per_prompt=2)
    assert (third.skipped_existing, third.succeeded, third.failed) == (24, 0, 0)
    assert _requests(healthy) == first.failed  # nothing new sent
    assert third.complete

    report = finalize_output(str(output), prompts=path, images_per_prompt=2)
    assert (report.succeeded, report.failed, report.missing, report.complete) == (24, 0, 0, True)
    dataset = pd.read_parquet(output / "metadata.parquet")
    assert len(dataset) == 24
    assert not dataset.duplicated(["prompt_id", "image_index"]).any()
    assert (dataset["status"] == "succeeded").all()
    assert sorted(dataset["file_name"]) == image_files(output)
    assert len(history(output)) == 24 + first.failed  # the failed attempts stay in the history


async def test_deleted_image_is_generated_again(tmp_path, gateway):
    ids, texts = numbered(4)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    await run_batch(gateway, prompts=path, output=str(output), run_id="first")
    victim = current(output).loc[("p002", 0), "file_name"]
    (output / victim).unlink()
    before = _requests(gateway)
    summary = await run_batch(gateway, prompts=path, output=str(output), run_id="second")
    assert (summary.succeeded, summary.skipped_existing) == (1, 3)
    assert _requests(gateway) == before + 1
    assert (output / victim).is_file()
    report = finalize_output(str(output), prompts=path)
    assert report.complete and report.succeeded == 4
    dataset = pd.read_parquet(output / "metadata.parquet").set_index("prompt_id")
    assert dataset.loc["p002", "run_id"] == "second" and dataset.loc["p001", "run_id"] == "first"


async def test_journal_of_an_interrupted_run_is_folded_in_and_trusted(tmp_path, gateway, monkeypatch):
    ids, texts = numbered(5)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    with monkeypatch.context() as patch:
        # As if killed before any part was written: the journal is the only record.
        patch.setattr(MetadataSink, "_write", lambda self, rows, journal: None)
        await run_batch(gateway, prompts=path, output=str(output))
    assert not list((output / "metadata").glob("*.parquet"))
    journal = list((output / "metadata" / "_journal" / "all").glob("*.json"))
    assert sum(len(entry.read_bytes().splitlines()) for entry in journal) == 5  # rows, grouped into entries
    # Readers already see the journaled rows.
    assert len(history(output)) == 5
    before = _requests(gateway)
    summary = await run_batch(gateway, prompts=path, output=str(output))
    assert (summary.skipped_existing, _requests(gateway)) == (5, before)
    assert all_files(output / "metadata" / "_journal") == []
    assert len(pd.read_parquet(output / "metadata")) == 5


# -- metadata writes are atomic ----------------------------------------------------------------------------


def _row(pid: str) -> dict:
    now = datetime.now(UTC)
    return {"run_id": "r", "prompt_id": pid, "image_index": 0, "status": "succeeded",
            "file_name": f"images/{pid}/0-1.png", "cost_usd": 0.01, "started_at": now, "finished_at": now}


async def test_journal_entry_interrupted_mid_write_leaves_nothing_to_trip_over(tmp_path, monkeypatch):
    location = StorageLocation.from_url(str(tmp_path / "out"))
    sink = MetadataSink(location, writer="all")
    await sink.add(_row("a"))

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(LocalFileOpener, "write", disk_full)
        with pytest.raises(OSError):
            await sink.add(_row("b"))
    # The failed entry never appears as a (truncated) entry: the journal still reads and recovers.
    assert [r["prompt_id"] for r in read_metadata(location).to_pylist()] == ["a"]
    assert recover_journal(location) == 1
    assert all_files(tmp_path / "out" / "metadata" / "_journal") == []


def test_part_interrupted_mid_write_leaves_no_truncated_part(tmp_path, monkeypatch):
    location = StorageLocation.from_url(str(tmp_path / "out"))
    real_write_table = pq.write_table

    def dies_half_way(table, where, **kwargs):
        where.write(b"PAR1 half a footer")
        raise KeyboardInterrupt  # a BaseException, as an interrupted process would see

    monkeypatch.setattr(metadata_module.pq, "write_table", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        metadata_module.write_part(location, metadata_module.rows_to_table([_row("a")]), "all")
    monkeypatch.setattr(metadata_module.pq, "write_table", real_write_table)
    assert all_files(tmp_path / "out") == []
    assert read_metadata(location).num_rows == 0


async def test_leftover_temporary_files_of_a_killed_writer_are_ignored_and_cleaned(tmp_path, gateway):
    ids, texts = numbered(3)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    await run_batch(gateway, prompts=path, output=str(output))
    # What SIGKILL during an atomic write leaves: hidden temporaries, never a truncated final file.
    (output / "metadata" / ".part-all-0123456789ab.parquet.deadbeef.tmp").write_bytes(b"PAR1 trunc")
    journal = output / "metadata" / "_journal" / "all"
    journal.mkdir(parents=True, exist_ok=True)
    (journal / ".abcd-00000009.json.deadbeef.tmp").write_bytes(b'{"run_id": "r", "prom')
    assert len(pd.read_parquet(output / "metadata")) == 3
    summary = await run_batch(gateway, prompts=path, output=str(output))
    assert summary.skipped_existing == 3
    assert all_files(output / "metadata" / "_journal") == []
    report = finalize_output(str(output), prompts=path)
    assert report.complete


# -- SIGKILL mid-run ---------------------------------------------------------------------------------------


def _cli(prompts: str, output: str, base_url: str, max_in_flight: int) -> list[str]:
    return [
        sys.executable, "-m", "imagegen_provider.cli", "run", prompts, output,
        "--base-url", f"{base_url}/v1", "--api-key", "k", "--max-in-flight", str(max_in_flight),
        "--model", "dall-e-2", "--size", "256x256", "--response-format", "b64_json", "--max-attempts", "2",
    ]


def _journal_keys(output) -> set[tuple[str, int]]:
    keys = set()
    for entry in (output / "metadata" / "_journal").rglob("*.json"):
        for line in entry.read_bytes().splitlines():  # an entry holds a group of rows, one JSON object a line
            row = json.loads(line)
            if row["status"] == "succeeded":
                keys.add((row["prompt_id"], row["image_index"]))
    return keys


def test_sigkill_mid_run_then_rerun_loses_nothing_paid_for(tmp_path, gateway_factory):
    max_in_flight = 4
    gateway = gateway_factory(GatewayConfig(latency=(0.2, 0.4), fault_seed=11))
    total = 24
    ids, texts = numbered(total)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    command = _cli(prompts, str(output), gateway.base_url, max_in_flight)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 30
    try:
        while len(_journal_keys(output) if output.exists() else ()) < 6:
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first run made no progress"
            time.sleep(0.02)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        first.stderr.close()
    assert first.returncode == -signal.SIGKILL
    on_record = _journal_keys(output)  # images whose file and journal entry existed at the kill
    files_at_kill = set(image_files(output))
    assert len(on_record) < total, "the run finished before it was killed"
    charged_first = gateway.stats()["charged_images"]

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(on_record)} already done" in second.stdout  # it resumed rather than starting over

    stats = gateway.stats()
    files = image_files(output)
    assert len(files) == total
    assert files_at_kill <= set(files)
    # Paid for but never on record: only what was in flight when the process died.
    assert stats["charged_images"] - len(files) <= max_in_flight
    assert stats["charged_images"] >= charged_first

    rows = history(output)
    succeeded = rows[rows["status"] == "succeeded"]
    # No image on record at the kill was generated a second time.
    for key in on_record:
        assert len(succeeded[(succeeded["prompt_id"] == key[0]) & (succeeded["image_index"] == key[1])]) == 1, key

    # Every image on disk: exactly one current succeeded row, with its cost.
    dataset = pd.read_parquet(output / "metadata.parquet")
    assert sorted(dataset["file_name"]) == files
    assert not dataset.duplicated(["prompt_id", "image_index"]).any()
    assert dataset["cost_usd"].notna().all() and (dataset["cost_usd"] == SMALL_PRICE).all()
    assert all_files(output / "metadata" / "_journal") == []
    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["complete"] and summary["succeeded"] == total


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_atomic_writes_publish_whole_files_only(tmp_path, scheme):
    import uuid

    url = str(tmp_path / "out") if scheme == "local" else f"memory://atomic-{uuid.uuid4().hex}"
    location = StorageLocation.from_url(url)
    location.write_bytes("a/b.json", b"first", atomic=True)
    location.write_bytes("a/b.json", b"second", atomic=True)  # replaces
    assert location.read_bytes("a/b.json") == b"second"
    with pytest.raises(RuntimeError), location.open_atomic("a/c.parquet") as handle:
        handle.write(b"half")
        raise RuntimeError("writer died")
    assert not location.exists("a/c.parquet")
    assert location.list_files("a") == ["a/b.json"]  # no temporary left behind either
    if scheme == "memory":
        location.fs.rm(location.root, recursive=True)

"""Request economy on object stores: journal entries are grouped (a group commit), so that a run costs about
one storage request per image (its upload) plus a small share of journal writes, deletes, parts and listings."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from imagegen_provider.engine.metadata import MetadataSink, read_metadata, recover_journal
from imagegen_provider.engine.storage import StorageLocation

from ..engine._support import numbered, run_batch, write_prompts
from ._stores import azurite_requests


def _row(i: int) -> dict:
    now = datetime.now(UTC)
    return {"run_id": "r", "prompt_id": f"p{i:03d}", "image_index": 0, "status": "succeeded",
            "file_name": f"images/p{i:03d}/0-1.png", "cost_usd": 0.01, "started_at": now, "finished_at": now}


def _entries(location: StorageLocation) -> list[str]:
    return location.list_files("metadata/_journal", suffix=".json")


async def test_rows_finishing_together_share_one_entry(tmp_path):
    location = StorageLocation.from_url(str(tmp_path / "out"))
    # A linger far beyond the test: the entry is written because the group is full, not because time passed.
    sink = MetadataSink(location, writer="all", group_rows=8, group_seconds=3600)
    await asyncio.wait_for(asyncio.gather(*(sink.add(_row(i)) for i in range(8))), timeout=60)
    entries = _entries(location)
    assert len(entries) == 1
    assert len(location.read_bytes(entries[0]).splitlines()) == 8
    assert len(read_metadata(location)) == 8


async def test_a_partial_group_is_written_after_group_seconds(tmp_path):
    location = StorageLocation.from_url(str(tmp_path / "out"))
    sink = MetadataSink(location, writer="all", group_rows=64, group_seconds=0.05)
    await asyncio.wait_for(asyncio.gather(*(sink.add(_row(i)) for i in range(3))), timeout=60)
    assert [len(location.read_bytes(e).splitlines()) for e in _entries(location)] == [3]


async def test_a_failed_entry_fails_every_row_of_its_group_and_records_none(tmp_path, monkeypatch):
    location = StorageLocation.from_url(str(tmp_path / "out"))
    sink = MetadataSink(location, writer="all", group_rows=4, group_seconds=3600)

    def refuse(self, relative, data, *, atomic=False):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StorageLocation, "write_bytes", refuse)
    results = await asyncio.gather(*(sink.add(_row(i)) for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    monkeypatch.undo()
    await sink.flush()
    assert len(read_metadata(location)) == 0  # what was refused is on no record: each caller was told


async def test_a_cancelled_caller_still_gets_its_row_journaled(tmp_path):
    location = StorageLocation.from_url(str(tmp_path / "out"))
    sink = MetadataSink(location, writer="all", group_rows=2, group_seconds=3600)
    waiting = asyncio.create_task(sink.add(_row(0)))
    await asyncio.sleep(0)
    waiting.cancel()
    await sink.add(_row(1))
    await sink.flush()
    assert sorted(read_metadata(location)["prompt_id"].to_pylist()) == ["p000", "p001"]


async def test_old_single_row_entries_still_recover(tmp_path):
    location = StorageLocation.from_url(str(tmp_path / "out"))
    location.write_bytes("metadata/_journal/all/abcd0000-00000001.json", b'{"run_id":"r","prompt_id":"old","image_index":0}')
    assert recover_journal(location) == 1
    assert read_metadata(location)["prompt_id"].to_pylist() == ["old"]


@pytest.mark.parametrize("images", [120])
async def test_storage_requests_per_image_on_azurite(tmp_path, gateway, azurite, images):
    ids, texts = numbered(images)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    options = azurite["storage_options"]
    output = f"az://{azurite['container']}/economy-{images}"
    before = azurite_requests(azurite["debug_log"])
    summary = await run_batch(
        gateway, prompts=prompts, output=output, output_storage_options=options, max_in_flight=16, flush_rows=60
    )
    await asyncio.sleep(0.2)  # Azurite writes its log asynchronously
    used = azurite_requests(azurite["debug_log"]) - before
    assert summary.succeeded == images
    print(f"azurite: {used} storage requests for {images} images ({used / images:.3f} per image)")
    # Whole run, start-up listings and two part folds included.
    assert used <= 1.5 * images, f"{used} storage requests for {images} images"

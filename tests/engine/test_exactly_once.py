"""Issue 14.2: a process killed at any instant of folding the journal into a part (while writing the part,
after publishing it, half-way through deleting its entries), and again during the recovery, never makes the
same attempt appear twice in ``metadata/*.parquet``; summed ``cost_usd`` stays what was paid."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from imagegen_provider.engine import metadata as metadata_module
from imagegen_provider.engine.metadata import (
    JOURNAL_DIR,
    MetadataSink,
    decode_entries,
    encode_entries,
    read_metadata,
    recover_journal,
)
from imagegen_provider.engine.storage import StorageLocation

from ._support import SMALL_PRICE, all_files, numbered, run_batch, write_prompts


class Killed(BaseException):
    """What the process would see of SIGKILL, if it saw anything: nothing after this point runs."""


CRASH_POINTS = ["writing_part", "after_part_before_delete", "half_way_through_delete"]


@contextlib.contextmanager
def crash_once(monkeypatch, point: str):
    """Kill the next fold at ``point``."""
    state = {"armed": True}
    real_remove = StorageLocation.remove
    real_write_table = pq.write_table

    def remove(self, relatives):
        entries = [r for r in relatives if r.startswith(JOURNAL_DIR) and r.endswith(".json")]
        if state["armed"] and entries:
            state["armed"] = False
            if point == "half_way_through_delete":
                real_remove(self, entries[: len(entries) // 2])
            raise Killed(point)
        return real_remove(self, relatives)

    def write_table(table, where, **kwargs):
        if state["armed"]:
            state["armed"] = False
            where.write(b"PAR1 half a part")
            raise Killed(point)
        return real_write_table(table, where, **kwargs)

    with monkeypatch.context() as patch:
        if point == "writing_part":
            patch.setattr(metadata_module.pq, "write_table", write_table)
        else:
            patch.setattr(StorageLocation, "remove", remove)
        yield


def _rows(count: int, start: int = 0) -> list[dict]:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        {
            "run_id": "r1", "prompt_id": f"p{i:03d}", "image_index": 0, "status": "succeeded",
            "file_name": f"images/p{i:03d}/0-1.png", "cost_usd": round(0.01 * (i + 1), 6), "model": "dall-e-2",
            "started_at": base + timedelta(seconds=i), "finished_at": base + timedelta(seconds=i, milliseconds=5),
        }
        for i in range(start, start + count)
    ]


def _parts_frame(root) -> pd.DataFrame:
    parts = sorted((root / "metadata").glob("*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()


def _assert_each_once(root, rows: list[dict]) -> None:
    frame = _parts_frame(root)
    assert sorted(frame["prompt_id"]) == sorted(r["prompt_id"] for r in rows)  # each attempt exactly once
    assert frame["cost_usd"].sum() == pytest.approx(sum(r["cost_usd"] for r in rows))
    assert all_files(root / "metadata" / "_journal") == []


def test_entries_encode_as_runs_and_decode_back():
    entries = [f"{JOURNAL_DIR}/rows-1/abcd1234-{i:08d}.json" for i in (1, 2, 3, 7, 8)]
    entries.append(f"{JOURNAL_DIR}/all/ffff0000-00000004.json")
    encoded = encode_entries(entries)
    assert b"[1,3],[7,8]" in encoded
    assert decode_entries(encoded) == set(entries)


@pytest.mark.parametrize("point", CRASH_POINTS)
async def test_kill_during_a_flush_then_during_recovery_never_duplicates(tmp_path, monkeypatch, point):
    root = tmp_path / "out"
    location = StorageLocation.from_url(str(root))
    rows = _rows(12)
    sink = MetadataSink(location, writer="rows-000000000-000000012", flush_rows=1000)
    for row in rows[:5]:
        await sink.add(row)
    await sink.flush()
    for row in rows[5:]:
        await sink.add(row)
    with crash_once(monkeypatch, point), pytest.raises(Killed):
        await sink.flush()
    # In the crash window every reader sees each attempt once (part and leftover journal are not added up).
    assert sorted(read_metadata(location)["prompt_id"].to_pylist()) == [r["prompt_id"] for r in rows]

    # The rerun's recovery is killed at the same point, and then a third run recovers.
    successor = MetadataSink(location, writer="rows-000000000-000000012")
    with crash_once(monkeypatch, point), pytest.raises(Killed):
        successor.recover()
    assert sorted(read_metadata(location)["prompt_id"].to_pylist()) == [r["prompt_id"] for r in rows]
    MetadataSink(location, writer="rows-000000000-000000012").recover()
    _assert_each_once(root, rows)
    # Recovering again (finalize does) finds nothing to fold.
    assert recover_journal(location) == 0
    _assert_each_once(root, rows)


async def test_refolding_the_same_entries_replaces_the_part(tmp_path):
    """Two recoveries of the same entries (say, a finalize racing a rerun) write one part, not two."""
    root = tmp_path / "out"
    location = StorageLocation.from_url(str(root))
    sink = MetadataSink(location, writer="all")
    rows = _rows(3)
    for row in rows:
        await sink.add(row)
    entries = sorted(location.list_files(JOURNAL_DIR))
    first = metadata_module.write_part(location, metadata_module.rows_to_table(rows), "all", entries)
    second = metadata_module.write_part(location, metadata_module.rows_to_table(rows), "all", reversed(entries))
    assert first == second
    location.remove(entries)
    _assert_each_once(root, rows)


async def test_crashed_and_resumed_run_counts_each_paid_image_once_in_duckdb(tmp_path, gateway, monkeypatch):
    """The README's DuckDB query over ``metadata/*.parquet`` after a run killed while deleting folded journal
    entries and a rerun: as many images and dollars as the gateway charged."""
    total = 14
    ids, texts = numbered(total)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    # The kill surfaces from the runner's task group (alone, or grouped with the tasks it cut short).
    with crash_once(monkeypatch, "after_part_before_delete"), pytest.raises((Killed, BaseExceptionGroup)):
        # flush_rows=4: a part every 4 images; the first part's journal entries are never deleted.
        await run_batch(gateway, prompts=prompts, output=str(output), flush_rows=4, max_in_flight=2)
    assert list((output / "metadata" / "_journal").rglob("*.json"))  # the kill's leftovers
    summary = await run_batch(gateway, prompts=prompts, output=str(output), flush_rows=4)
    assert summary.skipped_existing >= 4 and summary.skipped_existing + summary.succeeded == total
    # Paid twice: at most the two requests in flight when the first run was killed.
    assert total <= gateway.stats()["charged_images"] <= total + 2

    query = (
        "select model, count(*) filter (where status = 'succeeded') as images, sum(cost_usd) as usd "
        f"from read_parquet('{output}/metadata/*.parquet') group by model"
    )
    result = duckdb.sql(query).fetchall()
    assert len(result) == 1
    model, images, usd = result[0]
    assert (model, images) == ("dall-e-2", total)
    assert usd == pytest.approx(total * SMALL_PRICE)  # the recorded spend; the in-flight re-pays are not on record
    frame = _parts_frame(output)
    assert not frame.duplicated(["run_id", "prompt_id", "image_index"]).any()

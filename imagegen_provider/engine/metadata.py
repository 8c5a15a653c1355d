"""The metadata table: a Parquet dataset under ``<output>/metadata/``, written incrementally.

Every finished image (succeeded or failed) is first written as a small JSON journal entry under
``metadata/_journal/<writer>/`` so that a crash loses at most the rows still in flight; rows are then
gathered into Parquet part files (``metadata/part-*.parquet``) and their journal entries removed. Readers
(pandas, DuckDB, pyarrow) ignore the ``_journal`` folder, as they ignore every ``_``-prefixed path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imagegen_provider.engine.schema import COLUMNS, METADATA_SCHEMA, STATUS_SUCCEEDED, rows_to_table
from imagegen_provider.engine.storage import StorageLocation, is_temp_file

log = logging.getLogger(__name__)

METADATA_DIR = "metadata"
JOURNAL_DIR = f"{METADATA_DIR}/_journal"
_TIMESTAMPS = ("started_at", "finished_at")


def _to_json(row: dict[str, Any]) -> bytes:
    return json.dumps(
        {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}, separators=(",", ":")
    ).encode()


def _from_json(data: bytes) -> dict[str, Any]:
    row = json.loads(data)
    for key in _TIMESTAMPS:
        if isinstance(row.get(key), str):
            row[key] = datetime.fromisoformat(row[key])
    return row


def write_part(location: StorageLocation, table: pa.Table, label: str) -> str:
    # Atomic: a process killed while writing a part must not leave a truncated Parquet file behind, which
    # every later read of the metadata (resume, finalize, pandas, DuckDB) would fail on.
    relative = f"{METADATA_DIR}/part-{label}-{uuid.uuid4().hex[:12]}.parquet"
    with location.open_atomic(relative) as handle:
        pq.write_table(table, handle, compression="zstd")
    return relative


class MetadataSink:
    """Collects metadata rows of one writer (one run of one shard).

    :param location: the output root.
    :param writer: a name unique to this writer and stable across its retries (the shard label), so a
        rerun can fold in the journal its crashed predecessor left.
    :param flush_rows: rows per Parquet part.
    :param flush_seconds: write a part at least this often while rows arrive.
    """

    def __init__(
        self,
        location: StorageLocation,
        *,
        writer: str,
        flush_rows: int = 1000,
        flush_seconds: float = 30.0,
    ) -> None:
        self.location = location
        self.writer = writer
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._buffer: list[dict[str, Any]] = []
        self._journal: list[str] = []
        self._last_flush = time.monotonic()
        self._seq = 0
        self._token = uuid.uuid4().hex[:8]
        self._lock = asyncio.Lock()
        self.parts_written: list[str] = []

    @property
    def journal_dir(self) -> str:
        return f"{JOURNAL_DIR}/{self.writer}"

    async def add(self, row: dict[str, Any]) -> None:
        """Make ``row`` durable (journal) and queue it for the next part."""
        self._seq += 1
        relative = f"{self.journal_dir}/{self._token}-{self._seq:08d}.json"
        # Atomic: an empty or truncated entry left by a kill would make every later recovery fail.
        await asyncio.to_thread(self.location.write_bytes, relative, _to_json(row), atomic=True)
        self._buffer.append(row)
        self._journal.append(relative)
        if len(self._buffer) >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            if not self._buffer:
                return
            rows, journal = self._buffer, self._journal
            self._buffer, self._journal = [], []
            self._last_flush = time.monotonic()
            await asyncio.to_thread(self._write, rows, journal)

    def _write(self, rows: list[dict[str, Any]], journal: list[str]) -> None:
        self.parts_written.append(write_part(self.location, rows_to_table(rows), self.writer))
        # The part is durable: the journal entries are now redundant.
        self.location.remove(journal)
        # Arrow's allocator (mimalloc) keeps freed pages for reuse; a long run writes hundreds of parts and
        # its resident memory would grow with the table instead of staying flat (bench: memory case).
        pa.default_memory_pool().release_unused()

    def recover(self) -> int:
        """Fold a crashed predecessor's journal (same writer) into a part. Returns the rows recovered."""
        return recover_journal(self.location, self.journal_dir)


def recover_journal(location: StorageLocation, journal_dir: str = JOURNAL_DIR) -> int:
    """Move every journal entry under ``journal_dir`` into one part file (and drop temporary files that a
    killed writer left half-written: they never became entries)."""
    found = location.list_files(journal_dir)
    entries = [e for e in found if e.endswith(".json") and not is_temp_file(e)]
    stale = [e for e in found if is_temp_file(e)]
    if stale:
        location.remove(stale)
    if not entries:
        return 0
    rows = [_from_json(location.read_bytes(entry)) for entry in entries]
    write_part(location, rows_to_table(rows), "recovered")
    location.remove(entries)
    log.info("Recovered %d metadata rows from the journal of an interrupted run", len(rows))
    return len(rows)


def read_metadata(location: StorageLocation, columns: Iterable[str] | None = None) -> pa.Table:
    """Every metadata row on record: all parts plus journal entries not yet gathered into a part."""
    wanted = list(columns) if columns is not None else list(COLUMNS)
    schema = pa.schema([METADATA_SCHEMA.field(name) for name in wanted])
    tables = []
    for part in location.list_files(METADATA_DIR, suffix=".parquet"):
        if is_temp_file(part) or "/_" in f"/{part}":
            continue
        with location.open(part) as handle:
            tables.append(pq.read_table(handle, columns=wanted, schema=METADATA_SCHEMA).cast(schema))
    journal = [_from_json(location.read_bytes(e)) for e in location.list_files(JOURNAL_DIR, suffix=".json")]
    if journal:
        tables.append(rows_to_table(journal).select(wanted))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def current_rows(table: pa.Table) -> pd.DataFrame:
    """One row per (prompt_id, image_index): the latest finished, a success winning a tie."""
    frame = table.to_pandas()
    if frame.empty:
        return frame
    frame["_ok"] = frame["status"] == STATUS_SUCCEEDED
    frame = frame.sort_values(["finished_at", "_ok"], kind="stable", na_position="first")
    frame = frame.drop_duplicates(["prompt_id", "image_index"], keep="last").drop(columns="_ok")
    return frame.reset_index(drop=True)

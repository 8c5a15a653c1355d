"""The metadata table: a Parquet dataset under ``<output>/metadata/``, written incrementally.

Every finished image (succeeded or failed) is first written to a JSON-lines journal entry under
``metadata/_journal/<writer>/`` so that a crash loses at most the rows still in flight; rows are then
gathered into Parquet part files (``metadata/part-*.parquet``) and their journal entries removed. Readers
(pandas, DuckDB, pyarrow) ignore the ``_journal`` folder, as they ignore every ``_``-prefixed path.

Each attempt appears in ``metadata/*.parquet`` exactly once, whatever instant a process is killed at: a part
records in its footer which journal entries it folds (and is named after them), so entries left behind by a
kill between writing a part and deleting them are recognised as folded and deleted, never folded again.

Request economy (object stores bill and throttle per request): a journal entry holds a *group* of rows — the
rows that finished while the previous entry was being written, up to ``group_rows``, or those that finished
within ``group_seconds`` of the group's first (a group commit). :meth:`MetadataSink.add` returns only once its
row's group is durable, and the runner holds the row's request slot until then, so the crash guarantee is
unchanged: at most ``max_in_flight`` paid images are ever off the record. A part's journal entries are deleted
in bounded batches, so that a fold never floods the store's connection pool ahead of the image uploads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
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
    row: dict[str, Any] = json.loads(data)
    for key in _TIMESTAMPS:
        if isinstance(row.get(key), str):
            row[key] = datetime.fromisoformat(row[key])
    return row


def _entry_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    return b"\n".join(_to_json(row) for row in rows) + b"\n"


def _entry_rows(data: bytes) -> list[dict[str, Any]]:
    """The rows of a journal entry: JSON lines (an entry of one row is one JSON object, as before groups)."""
    return [_from_json(line) for line in data.splitlines() if line.strip()]


#: Journal entries deleted per request batch: bounded so that a fold never queues hundreds of deletes on the
#: store's connection pool ahead of the image uploads (s3fs sends a batch as one bulk delete).
DELETE_BATCH = 64


def remove_in_batches(location: StorageLocation, relatives: list[str], batch: int = DELETE_BATCH) -> None:
    for start in range(0, len(relatives), batch):
        location.remove(relatives[start : start + batch])


#: Parquet footer key of a part: the journal entries it folds (see :func:`encode_entries`).
JOURNAL_KEY = b"imagegen.journal_entries"
_ENTRY = re.compile(r"(?P<stem>.+)-(?P<seq>\d{8})\.json$")


def encode_entries(entries: Iterable[str]) -> bytes:
    """Journal entry paths as ``{"<writer>/<token>": [[first, last], ...]}``: a sink numbers its entries
    ``<token>-<seq>``, so a part folding a thousand entries records a few runs, not a thousand names."""
    runs: dict[str, list[list[int]]] = {}
    for entry in sorted(entries):
        match = _ENTRY.search(entry.removeprefix(JOURNAL_DIR + "/"))
        if match is None:
            raise ValueError(f"not a journal entry: {entry!r}")
        seqs = runs.setdefault(match["stem"], [])
        seq = int(match["seq"])
        if seqs and seqs[-1][1] == seq - 1:
            seqs[-1][1] = seq
        else:
            seqs.append([seq, seq])
    return json.dumps(runs, separators=(",", ":"), sort_keys=True).encode()


def decode_entries(data: bytes) -> set[str]:
    """The journal entry paths that :func:`encode_entries` encoded."""
    return {
        f"{JOURNAL_DIR}/{stem}-{seq:08d}.json"
        for stem, seqs in json.loads(data).items()
        for first, last in seqs
        for seq in range(first, last + 1)
    }


def write_part(location: StorageLocation, table: pa.Table, label: str, entries: Iterable[str] = ()) -> str:
    """Write ``table`` as a part; ``entries`` are the journal entries it folds.

    Exactly once: the part records ``entries`` in its footer and is named after them, so a process killed after
    the part is published but before the entries are deleted can never make their rows appear twice — a rerun
    (:func:`recover_journal`) finds them folded and only deletes them, and folding the same entries again would
    replace the part, not add one.
    """
    entries = sorted(entries)
    if entries:
        name = hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), JOURNAL_KEY: encode_entries(entries)})
    else:
        name = uuid.uuid4().hex[:16]
    relative = f"{METADATA_DIR}/part-{label}-{name}.parquet"
    # Atomic: a process killed while writing a part must not leave a truncated Parquet file behind, which
    # every later read of the metadata (resume, finalize, pandas, DuckDB) would fail on.
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
    :param group_rows: rows per journal entry at most; the runner passes its ``max_in_flight``, since once
        that many rows wait for their entry no request slot is free to finish another.
    :param group_seconds: how long a row may wait for others to share its journal entry. Default: 0 on a
        local filesystem (rows that finish while an entry is written share the next one), 0.5 s on object
        stores, where every entry is a billed request.
    """

    def __init__(
        self,
        location: StorageLocation,
        *,
        writer: str,
        flush_rows: int = 1000,
        flush_seconds: float = 30.0,
        group_rows: int = 64,
        group_seconds: float | None = None,
    ) -> None:
        self.location = location
        self.writer = writer
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.group_rows = max(1, group_rows)
        self.group_seconds = (0.0 if location.is_local else 0.5) if group_seconds is None else group_seconds
        self._buffer: list[dict[str, Any]] = []
        self._journal: list[str] = []
        self._last_flush = time.monotonic()
        self._seq = 0
        self._token = uuid.uuid4().hex[:8]
        self._lock = asyncio.Lock()
        #: Rows waiting for a journal entry, each with the future its :meth:`add` awaits.
        self._waiting: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._first_waiting = 0.0
        self._arrived = asyncio.Event()
        self._draining = False
        self._group_writer: asyncio.Task[None] | None = None
        self.parts_written: list[str] = []

    @property
    def journal_dir(self) -> str:
        return f"{JOURNAL_DIR}/{self.writer}"

    async def add(self, row: dict[str, Any]) -> None:
        """Make ``row`` durable (in a journal entry, with the rows grouped with it) and queue it for the next
        part. Raises what the entry's write raised: the row is then on no record."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._waiting:
            self._first_waiting = time.monotonic()
        self._waiting.append((row, done))
        self._arrived.set()
        if self._group_writer is None or self._group_writer.done():
            self._group_writer = asyncio.create_task(self._write_groups())
        await done
        if len(self._buffer) >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            await self.flush()

    async def _write_groups(self) -> None:
        """Write waiting rows as journal entries, a group at a time, until none wait."""
        while self._waiting:
            await self._gather_group()
            group, self._waiting = self._waiting[: self.group_rows], self._waiting[self.group_rows :]
            self._first_waiting = time.monotonic()
            rows = [row for row, _ in group]
            try:
                entry = await self._write_entry(rows)
            except Exception as exc:  # every row of the group is off the record: each caller hears why
                for _, done in group:
                    if not done.done():
                        done.set_exception(exc)
                continue
            self._buffer.extend(rows)
            self._journal.append(entry)
            for _, done in group:
                if not done.done():
                    done.set_result(None)

    async def _gather_group(self) -> None:
        """Wait until a full group waits, the first waiting row has waited ``group_seconds``, or a flush
        asks for everything now."""
        while len(self._waiting) < self.group_rows and not self._draining:
            remaining = self._first_waiting + self.group_seconds - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def _write_entry(self, rows: list[dict[str, Any]]) -> str:
        self._seq += 1
        relative = f"{self.journal_dir}/{self._token}-{self._seq:08d}.json"
        # Atomic: an empty or truncated entry left by a kill would make every later recovery fail.
        await self.location.write_bytes_async(relative, _entry_bytes(rows), atomic=True)
        return relative

    async def _drain(self) -> None:
        """Write every waiting row's entry now (no lingering)."""
        writer = self._group_writer
        if writer is None or writer.done():
            return
        self._draining = True
        self._arrived.set()
        try:
            await asyncio.shield(writer)
        finally:
            self._draining = False

    async def flush(self) -> None:
        await self._drain()
        async with self._lock:
            if not self._buffer:
                return
            rows, journal = self._buffer, self._journal
            self._buffer, self._journal = [], []
            self._last_flush = time.monotonic()
            await asyncio.to_thread(self._write, rows, journal)

    def _write(self, rows: list[dict[str, Any]], journal: list[str]) -> None:
        self.parts_written.append(write_part(self.location, rows_to_table(rows), self.writer, journal))
        # The part is durable and names these entries: they are now redundant (a kill before or during this
        # removal leaves entries that the next recovery finds folded and only deletes).
        remove_in_batches(self.location, journal)
        # Arrow's allocator (mimalloc) keeps freed pages for reuse; a long run writes hundreds of parts and
        # its resident memory would grow with the table instead of staying flat (bench: memory case).
        pa.default_memory_pool().release_unused()

    def recover(self) -> int:
        """Fold a crashed predecessor's journal (same writer) into a part. Returns the rows recovered."""
        return recover_journal(self.location, self.journal_dir)


def _parts(location: StorageLocation) -> list[str]:
    return [
        part
        for part in location.list_files(METADATA_DIR, suffix=".parquet")
        if not is_temp_file(part) and "/_" not in f"/{part}"
    ]


def folded_entries(location: StorageLocation, parts: Iterable[str] | None = None) -> set[str]:
    """Journal entries already folded into a part (read from the parts' footers only)."""
    folded: set[str] = set()
    for part in _parts(location) if parts is None else parts:
        with location.open(part) as handle:
            metadata = pq.read_schema(handle).metadata or {}
        if JOURNAL_KEY in metadata:
            folded |= decode_entries(metadata[JOURNAL_KEY])
    return folded


def _journal_entries(location: StorageLocation, journal_dir: str, *, clean: bool) -> dict[str, list[str]]:
    """Entries under ``journal_dir`` by writer; ``clean`` drops temporary files that a killed writer left
    half-written (they never became entries; a live writer's would be in use, so only for dead writers)."""
    found = location.list_files(journal_dir)
    stale = [e for e in found if is_temp_file(e)]
    if stale and clean:
        location.remove(stale)
    by_writer: dict[str, list[str]] = {}
    for entry in found:
        if entry.endswith(".json") and not is_temp_file(entry):
            writer = entry.removeprefix(JOURNAL_DIR + "/").rsplit("/", 1)[0]
            by_writer.setdefault(writer, []).append(entry)
    return by_writer


def journal_writers(location: StorageLocation) -> list[str]:
    """Writers (shard labels) with journal entries not yet folded into a part."""
    return sorted(_journal_entries(location, JOURNAL_DIR, clean=False))


def recover_journal(location: StorageLocation, journal_dir: str = JOURNAL_DIR) -> int:
    """Fold every journal entry under ``journal_dir`` into a part per writer, exactly once: entries some
    part already folds (a writer killed between publishing the part and deleting them) are only deleted.
    Returns the rows newly folded."""
    by_writer = _journal_entries(location, journal_dir, clean=True)
    if not by_writer:
        return 0
    folded = folded_entries(location)
    recovered = 0
    for writer, entries in sorted(by_writer.items()):
        done = [e for e in entries if e in folded]
        pending = [e for e in entries if e not in folded]
        if pending:
            rows = [row for entry in pending for row in _entry_rows(location.read_bytes(entry))]
            write_part(location, rows_to_table(rows), writer.replace("/", "_"), pending)
            recovered += len(rows)
        remove_in_batches(location, done + pending)
    if recovered:
        log.info("Recovered %d metadata rows from the journal of an interrupted run", recovered)
    return recovered


def _read_journal(location: StorageLocation) -> dict[str, list[dict[str, Any]]]:
    rows = {}
    for entry in location.list_files(JOURNAL_DIR, suffix=".json"):
        if is_temp_file(entry):
            continue
        try:
            rows[entry] = _entry_rows(location.read_bytes(entry))
        except FileNotFoundError:
            continue  # folded and deleted since the listing: the part holding it is listed below
    return rows


def read_metadata(location: StorageLocation, columns: Iterable[str] | None = None) -> pa.Table:
    """Every metadata row on record, each once: all parts plus journal entries not yet folded into a part.

    The journal is listed before the parts, so an entry folded meanwhile is found in its part (and dropped
    from the journal's rows), never missed.
    """
    wanted = list(columns) if columns is not None else list(COLUMNS)
    schema = pa.schema([METADATA_SCHEMA.field(name) for name in wanted])
    journal = _read_journal(location)
    parts = _parts(location)
    tables = []
    for part in parts:
        with location.open(part) as handle:
            tables.append(pq.read_table(handle, columns=wanted, schema=METADATA_SCHEMA).cast(schema))
    if journal:
        folded = folded_entries(location, parts)
        pending = [row for entry, rows in journal.items() if entry not in folded for row in rows]
        if pending:
            tables.append(rows_to_table(pending).select(wanted))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def distinct_attempts(frame: pd.DataFrame, *, key: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per attempt (run id, prompt id, image index, ``finished_at``), a success winning a tie: a paid
    image stored from the rescue ledger is the same attempt as the failed row it supersedes."""
    if frame.empty:
        return frame
    ok = frame["status"] == STATUS_SUCCEEDED
    ordered = frame.assign(_ok=ok).sort_values("_ok", kind="stable").drop(columns="_ok")
    return ordered.drop_duplicates([*key, "run_id", "prompt_id", "image_index", "finished_at"], keep="last")


def current_rows(table: pa.Table | pd.DataFrame) -> pd.DataFrame:
    """One row per (prompt_id, image_index): the latest finished, a success winning a tie."""
    frame = table.to_pandas() if isinstance(table, pa.Table) else table.copy()
    if frame.empty:
        return frame
    frame["_ok"] = frame["status"] == STATUS_SUCCEEDED
    frame = frame.sort_values(["finished_at", "_ok"], kind="stable", na_position="first")
    frame = frame.drop_duplicates(["prompt_id", "image_index"], keep="last").drop(columns="_ok")
    return frame.reset_index(drop=True)

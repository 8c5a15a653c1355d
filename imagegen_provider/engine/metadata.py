"""The metadata table: a Parquet dataset under ``<output>/metadata/``, written incrementally.

Every finished image (succeeded or failed) is first written as a small JSON journal entry under
``metadata/_journal/<writer>/`` so that a crash loses at most the rows still in flight; rows are then
gathered into Parquet part files (``metadata/part-*.parquet``) and their journal entries removed. Readers
(pandas, DuckDB, pyarrow) ignore the ``_journal`` folder, as they ignore every ``_``-prefixed path.

Each attempt appears in ``metadata/*.parquet`` exactly once, whatever instant a process is killed at: a part
records in its footer which journal entries it folds (and is named after them), so entries left behind by a
kill between writing a part and deleting them are recognised as folded and deleted, never folded again.
"""

from __future__ import annotations

import asyncio
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
        self.parts_written.append(write_part(self.location, rows_to_table(rows), self.writer, journal))
        # The part is durable and names these entries: they are now redundant (a kill before or during this
        # removal leaves entries that the next recovery finds folded and only deletes).
        self.location.remove(journal)
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
            rows = [_from_json(location.read_bytes(entry)) for entry in pending]
            write_part(location, rows_to_table(rows), writer.replace("/", "_"), pending)
            recovered += len(rows)
        location.remove(done + pending)
    if recovered:
        log.info("Recovered %d metadata rows from the journal of an interrupted run", recovered)
    return recovered


def _read_journal(location: StorageLocation) -> dict[str, dict[str, Any]]:
    rows = {}
    for entry in location.list_files(JOURNAL_DIR, suffix=".json"):
        if is_temp_file(entry):
            continue
        try:
            rows[entry] = _from_json(location.read_bytes(entry))
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
        pending = [row for entry, row in journal.items() if entry not in folded]
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

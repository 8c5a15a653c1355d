"""Finish an output: fold the journal, check every image on record against the folder and completeness against
the prompt table (or one row range of it), write the current tables, a contact sheet and a run summary.

Two tables, both one row per image:

- ``metadata.parquet``: the dataset: every image that is stored and intact, so that
  ``datasets.load_dataset("imagefolder", data_dir=<output>)`` yields an image for every row.
- ``metadata_current.parquet``: every image's current row, the success or its *last* failure (``status``,
  ``error_type``, ``error_message``; ``file_name`` null). An image recorded as succeeded whose file is missing
  or changed is listed there as failed (``ImageFileMissing`` / ``ImageFileChanged``). ``imagefolder`` would
  load a row without ``file_name`` as an example whose image is ``None``, hence the separate table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imagegen_provider.engine.logs import quiet_storage_logs
from imagegen_provider.engine.metadata import (
    JOURNAL_DIR,
    METADATA_DIR,
    current_rows,
    distinct_attempts,
    journal_writers,
    read_metadata,
    recover_journal,
)
from imagegen_provider.engine.plan import images_of
from imagegen_provider.engine.prompts import PromptColumns, PromptTable
from imagegen_provider.engine.resume import DamagedImage, check_stored, damaged_keys
from imagegen_provider.engine.schema import METADATA_SCHEMA, STATUS_FAILED, STATUS_SUCCEEDED
from imagegen_provider.engine.storage import StorageLocation

log = logging.getLogger(__name__)

DATASET_TABLE = "metadata.parquet"
CURRENT_TABLE = "metadata_current.parquet"
SUMMARY_FILE = "run_summary.json"
#: Pages of the contact sheet finalize writes (64 images a page); ``imagegen contact-sheet`` has no cap.
CONTACT_SHEET_MAX_PAGES = 20
_LISTED = 1000
_KEY = ["prompt_id", "image_index"]

Key = tuple[str, int]


class IncompleteOutputError(RuntimeError):
    """``fail_if_incomplete`` and the output is not complete; ``report`` says what is missing."""

    def __init__(self, report: FinalizeReport) -> None:
        self.report = report
        super().__init__(
            f"output {report.output_uri} incomplete: {report.failed} failed, {report.missing} missing and "
            f"{report.damaged} missing or changed image files (see {report.summary_uri})"
        )


class LiveShardError(RuntimeError):
    """A shard whose journal finalize would fold is still running (it holds a live lease)."""


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a live lease: the shard label (its journal's writer name) and a description of the holder."""

    shard: str
    holder: str


@dataclass
class FinalizeReport:
    output_uri: str
    dataset_uri: str
    summary_uri: str
    expected_images: int | None
    succeeded: int
    failed: int
    missing: int
    complete: bool
    total_cost_usd: float
    unpriced_paid_images: int
    failed_images: list[list[Any]] = field(default_factory=list)
    missing_images: list[list[Any]] = field(default_factory=list)
    #: Images recorded as succeeded whose file is missing or changed: ``[prompt_id, image_index, problem]``.
    damaged: int = 0
    damaged_images: list[list[Any]] = field(default_factory=list)
    verified: bool = False
    current_uri: str = ""
    row_start: int = 0
    row_stop: int | None = None
    contact_sheets: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def brief(self) -> dict[str, Any]:
        """Without the id lists: small enough for XCom."""
        data = self.to_dict()
        for name in ("failed_images", "missing_images", "damaged_images", "contact_sheets"):
            data.pop(name)
        return data


# -- live shards -----------------------------------------------------------------------------------------


def _describe(lease: Any) -> LeaseHolder:
    def pick(*names: str) -> Any:
        for name in names:
            value = lease.get(name) if isinstance(lease, Mapping) else getattr(lease, name, None)
            if value:
                return value
        return None

    shard = pick("shard", "label", "writer")
    holder = pick("holder", "owner", "host_pid", "hostname") or repr(lease)
    return LeaseHolder(shard=str(shard), holder=str(holder))


def _live_leases(location: StorageLocation) -> list[LeaseHolder]:
    """Live shard leases on ``location`` (``engine/lease.py``; none while that module is absent)."""
    try:
        from imagegen_provider.engine.lease import live_leases  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return []
    return [_describe(lease) for lease in live_leases(location)]


def _fold_journals(location: StorageLocation, *, refuse_live: bool) -> None:
    """Fold every journal into parts, never one a live shard still writes: refuse (``refuse_live``) or leave
    it to its shard (its rows are read from the journal all the same)."""
    writers = journal_writers(location)
    if not writers:
        return
    live = {lease.shard: lease for lease in _live_leases(location)}
    busy = [writer for writer in writers if writer in live]
    if busy and refuse_live:
        holders = "; ".join(f"shard {w!r} held by {live[w].holder}" for w in busy)
        raise LiveShardError(
            f"cannot finalize {location.uri}: still running ({holders}); finalize once it has finished"
        )
    for writer in writers:
        if writer not in busy:
            recover_journal(location, f"{JOURNAL_DIR}/{writer}")


# -- what is expected, what is on record -----------------------------------------------------------------


def _expected_keys(
    prompts: Any,
    *,
    columns: PromptColumns,
    images_per_prompt: int,
    storage_options: Mapping[str, Any] | None,
    row_start: int,
    row_stop: int | None,
) -> tuple[set[Key], set[Key]]:
    """Keys of the whole table (what the dataset may hold) and of ``[row_start, row_stop)`` (what this
    finalize checks for completeness)."""
    table = PromptTable.open(prompts, columns=columns, storage_options=storage_options)
    stop = table.num_rows if row_stop is None else row_stop
    whole: set[Key] = set()
    wanted: set[Key] = set()
    for row in table.rows():
        keys = {(row.prompt_id, index) for index in range(images_of(row, images_per_prompt))}
        whole |= keys
        if row_start <= row.position < stop:
            wanted |= keys
    return whole, wanted


def _keys_of(frame: pd.DataFrame) -> list[Key]:
    return list(zip(frame["prompt_id"], frame["image_index"].astype(int), strict=True))


def _only(frame: pd.DataFrame, keys: set[Key] | None) -> pd.DataFrame:
    if keys is None or frame.empty:
        return frame
    return frame[[key in keys for key in _keys_of(frame)]]


def _mark_damaged(current: pd.DataFrame, damaged: list[DamagedImage]) -> pd.DataFrame:
    """Current rows with each damaged image turned into a failure naming its file's problem."""
    if not damaged:
        return current
    problems = {(d.prompt_id, d.image_index): d for d in damaged}
    current = current.copy()
    for position, key in enumerate(_keys_of(current)):
        if key not in problems:
            continue
        image = problems[key]
        kind = "ImageFileMissing" if image.problem == "missing" else "ImageFileChanged"
        label = current.index[position]
        current.loc[label, ["status", "error_type"]] = [STATUS_FAILED, kind]
        current.loc[label, "error_message"] = f"{image.file_name}: {image.problem}"
        current.loc[label, "file_name"] = None
    return current


@dataclass
class _Outcome:
    """What finalize found: the current rows (whole table), and the images of the checked row range."""

    current: pd.DataFrame
    succeeded: pd.DataFrame
    failed: pd.DataFrame
    damaged: list[DamagedImage]
    missing: list[Key]
    expected: int | None


def _examine(
    location: StorageLocation,
    current: pd.DataFrame,
    *,
    whole: set[Key] | None,
    wanted: set[Key] | None,
    verify: bool,
) -> _Outcome:
    """Check the files of every succeeded image of the table (the dataset must load), completeness of the
    ``wanted`` keys only."""
    current = _only(current, whole)
    damaged = check_stored(location, current[current["status"] == STATUS_SUCCEEDED], verify=verify)
    bad = damaged_keys(damaged)
    checked = _only(current, wanted)
    is_ok = (checked["status"] == STATUS_SUCCEEDED).to_numpy(dtype=bool)
    is_bad = np.array([key in bad for key in _keys_of(checked)], dtype=bool)
    present = set(_keys_of(checked))
    return _Outcome(
        current=_mark_damaged(current, damaged),
        succeeded=checked[is_ok & ~is_bad],
        failed=checked[~is_ok],
        damaged=[d for d in damaged if wanted is None or (d.prompt_id, d.image_index) in wanted],
        missing=sorted(wanted - present) if wanted is not None else [],
        expected=len(wanted) if wanted is not None else None,
    )


# -- writing ---------------------------------------------------------------------------------------------


def _write_table(location: StorageLocation, relative: str, frame: pd.DataFrame) -> None:
    frame = frame.sort_values(_KEY) if not frame.empty else frame
    table = pa.Table.from_pandas(frame[list(METADATA_SCHEMA.names)], schema=METADATA_SCHEMA, preserve_index=False)
    with location.open_atomic(relative) as handle:
        pq.write_table(table, handle, compression="zstd")


def _history_cost(history: pd.DataFrame, wanted: set[Key] | None) -> tuple[float, int]:
    """Total paid (every attempt, not only the current one) and succeeded attempts without a known cost."""
    history = _only(history, wanted)
    if history.empty:
        return 0.0, 0
    unpriced = (history["status"] == STATUS_SUCCEEDED) & history["cost_usd"].isna()
    return round(float(history["cost_usd"].sum()), 6), int(unpriced.sum())


def _report(location: StorageLocation, outcome: _Outcome, history: pd.DataFrame, wanted: set[Key] | None,
            **extra: Any) -> FinalizeReport:
    cost, unpriced = _history_cost(history, wanted)
    failed = outcome.failed
    return FinalizeReport(
        output_uri=location.uri,
        dataset_uri=location.uri_of(DATASET_TABLE),
        summary_uri=location.uri_of(SUMMARY_FILE),
        current_uri=location.uri_of(CURRENT_TABLE),
        expected_images=outcome.expected,
        succeeded=len(outcome.succeeded),
        failed=len(failed),
        missing=len(outcome.missing),
        damaged=len(outcome.damaged),
        complete=not outcome.missing and failed.empty and not outcome.damaged,
        total_cost_usd=cost,
        unpriced_paid_images=unpriced,
        failed_images=[
            [pid, int(idx), etype]
            for pid, idx, etype in zip(failed["prompt_id"], failed["image_index"], failed["error_type"], strict=True)
        ][:_LISTED],
        missing_images=[[pid, idx] for pid, idx in outcome.missing[:_LISTED]],
        damaged_images=[[d.prompt_id, d.image_index, d.problem] for d in outcome.damaged[:_LISTED]],
        **extra,
    )


def _write_summary(location: StorageLocation, report: FinalizeReport) -> None:
    summary = {**report.to_dict(), "finalized_at": datetime.now(UTC).isoformat(), "metadata_dir": METADATA_DIR}
    location.write_bytes(SUMMARY_FILE, json.dumps(summary, indent=2, default=str).encode(), atomic=True)
    log.info(
        "Finalized %s: %d succeeded, %d failed, %d missing%s, %d missing or changed files; total cost $%.4f",
        location.uri, report.succeeded, report.failed, report.missing,
        f" of {report.expected_images}" if report.expected_images is not None else "", report.damaged,
        report.total_cost_usd,
    )
    for pid, index, problem in report.damaged_images[:50]:
        log.warning("Image %s #%s on record but its file is %s", pid, index, problem)


def _contact_sheet(location: StorageLocation, current: pd.DataFrame) -> list[str]:
    from imagegen_provider.engine.contact_sheet import write_contact_sheet

    try:
        return write_contact_sheet(location, rows=current, max_pages=CONTACT_SHEET_MAX_PAGES)
    except Exception:
        # A preview must never fail a finalize whose tables are written.
        log.exception("Could not write the contact sheet of %s", location.uri)
        return []


# -- the whole -------------------------------------------------------------------------------------------


@quiet_storage_logs()
def finalize_output(
    output: Any,
    *,
    prompts: Any = None,
    prompt_column: str = "prompt",
    id_column: str = "id",
    images_per_prompt: int = 1,
    row_start: int = 0,
    row_stop: int | None = None,
    verify: bool = False,
    contact_sheet: bool = True,
    fail_if_incomplete: bool = False,
    output_storage_options: Mapping[str, Any] | None = None,
    prompts_storage_options: Mapping[str, Any] | None = None,
) -> FinalizeReport:
    """Fold, check and compact the output at ``output``.

    :param prompts: the prompt table; without it, completeness covers only the images on record.
    :param row_start: first row (inclusive) of the shard to check; ``row_stop`` is exclusive. The tables
        still cover every image on record; completeness and the report cover the shard's rows only.
    :param verify: also compare every image's sha256 with its record (reads every image; sizes are always
        compared, from one listing).
    :param contact_sheet: write ``contact_sheet.png`` (pages ``contact_sheet-001.png``… for large runs).
    :param fail_if_incomplete: raise :class:`IncompleteOutputError` (after writing everything) when an image
        is missing, failed, or its file is missing or changed.
    :raises LiveShardError: a running shard still writes a journal that a whole-output finalize would fold.
    """
    ranged = row_start != 0 or row_stop is not None
    if ranged and prompts is None:
        raise ValueError("row_start/row_stop need the prompt table (prompts=...) to know which images they hold")
    location = StorageLocation.from_url(output, output_storage_options)
    _fold_journals(location, refuse_live=not ranged)
    history = read_metadata(location).to_pandas()
    # A journal entry recovered twice by older versions, or a rescued image stored by a rerun, is the same
    # attempt twice: count it once, keeping the success.
    history = distinct_attempts(history)
    whole = wanted = None
    if prompts is not None:
        whole, wanted = _expected_keys(
            prompts, columns=PromptColumns(prompt=prompt_column, id=id_column), images_per_prompt=images_per_prompt,
            storage_options=prompts_storage_options, row_start=row_start, row_stop=row_stop,
        )
    outcome = _examine(location, current_rows(history), whole=whole, wanted=wanted, verify=verify)
    _write_table(location, CURRENT_TABLE, outcome.current)
    _write_table(location, DATASET_TABLE, outcome.current[outcome.current["status"] == STATUS_SUCCEEDED])
    sheets = _contact_sheet(location, outcome.current) if contact_sheet else []
    report = _report(location, outcome, history, wanted if ranged else None, verified=verify,
                     row_start=row_start, row_stop=row_stop, contact_sheets=sheets)
    _write_summary(location, report)
    if fail_if_incomplete and not report.complete:
        raise IncompleteOutputError(report)
    return report

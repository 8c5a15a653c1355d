"""Finish an output: check completeness against the prompt table, compact the metadata into one current
table (``<output>/metadata.parquet``, loadable with Hugging Face ``imagefolder``) and write a run summary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imagegen_provider.engine.metadata import METADATA_DIR, current_rows, read_metadata, recover_journal
from imagegen_provider.engine.plan import images_of
from imagegen_provider.engine.prompts import PromptColumns, PromptTable
from imagegen_provider.engine.schema import METADATA_SCHEMA, STATUS_SUCCEEDED
from imagegen_provider.engine.storage import StorageLocation

log = logging.getLogger(__name__)

DATASET_TABLE = "metadata.parquet"
SUMMARY_FILE = "run_summary.json"
_LISTED = 1000


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def brief(self) -> dict[str, Any]:
        """Without the id lists: small enough for XCom."""
        data = self.to_dict()
        data.pop("failed_images")
        data.pop("missing_images")
        return data


def _expected_keys(
    prompts: Any,
    *,
    columns: PromptColumns,
    images_per_prompt: int,
    storage_options: Mapping[str, Any] | None,
) -> set[tuple[str, int]]:
    table = PromptTable.open(prompts, columns=columns, storage_options=storage_options)
    return {(row.prompt_id, index) for row in table.rows() for index in range(images_of(row, images_per_prompt))}


def finalize_output(
    output: Any,
    *,
    prompts: Any = None,
    prompt_column: str = "prompt",
    id_column: str = "id",
    images_per_prompt: int = 1,
    output_storage_options: Mapping[str, Any] | None = None,
    prompts_storage_options: Mapping[str, Any] | None = None,
) -> FinalizeReport:
    """Compact and check the output at ``output``.

    :param prompts: the prompt table; without it, completeness covers only the images on record.
    """
    location = StorageLocation.from_url(output, output_storage_options)
    recover_journal(location)
    history = read_metadata(location)
    # A journal entry recovered twice (by a retry and by finalize) is the same row twice: count it once.
    history_frame = history.to_pandas().drop_duplicates(["run_id", "prompt_id", "image_index", "finished_at"])
    current = current_rows(history)

    expected: set[tuple[str, int]] | None = None
    if prompts is not None:
        expected = _expected_keys(
            prompts,
            columns=PromptColumns(prompt=prompt_column, id=id_column),
            images_per_prompt=images_per_prompt,
            storage_options=prompts_storage_options,
        )
        keys = list(zip(current["prompt_id"], current["image_index"].astype(int))) if not current.empty else []
        current = current[[key in expected for key in keys]] if keys else current

    succeeded = current[current["status"] == STATUS_SUCCEEDED] if not current.empty else current
    failed = current[current["status"] != STATUS_SUCCEEDED] if not current.empty else current
    present = set(zip(current["prompt_id"], current["image_index"].astype(int))) if not current.empty else set()
    missing = sorted(expected - present) if expected is not None else []

    dataset = succeeded.sort_values(["prompt_id", "image_index"]) if not succeeded.empty else succeeded
    table = pa.Table.from_pandas(dataset, schema=METADATA_SCHEMA, preserve_index=False)
    with location.open_atomic(DATASET_TABLE) as handle:
        pq.write_table(table, handle, compression="zstd")

    paid = history_frame["cost_usd"].notna() if not history_frame.empty else []
    report = FinalizeReport(
        output_uri=location.uri,
        dataset_uri=location.uri_of(DATASET_TABLE),
        summary_uri=location.uri_of(SUMMARY_FILE),
        expected_images=len(expected) if expected is not None else None,
        succeeded=len(succeeded),
        failed=len(failed),
        missing=len(missing),
        complete=not missing and failed.empty,
        total_cost_usd=round(float(history_frame["cost_usd"].sum()) if not history_frame.empty else 0.0, 6),
        unpriced_paid_images=int(
            ((history_frame["status"] == STATUS_SUCCEEDED) & ~paid).sum() if not history_frame.empty else 0
        ),
        failed_images=[
            [pid, int(idx), etype]
            for pid, idx, etype in zip(failed["prompt_id"], failed["image_index"], failed["error_type"])
        ][:_LISTED]
        if not failed.empty
        else [],
        missing_images=[[pid, idx] for pid, idx in missing[:_LISTED]],
    )
    summary = {**report.to_dict(), "finalized_at": datetime.now(UTC).isoformat(), "metadata_dir": METADATA_DIR}
    location.write_bytes(SUMMARY_FILE, json.dumps(summary, indent=2, default=str).encode(), atomic=True)
    log.info(
        "Finalized %s: %d succeeded, %d failed, %d missing%s; total cost $%.4f",
        location.uri, report.succeeded, report.failed, report.missing,
        f" of {report.expected_images}" if expected is not None else "", report.total_cost_usd,
    )
    return report

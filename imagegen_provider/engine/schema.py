"""The public schema of the metadata table: one row per image (per attempt run), documented in the README."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

_TS = pa.timestamp("us", tz="UTC")

METADATA_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("image_index", pa.int32()),
        pa.field("prompt", pa.string()),
        pa.field("revised_prompt", pa.string()),
        pa.field("model", pa.string()),
        pa.field("provider", pa.string()),
        pa.field("dialect", pa.string()),
        pa.field("size", pa.string()),
        pa.field("quality", pa.string()),
        pa.field("style", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("params", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("attempts", pa.int32()),
        pa.field("image_uri", pa.string()),
        pa.field("file_name", pa.string()),
        pa.field("image_sha256", pa.string()),
        pa.field("image_bytes", pa.int64()),
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("image_format", pa.string()),
        pa.field("input_tokens", pa.int64()),
        pa.field("output_tokens", pa.int64()),
        pa.field("total_tokens", pa.int64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("cost_source", pa.string()),
        pa.field("request_id", pa.string()),
        pa.field("latency_ms", pa.float64()),
        pa.field("started_at", _TS),
        pa.field("finished_at", _TS),
        # Where the row came from: Airflow fills these from the task context, the CLI leaves them null.
        pa.field("dag_id", pa.string()),
        pa.field("task_id", pa.string()),
        pa.field("shard", pa.string()),
    ]
)

COLUMNS: tuple[str, ...] = tuple(METADATA_SCHEMA.names)

STATUS_SUCCEEDED = "succeeded"
STATUS_FAILED = "failed"
COST_REPORTED = "reported"
COST_ESTIMATED = "estimated"
#: Charged by the bundled local gateway: play money, priced from the same table.
COST_SIMULATED = "simulated"


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts keyed by column name; missing keys are null) as a table of the public schema."""
    return pa.Table.from_pylist([{name: row.get(name) for name in COLUMNS} for row in rows], schema=METADATA_SCHEMA)

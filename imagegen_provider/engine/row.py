"""One metadata row as a typed record, converted to a plain mapping only where it is written."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any

from imagegen_provider.engine.schema import COLUMNS, STATUS_FAILED, STATUS_SUCCEEDED

#: Longest error message kept on a row: gateway bodies can be large, and metadata is read in bulk.
MAX_ERROR_CHARS = 2000


@dataclass
class MetadataRow:
    """A row of the public metadata table (see :mod:`imagegen_provider.engine.schema`); fields in column order."""

    run_id: str
    prompt_id: str
    image_index: int
    prompt: str | None = None
    revised_prompt: str | None = None
    model: str | None = None
    provider: str | None = None
    dialect: str | None = None
    size: str | None = None
    quality: str | None = None
    style: str | None = None
    seed: int | None = None
    params: str | None = None
    status: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    attempts: int = 0
    image_uri: str | None = None
    file_name: str | None = None
    image_sha256: str | None = None
    image_bytes: int | None = None
    image_width: int | None = None
    image_height: int | None = None
    image_format: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cost_usd: float | None = None
    cost_source: str | None = None
    request_id: str | None = None
    latency_ms: float | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    dag_id: str | None = None
    task_id: str | None = None
    shard: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == STATUS_SUCCEEDED

    def fail(self, *, error_type: str, message: str, http_status: int | None = None) -> None:
        """Mark the row failed. ``message`` must already be free of secrets."""
        self.status = STATUS_FAILED
        self.error_type = error_type
        self.error_message = message[:MAX_ERROR_CHARS]
        self.http_status = http_status

    def to_dict(self) -> dict[str, Any]:
        """The mapping the metadata sink writes, keyed by column name."""
        return asdict(self)

    def to_json(self) -> bytes:
        """One JSON object (timestamps in ISO 8601), as the metadata journal stores rows."""
        data = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in self.to_dict().items()}
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> MetadataRow:
        values = json.loads(data)
        for key in ("started_at", "finished_at"):
            if isinstance(values.get(key), str):
                values[key] = datetime.fromisoformat(values[key])
        return cls(**{name: values.get(name) for name in COLUMNS if name in values})


def _check_columns() -> None:
    names = tuple(f.name for f in fields(MetadataRow))
    if names != COLUMNS:
        # Import-time: a schema change that forgets the row type must fail every test, not one run.
        raise RuntimeError(f"MetadataRow fields {names} do not match the metadata schema {COLUMNS}")


_check_columns()

"""Checks that run before the first paid request: a run that cannot finish must fail while it costs nothing.

* every operator number is in range (timeouts, concurrency, rates, row ranges, URLs);
* the output takes a write (a probe object, written and deleted);
* the prompt table is readable end to end: footer, every row group's metadata, and the data of the row
  groups the run will read (a corrupt row group at the end of the table would otherwise stop the run
  after hours of paid requests).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imagegen_provider.engine.storage import StorageLocation

_CHECK_BATCH_ROWS = 8192


class PreflightError(ValueError):
    """The run cannot start; the message names the setting, the table or the output at fault."""


def _describe(exc: BaseException) -> str:
    """One printable line: library messages can carry raw bytes of the file and newlines."""
    text = getattr(exc, "strerror", None) or str(exc)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_positive(name: str, value: float | None, *, allow_zero: bool = False, optional: bool = True) -> None:
    """``value`` is a finite number above zero (or zero, or ``None`` when allowed)."""
    if value is None:
        if optional:
            return
        raise PreflightError(f"{name} is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PreflightError(f"{name} must be a finite number, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise PreflightError(f"{name} must be {'zero or more' if allow_zero else 'above zero'}, not {value!r}")


def check_row_range(start: int, stop: int | None) -> None:
    if start < 0:
        raise PreflightError(f"rows: START must be 0 or more, not {start}")
    if stop is not None and stop <= start:
        raise PreflightError(f"rows: START ({start}) must be below STOP ({stop})")


def check_base_url(base_url: str | None) -> None:
    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise PreflightError(f"base URL must start with http:// or https://, not {base_url[:60]!r}")


def check_client_settings(settings: Any) -> None:
    """The numbers of a :class:`~imagegen_provider.transport.settings.ClientSettings` (duck-typed: the
    settings class is the transport's)."""
    check_base_url(settings.base_url)
    check_positive("timeout (read_timeout)", settings.read_timeout)
    check_positive("connect_timeout", settings.connect_timeout)
    check_positive("max_attempts", settings.max_attempts)
    check_positive("attempt_timeout", settings.attempt_timeout)
    check_positive("max_response_bytes", settings.max_response_bytes)
    check_positive("max_retry_after", settings.max_retry_after, allow_zero=True)
    check_positive("breaker_seconds", settings.breaker_seconds, allow_zero=True)
    limits = settings.limits
    if limits.max_in_flight is None or limits.max_in_flight < 1:
        raise PreflightError(f"max_in_flight must be 1 or more, not {limits.max_in_flight!r}")
    check_positive("rpm (requests_per_minute)", limits.requests_per_minute)
    check_positive("images_per_minute", limits.images_per_minute)


def check_output_writable(output: StorageLocation) -> None:
    """Write and delete a probe object at the output root."""
    probe = f"_imagegen-probe-{uuid.uuid4().hex[:12]}"
    try:
        output.write_bytes(probe, b"probe")
        output.remove([probe])
    except Exception as exc:
        raise PreflightError(f"output {output.uri} is not writable ({_describe(exc)}); nothing was sent") from None


def _row_groups(metadata: pq.FileMetaData, start: int, stop: int | None) -> list[tuple[int, int, int]]:
    """(index, first row, end row) of the row groups overlapping ``[start, stop)``."""
    groups, first = [], 0
    stop = metadata.num_rows if stop is None else min(stop, metadata.num_rows)
    for index in range(metadata.num_row_groups):
        end = first + metadata.row_group(index).num_rows
        if end > start and first < stop:
            groups.append((index, first, end))
        first = end
    return groups


def _read_row_group(parquet: pq.ParquetFile, index: int, columns: list[str], *, where: str) -> None:
    try:
        # Batch by batch: memory stays bounded by a batch, not by a (possibly huge) row group.
        for _batch in parquet.iter_batches(batch_size=_CHECK_BATCH_ROWS, row_groups=[index], columns=columns):
            pass
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise PreflightError(f"{where} is unreadable ({_describe(exc)}); nothing was sent") from None


def check_table_readable(
    url: Any, *, columns: list[str], start: int = 0, stop: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Read every row group's metadata, and the ``columns`` of the row groups in ``[start, stop)``."""
    location = StorageLocation.from_url(url, storage_options)
    try:
        with location.fs.open(location.root, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            metadata = parquet.metadata
            for index in range(metadata.num_row_groups):
                group = metadata.row_group(index)
                for column in range(group.num_columns):
                    group.column(column).statistics  # noqa: B018 - decoding them is the check
            wanted = [c for c in columns if c in parquet.schema_arrow.names]
            for index, first, end in _row_groups(metadata, start, stop):
                _read_row_group(parquet, index, wanted, where=f"prompt table {url}: row group {index} "
                                f"(rows {first}-{end - 1})")
    except PreflightError:
        raise
    except FileNotFoundError:
        raise PreflightError(f"prompt table {url} does not exist") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise PreflightError(f"prompt table {url} is not readable ({_describe(exc)}); nothing was sent") from None

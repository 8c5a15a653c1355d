"""Preflight: a run that cannot finish fails before its first paid request, naming what is wrong."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagegen_provider.engine import RunConfig
from imagegen_provider.engine.preflight import PreflightError, check_client_settings
from imagegen_provider.transport.ratelimit import RateLimits
from imagegen_provider.transport.settings import ClientSettings

from ._support import numbered, run_batch


def _corrupt_last_row_group(path) -> None:
    metadata = pq.ParquetFile(path).metadata
    column = metadata.row_group(metadata.num_row_groups - 1).column(1)  # the prompt column
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    for offset in range(start, start + column.total_compressed_size):
        data[offset] = 0xFF
    path.write_bytes(bytes(data))


async def test_corrupt_later_row_group_fails_before_any_request(tmp_path, gateway):
    ids, texts = numbered(30)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ids, "prompt": texts}), path, row_group_size=10)
    _corrupt_last_row_group(path)
    with pytest.raises(PreflightError, match=r"row group 2 \(rows 20-29\) is unreadable.*nothing was sent"):
        await run_batch(gateway, prompts=str(path), output=str(tmp_path / "out"))
    assert gateway.stats()["generation_requests"] == 0
    # A shard that does not reach the corrupt row group still runs.
    summary = await run_batch(gateway, prompts=str(path), output=str(tmp_path / "out"), row_start=0, row_stop=20)
    assert summary.succeeded == 20


async def test_output_that_is_a_file_fails_before_any_request(tmp_path, gateway):
    ids, texts = numbered(3)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ids, "prompt": texts}), path)
    (tmp_path / "out").write_text("a file")
    with pytest.raises(PreflightError, match=r"output file://.*/out is not writable"):
        await run_batch(gateway, prompts=str(path), output=str(tmp_path / "out"))
    assert gateway.stats()["generation_requests"] == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"row_start": 5, "row_stop": 5}, r"START \(5\) must be below STOP \(5\)"),
        ({"row_start": -1}, "START must be 0 or more"),
        ({"max_cost_usd": math.nan}, "max_cost_usd must be a finite number"),
        ({"max_cost_usd": -1.0}, "max_cost_usd must be zero or more"),
        ({"progress_interval": 0}, "progress_interval must be above zero"),
        ({"lease_stale_seconds": math.inf}, "lease_stale_seconds must be a finite number"),
        ({"flush_rows": 0}, "flush_rows must be above zero"),
    ],
)
def test_run_numbers_out_of_range_are_refused(changes, message):
    with pytest.raises(PreflightError, match=message):
        RunConfig(prompts="p.parquet", output="out", **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"base_url": "localhost:8000/v1"}, "base URL must start with http:// or https://"),
        ({"read_timeout": 0.0}, "timeout .* must be above zero"),
        ({"limits": RateLimits(max_in_flight=0)}, "max_in_flight must be 1 or more"),
        ({"limits": RateLimits(requests_per_minute=-5)}, "rpm .* must be above zero"),
        ({"limits": RateLimits(requests_per_minute=math.nan)}, "rpm .* must be a finite number"),
    ],
)
def test_client_numbers_out_of_range_are_refused(changes, message):
    settings = ClientSettings(**{"base_url": "http://127.0.0.1:1/v1", **changes})
    with pytest.raises(PreflightError, match=message):
        check_client_settings(settings)

"""Helpers for the engine tests: prompt tables, a client for a loopback gateway, reading an output back."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imagegen_provider.engine import BatchRunner, RunConfig, RunSummary
from imagegen_provider.engine.metadata import current_rows, read_metadata
from imagegen_provider.engine.storage import StorageLocation
from imagegen_provider.transport.client import ImageGenClient
from imagegen_provider.transport.ratelimit import RateLimits
from imagegen_provider.transport.retry import RetryPolicy

DIALECT_PATHS = {"openai": "/v1", "indoxhub": "/api/v1", "router": "/router/v1"}

#: The cheapest request the gateway renders: a 256x256 dall-e-2 PNG returned inline.
SMALL = {"model": "dall-e-2", "size": "256x256", "response_format": "b64_json"}
#: What the packaged price table lists for it.
SMALL_PRICE = 0.016


def write_prompts(
    path: str | Path,
    prompts: Sequence[str | None],
    *,
    ids: Sequence[Any] | None = None,
    row_group_size: int | None = None,
    schema: pa.Schema | None = None,
    **columns: Sequence[Any],
) -> str:
    """A Parquet prompt table at ``path``: ``id`` (when given), ``prompt`` and any extra columns."""
    data: dict[str, Any] = {}
    if ids is not None:
        data["id"] = list(ids)
    data["prompt"] = list(prompts)
    data.update({name: list(values) for name, values in columns.items()})
    table = pa.table(data, schema=schema) if schema is not None else pa.table(data)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def numbered(n: int, prefix: str = "p") -> tuple[list[str], list[str]]:
    """``n`` ids and matching, distinct prompts."""
    return [f"{prefix}{i:03d}" for i in range(n)], [f"a small watercolour fox number {i}" for i in range(n)]


def make_client(
    gateway: Any,
    *,
    dialect: str = "openai",
    api_key: str = "sk-test-client-key-0123456789",
    max_in_flight: int = 4,
    max_attempts: int = 1,
    accepts_seed: bool | None = None,
) -> ImageGenClient:
    return ImageGenClient(
        base_url=gateway.base_url + DIALECT_PATHS[dialect],
        api_key=api_key,
        dialect=dialect,
        accepts_seed=accepts_seed,
        retry=RetryPolicy(max_attempts=max_attempts, backoff_initial=0.01, backoff_max=0.05),
        limits=RateLimits(max_in_flight=max_in_flight),
    )


async def run_batch(
    gateway: Any,
    *,
    dialect: str = "openai",
    api_key: str = "sk-test-client-key-0123456789",
    max_in_flight: int = 4,
    max_attempts: int = 1,
    accepts_seed: bool | None = None,
    **config: Any,
) -> RunSummary:
    """Run one :class:`RunConfig` against ``gateway`` with a fresh client."""
    config.setdefault("request_defaults", SMALL)
    async with make_client(
        gateway,
        dialect=dialect,
        api_key=api_key,
        max_in_flight=max_in_flight,
        max_attempts=max_attempts,
        accepts_seed=accepts_seed,
    ) as client:
        return await BatchRunner(RunConfig(**config), client=client).run()


def history(output: Any, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Every metadata row on record (parts and journal)."""
    return read_metadata(StorageLocation.from_url(output, storage_options)).to_pandas()


def current(output: Any, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """One row per (prompt_id, image_index), indexed by that pair."""
    frame = current_rows(read_metadata(StorageLocation.from_url(output, storage_options)))
    return frame.set_index(["prompt_id", "image_index"], drop=False).sort_index()


def all_files(root: str | Path) -> list[Path]:
    found = []
    for folder, _dirs, files in os.walk(root):
        found.extend(Path(folder) / name for name in files)
    return sorted(found)


def image_files(output: str | Path) -> list[str]:
    """Image files under ``<output>/images``, relative to ``output``, as metadata's ``file_name`` spells them."""
    base = Path(output)
    return sorted(p.relative_to(base).as_posix() for p in all_files(base / "images"))


def stats(gateway: Any) -> dict[str, Any]:
    return gateway.stats()

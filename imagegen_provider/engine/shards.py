"""Split a prompt table into row ranges from its Parquet footer alone (no rows are read)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from imagegen_provider.engine.prompts import PromptColumns, PromptTable

#: Airflow's default ``[core] max_map_length``.
DEFAULT_MAX_SHARDS = 1024


def shard_label(start: int, stop: int) -> str:
    return f"rows-{start:09d}-{stop:09d}"


def plan_shards(
    prompts: Any,
    *,
    shard_size: int = 1000,
    max_shards: int = DEFAULT_MAX_SHARDS,
    prompt_column: str = "prompt",
    id_column: str = "id",
    storage_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Shard descriptors ``{"index", "start", "stop", "label"}`` covering the table's rows.

    Opening the table reads only its footer (schema and row-group sizes), and checks the prompt/id
    columns, so a bad table fails here once rather than in every mapped task. ``shard_size`` grows when
    needed to keep the count at or under ``max_shards`` (Airflow's ``max_map_length``).
    """
    if shard_size < 1 or max_shards < 1:
        raise ValueError("shard_size and max_shards must be at least 1")
    table = PromptTable.open(
        prompts, columns=PromptColumns(prompt=prompt_column, id=id_column), storage_options=storage_options
    )
    rows = table.num_rows
    size = max(shard_size, math.ceil(rows / max_shards)) if rows else shard_size
    shards = []
    for index, start in enumerate(range(0, rows, size)):
        stop = min(rows, start + size)
        shards.append({"index": index, "start": start, "stop": stop, "label": shard_label(start, stop)})
    return shards

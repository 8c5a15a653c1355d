"""Read a Parquet prompt table from any fsspec URL in record batches, never the whole table at once."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imagegen_provider.engine.keys import folder_collision, positional_id, safe_id
from imagegen_provider.engine.storage import StorageLocation
from imagegen_provider.wire.request import MAX_SEED

BATCH_ROWS = 1024
_INT64_MAX = 2**63 - 1


class PromptTableError(ValueError):
    """The prompt table cannot be used as a whole (missing column, wrong type, duplicate ids)."""


def _is_string(t: pa.DataType) -> bool:
    # Dictionary-encoded strings are what pandas writes for a categorical column (a "model" column, say).
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


def _is_int(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t))


def _is_number(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t))


# Columns that override a request parameter per row, and the Arrow types they accept. ``n`` is the number
# of images of that row (each image is still its own request with its own seed).
OVERRIDE_COLUMNS: dict[str, tuple[str, Any]] = {
    "model": ("string", _is_string),
    "size": ("string", _is_string),
    "quality": ("string", _is_string),
    "style": ("string", _is_string),
    "seed": ("integer", _is_int),
    "n": ("integer", _is_int),
    "negative_prompt": ("string", _is_string),
    "aspect_ratio": ("string", _is_string),
    "resolution": ("string", _is_string),
    "guidance_scale": ("number", _is_number),
    "output_format": ("string", _is_string),
    "output_compression": ("integer", _is_int),
    "background": ("string", _is_string),
    "moderation": ("string", _is_string),
    "enhance_prompt": ("boolean", pa.types.is_boolean),
    "add_watermark": ("boolean", pa.types.is_boolean),
    "user": ("string", _is_string),
    "provider": ("string", _is_string),
}


@dataclass(frozen=True)
class PromptRow:
    position: int
    prompt_id: str
    prompt: str | None
    overrides: dict[str, Any] = field(default_factory=dict)


DEFAULT_ID_COLUMN = "id"


@dataclass(frozen=True)
class PromptColumns:
    prompt: str = "prompt"
    id: str = DEFAULT_ID_COLUMN


class PromptTable:
    """A Parquet prompt table.

    :param location: the folder holding the file, or the file itself via :meth:`open`.
    :param columns: the prompt and id column names.
    """

    def __init__(self, file: pq.ParquetFile, columns: PromptColumns, description: str) -> None:
        self._file = file
        self.columns = columns
        self.description = description
        self.schema = file.schema_arrow
        self._validate_schema()

    @classmethod
    def open(
        cls, url: Any, *, columns: PromptColumns | None = None, storage_options: Mapping[str, Any] | None = None
    ) -> PromptTable:
        location = StorageLocation.from_url(url, storage_options)
        try:
            handle = location.fs.open(location.root, "rb")
            parquet = pq.ParquetFile(handle)
        except FileNotFoundError:
            raise PromptTableError(f"prompt table {url} does not exist") from None
        except (pa.ArrowInvalid, OSError) as exc:
            raise PromptTableError(f"prompt table {url} is not a readable Parquet file: {exc}") from None
        return cls(parquet, columns or PromptColumns(), url)

    # -- shape -----------------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return int(self._file.metadata.num_rows)

    @property
    def row_group_bounds(self) -> list[int]:
        """Start row of each row group, plus the total: ``[0, n0, n0+n1, …, num_rows]``."""
        bounds = [0]
        for index in range(self._file.metadata.num_row_groups):
            bounds.append(bounds[-1] + self._file.metadata.row_group(index).num_rows)
        return bounds

    @property
    def has_id_column(self) -> bool:
        return self.columns.id in self.schema.names

    @property
    def override_columns(self) -> list[str]:
        return [name for name in OVERRIDE_COLUMNS if name in self.schema.names and name != self.columns.prompt]

    def _validate_schema(self) -> None:
        names = self.schema.names
        prompt_col = self.columns.prompt
        if prompt_col not in names:
            raise PromptTableError(
                f"{self.description}: prompt column {prompt_col!r} not found (columns: {', '.join(names)})"
            )
        if not self.has_id_column and self.columns.id != DEFAULT_ID_COLUMN:
            # The default id column is optional (ids are derived); a column the caller named is not.
            raise PromptTableError(
                f"{self.description}: id column {self.columns.id!r} not found (columns: {', '.join(names)})"
            )
        # A null-typed column (an empty table written from pandas, or all values null) has no wrong values:
        # an empty table yields no rows, null prompts fail their rows and null ids are rejected below.
        prompt_type = self.schema.field(prompt_col).type
        if not _is_string(prompt_type) and not pa.types.is_null(prompt_type):
            raise PromptTableError(
                f"{self.description}: prompt column {prompt_col!r} must be string, "
                f"not {self.schema.field(prompt_col).type}"
            )
        if self.has_id_column:
            id_type = self.schema.field(self.columns.id).type
            if not (_is_string(id_type) or _is_int(id_type) or pa.types.is_null(id_type)):
                raise PromptTableError(
                    f"{self.description}: id column {self.columns.id!r} must be string or integer, not {id_type}"
                )
        for name in self.override_columns:
            expected, check = OVERRIDE_COLUMNS[name]
            actual = self.schema.field(name).type
            if not check(actual) and not pa.types.is_null(actual):
                raise PromptTableError(
                    f"{self.description}: column {name!r} overrides the request's {name} and must be "
                    f"{expected}, not {actual}"
                )

    def check_unique_ids(self, start: int = 0, stop: int | None = None) -> None:
        """Fail on null or duplicate ids in ``[start, stop)``, and on two ids whose image folders would be the
        same (case folded, see :mod:`~imagegen_provider.engine.keys`), reading only the id column (and an
        unsigned ``seed`` column, see :meth:`_check_seed_width`)."""
        self._check_seed_width(start, stop)
        if not self.has_id_column:
            return
        folders: dict[str, str] = {}
        for position, value in self._iter_column(self.columns.id, start, stop):
            if value is None:
                raise PromptTableError(f"{self.description}: row {position}: id column {self.columns.id!r} is null")
            key = str(value)
            holder = folder_collision(folders, key)
            if holder == key:
                raise PromptTableError(
                    f"{self.description}: row {position}: duplicate id {key!r} in column {self.columns.id!r}"
                )
            if holder is not None:
                raise PromptTableError(
                    f"{self.description}: row {position}: ids {holder!r} and {key!r} would share the image folder "
                    f"images/{safe_id(key)}/ (column {self.columns.id!r}); rename one of them"
                )

    def _check_seed_width(self, start: int, stop: int | None) -> None:
        """An unsigned 64-bit ``seed`` column can hold values the metadata's int64 ``seed`` column cannot record
        (an out-of-range seed fails its row, and the row must still be recordable): reject those up front."""
        if "seed" not in self.override_columns or self.schema.field("seed").type != pa.uint64():
            return
        for position, value in self._iter_column("seed", start, stop):
            if value is not None and value > _INT64_MAX:
                raise PromptTableError(
                    f"{self.description}: row {position}: seed {value} does not fit a signed 64-bit integer "
                    f"(seeds are 0..{MAX_SEED})"
                )

    # -- reading ---------------------------------------------------------------------------------

    def _batches(self, columns: list[str], start: int, stop: int | None) -> Iterator[tuple[int, pa.RecordBatch]]:
        """Record batches covering ``[start, stop)``, each with the table position of its first row.

        Only the row groups that overlap the range are read: a shard never reads the whole table.
        """
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        bounds = self.row_group_bounds
        first = max(0, bisect.bisect_right(bounds, start) - 1)
        for group in range(first, len(bounds) - 1):
            group_start = bounds[group]
            if group_start >= stop:
                break
            position = group_start
            for batch in self._file.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=columns):
                lo = max(start - position, 0)
                hi = min(stop - position, batch.num_rows)
                if hi > lo:
                    yield position + lo, batch.slice(lo, hi - lo)
                position += batch.num_rows

    def _iter_column(self, column: str, start: int, stop: int | None) -> Iterator[tuple[int, Any]]:
        for position, batch in self._batches([column], start, stop):
            for offset, value in enumerate(batch.column(0).to_pylist()):
                yield position + offset, value

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[PromptRow]:
        """Rows in ``[start, stop)``; ``position`` is the row's index in the whole table."""
        columns = [self.columns.prompt, *self.override_columns]
        if self.has_id_column:
            columns.append(self.columns.id)
        overrides = self.override_columns
        for position, batch in self._batches(columns, start, stop):
            data = batch.to_pydict()
            del batch
            # Arrow's allocator keeps freed pages for reuse; give them back so that resident memory stays
            # bounded by one batch, not by the table (bench: memory case).
            pa.default_memory_pool().release_unused()
            prompts = data[self.columns.prompt]
            ids = data.get(self.columns.id)
            for offset, prompt in enumerate(prompts):
                row_position = position + offset
                prompt_id = str(ids[offset]) if ids is not None else positional_id(row_position, prompt)
                row_overrides = {name: data[name][offset] for name in overrides if data[name][offset] is not None}
                yield PromptRow(row_position, prompt_id, prompt, row_overrides)

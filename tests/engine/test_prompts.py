"""The prompt reader: any fsspec URL, record batches by row group, column mapping, up-front rejection of
tables that cannot be used, and stable ids for tables without an id column."""

from __future__ import annotations

import re
import uuid

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagegen_provider.engine import prompts as prompts_module
from imagegen_provider.engine.keys import positional_id
from imagegen_provider.engine.prompts import PromptColumns, PromptTable, PromptTableError

from ._support import SMALL, history, numbered, run_batch, write_prompts


def _table_rows(table: PromptTable, start: int = 0, stop: int | None = None) -> list[tuple[int, str, str]]:
    return [(row.position, row.prompt_id, row.prompt) for row in table.rows(start, stop)]


@pytest.fixture
def twelve(tmp_path) -> str:
    """12 rows in 3 row groups of 4 (bounds 0, 4, 8, 12)."""
    ids, texts = numbered(12)
    return write_prompts(tmp_path / "prompts.parquet", texts, ids=ids, row_group_size=4)


def _expected(start: int, stop: int) -> list[tuple[int, str, str]]:
    ids, texts = numbered(12)
    return [(i, ids[i], texts[i]) for i in range(start, min(stop, 12))]


# -- where the table lives ---------------------------------------------------------------------------------


def test_reads_local_path_and_file_url(twelve):
    for url in (twelve, f"file://{twelve}"):
        table = PromptTable.open(url)
        assert table.num_rows == 12
        assert table.row_group_bounds == [0, 4, 8, 12]
        assert _table_rows(table) == _expected(0, 12)


def test_reads_memory_url(twelve):
    url = f"memory://prompts-{uuid.uuid4().hex}/prompts.parquet"
    fs = fsspec.filesystem("memory")
    with open(twelve, "rb") as source:
        fs.pipe_file(url, source.read())
    try:
        assert _table_rows(PromptTable.open(url), 3, 9) == _expected(3, 9)
    finally:
        fs.rm(url)


def test_reads_s3_with_storage_options(twelve, s3_server):
    import s3fs

    options = s3_server["storage_options"]
    url = f"s3://{s3_server['bucket']}/prompts-{uuid.uuid4().hex}/prompts.parquet"
    s3fs.S3FileSystem(**options).put_file(twelve, url)
    table = PromptTable.open(url, storage_options=options)
    assert table.row_group_bounds == [0, 4, 8, 12]
    assert _table_rows(table, 2, 11) == _expected(2, 11)
    # Without the credentials and endpoint the table is not readable: the options are really used.
    with pytest.raises(Exception):  # noqa: B017 - botocore's or fsspec's error, whichever comes first
        _ = PromptTable.open(url, storage_options={"anon": True, "client_kwargs": options["client_kwargs"]}).num_rows


def test_missing_table_is_named(tmp_path):
    with pytest.raises(PromptTableError, match="does not exist"):
        PromptTable.open(str(tmp_path / "nope.parquet"))


# -- record batches and row ranges -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "stop"),
    [(0, None), (0, 4), (3, 9), (4, 8), (5, 6), (7, 12), (11, None), (6, 6), (12, None), (10, 500)],
)
def test_row_range_crossing_row_groups_returns_exactly_those_rows(twelve, monkeypatch, start, stop):
    # Batches smaller than a row group too: ranges then cross batch bounds inside a group as well.
    monkeypatch.setattr(prompts_module, "BATCH_ROWS", 3)
    table = PromptTable.open(twelve)
    assert _table_rows(table, start, stop) == _expected(start, 12 if stop is None else stop)


def test_rows_are_read_in_batches_of_the_overlapping_row_groups_only(twelve, monkeypatch):
    """A shard reads its own row groups batch by batch, never the whole table."""
    requested: list[list[int]] = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        requested.append(list(kwargs["row_groups"]))
        return real_iter_batches(self, *args, **kwargs)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the whole table must never be read at once")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    table = PromptTable.open(twelve)
    assert _table_rows(table, 5, 9) == _expected(5, 9)
    assert requested == [[1], [2]]
    requested.clear()
    table.check_unique_ids(0, 4)
    assert requested == [[0]]


# -- column mapping ----------------------------------------------------------------------------------------


def test_custom_prompt_and_id_columns(tmp_path):
    path = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"uid": ["u1", "u2"], "text": ["a red kite", "a blue boat"], "prompt": ["x", "y"]}), path)
    table = PromptTable.open(str(path), columns=PromptColumns(prompt="text", id="uid"))
    assert _table_rows(table) == [(0, "u1", "a red kite"), (1, "u2", "a blue boat")]


def test_a_named_id_column_that_is_missing_is_rejected(tmp_path):
    """Without an ``id`` column, ids are derived; a misspelled id column must not silently do the same."""
    path = tmp_path / "no-uid.parquet"
    pq.write_table(pa.table({"prompt": ["a red kite"]}), path)
    assert _table_rows(PromptTable.open(str(path)))[0][1].startswith("row00000000-")
    with pytest.raises(PromptTableError, match="id column 'uid' not found"):
        PromptTable.open(str(path), columns=PromptColumns(id="uid"))


def test_integer_ids_and_per_row_overrides(tmp_path):
    path = write_prompts(
        tmp_path / "p.parquet", ["a", "b"], ids=[10, 20], seed=[5, None], quality=["hd", None], model=["dall-e-3", None]
    )
    rows = list(PromptTable.open(path).rows())
    assert [r.prompt_id for r in rows] == ["10", "20"]
    assert rows[0].overrides == {"seed": 5, "quality": "hd", "model": "dall-e-3"}
    assert rows[1].overrides == {}  # nulls mean "use the default"


def test_categorical_columns_from_pandas_are_strings(tmp_path):
    path = tmp_path / "cat.parquet"
    pd.DataFrame(
        {"id": ["a", "b"], "prompt": pd.Categorical(["x", "y"]), "model": pd.Categorical(["dall-e-2", "dall-e-3"])}
    ).to_parquet(path)
    rows = list(PromptTable.open(str(path)).rows())
    assert [(r.prompt_id, r.prompt, r.overrides["model"]) for r in rows] == [
        ("a", "x", "dall-e-2"), ("b", "y", "dall-e-3")
    ]


# -- rejected up front, naming the column ------------------------------------------------------------------


BAD_TABLES = {
    "missing prompt column": (
        pa.table({"id": ["a"], "text": ["hello"]}), {}, [r"prompt column 'prompt' not found", "text"]
    ),
    "missing custom prompt column": (
        pa.table({"id": ["a"], "prompt": ["hello"]}), {"prompt_column": "caption"}, [r"prompt column 'caption'"]
    ),
    "duplicate ids": (
        pa.table({"id": ["a", "b", "a"], "prompt": ["x", "y", "z"]}), {},
        [r"row 2", r"duplicate id 'a'", r"column 'id'"],
    ),
    "duplicate custom ids": (
        pa.table({"key": [1, 2, 2], "prompt": ["x", "y", "z"]}), {"id_column": "key"},
        [r"row 2", r"'2'", r"column 'key'"],
    ),
    "null id": (
        pa.table({"id": ["a", None], "prompt": ["x", "y"]}), {}, [r"row 1", r"id column 'id' is null"]
    ),
    "prompt is int": (
        pa.table({"id": ["a"], "prompt": [3]}), {}, [r"prompt column 'prompt' must be string", "int64"]
    ),
    "seed is string": (
        pa.table({"id": ["a"], "prompt": ["x"], "seed": ["42"]}), {}, [r"column 'seed'", "must be integer", "string"]
    ),
    "id is float": (
        pa.table({"id": [1.5], "prompt": ["x"]}), {}, [r"id column 'id' must be string or integer", "double"]
    ),
    "quality is int": (
        pa.table({"id": ["a"], "prompt": ["x"], "quality": [1]}), {}, [r"column 'quality'", "must be string"]
    ),
}


@pytest.mark.parametrize("case", list(BAD_TABLES), ids=list(BAD_TABLES))
async def test_unusable_table_is_rejected_before_any_request(tmp_path, gateway, case):
    table, columns, patterns = BAD_TABLES[case]
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(PromptTableError) as raised:
        await run_batch(gateway, prompts=str(path), output=str(tmp_path / "out"), **columns)
    for pattern in patterns:
        assert re.search(pattern, str(raised.value)), (pattern, str(raised.value))
    assert gateway.stats()["generation_requests"] == 0
    assert not (tmp_path / "out" / "images").exists()


# -- tables without an id column ---------------------------------------------------------------------------


def test_positional_ids_are_stable_and_depend_on_position_and_prompt(tmp_path):
    texts = ["same", "same", "other"]
    path = write_prompts(tmp_path / "noid.parquet", texts, row_group_size=2)
    first = [r.prompt_id for r in PromptTable.open(path).rows()]
    again = [r.prompt_id for r in PromptTable.open(path).rows()]
    assert first == again
    assert len(set(first)) == 3  # same prompt at two positions: two ids
    assert first == [positional_id(i, t) for i, t in enumerate(texts)]
    # A range read gives the same ids as a full read.
    assert [r.prompt_id for r in PromptTable.open(path).rows(1, 3)] == first[1:]
    # Another prompt at the same position is another id.
    other = write_prompts(tmp_path / "noid2.parquet", ["changed", "same", "other"])
    assert next(r.prompt_id for r in PromptTable.open(other).rows()) != first[0]


async def test_positional_ids_are_the_same_across_runs(tmp_path, gateway):
    path = write_prompts(tmp_path / "noid.parquet", ["a fox", "a hen", "a fox"])
    await run_batch(gateway, prompts=path, output=str(tmp_path / "one"))
    await run_batch(gateway, prompts=path, output=str(tmp_path / "two"))
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    key = ["prompt_id", "image_index", "seed", "file_name"]
    assert sorted(map(tuple, one[key].values.tolist())) == sorted(map(tuple, two[key].values.tolist()))
    assert one["prompt_id"].str.match(r"^row\d{8}-[0-9a-f]{8}$").all()
    assert SMALL["model"] == one["model"].iloc[0]


# -- empty and all-null columns ----------------------------------------------------------------------------


async def test_empty_table_from_pandas_is_an_empty_run_not_an_error(tmp_path, gateway):
    path = tmp_path / "empty.parquet"
    pd.DataFrame({"id": pd.Series([], dtype=object), "prompt": pd.Series([], dtype=object)}).to_parquet(path)
    assert pq.read_schema(path).field("prompt").type == pa.null()  # what pandas writes for no rows
    summary = await run_batch(gateway, prompts=str(path), output=str(tmp_path / "out"))
    assert (summary.total_images, summary.succeeded, summary.failed) == (0, 0, 0) and summary.complete
    assert gateway.stats()["generation_requests"] == 0


async def test_all_null_prompt_column_fails_each_row_and_all_null_ids_are_rejected(tmp_path, gateway):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": pa.nulls(2)}), path)
    summary = await run_batch(gateway, prompts=str(path), output=str(tmp_path / "out"))
    assert (summary.failed, summary.failures_by_type) == (2, {"InvalidRow": 2})
    assert gateway.stats()["generation_requests"] == 0
    pq.write_table(pa.table({"id": pa.nulls(2), "prompt": ["x", "y"]}), path)
    with pytest.raises(PromptTableError, match=r"row 0: id column 'id' is null"):
        await run_batch(gateway, prompts=str(path), output=str(tmp_path / "out2"))

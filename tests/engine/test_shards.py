"""Shards: planned from the Parquet footer alone, run into one output (at the same time), finalized into one
dataset that Hugging Face ``imagefolder`` loads."""

from __future__ import annotations

import asyncio
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagegen_provider.engine import finalize_output
from imagegen_provider.engine.finalize import DATASET_TABLE, SUMMARY_FILE
from imagegen_provider.engine.prompts import PromptTableError
from imagegen_provider.engine.shards import plan_shards

from ._support import current, image_files, run_batch, write_prompts


@pytest.fixture
def footer_only(monkeypatch):
    """Fail the test if any row data is read."""

    def forbidden(*_args, **_kwargs):
        raise AssertionError("plan_shards must read only the footer")

    for name in ("iter_batches", "read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)


def _covers(shards: list[dict], rows: int) -> bool:
    position = 0
    for index, shard in enumerate(shards):
        if shard["index"] != index or shard["start"] != position or shard["stop"] <= shard["start"]:
            return False
        position = shard["stop"]
    return position == rows


@pytest.mark.parametrize(
    ("rows", "shard_size", "max_shards", "expected"),
    [(10, 3, 1024, 4), (10, 3, 2, 2), (10, 10, 5, 1), (10, 100, 5, 1), (1000, 7, 10, 10), (1, 1, 1, 1), (0, 5, 5, 0)],
)
def test_plan_reads_the_footer_only_and_covers_every_row_once(
    tmp_path, footer_only, rows, shard_size, max_shards, expected
):
    schema = pa.schema([("prompt", pa.string())])
    path = write_prompts(tmp_path / "p.parquet", [f"p{i}" for i in range(rows)], row_group_size=3, schema=schema)
    shards = plan_shards(path, shard_size=shard_size, max_shards=max_shards)
    assert len(shards) == expected <= max_shards
    assert _covers(shards, rows)
    for shard in shards:
        assert shard["label"] == f"rows-{shard['start']:09d}-{shard['stop']:09d}"


def test_plan_rejects_bad_arguments_and_bad_tables(tmp_path):
    path = write_prompts(tmp_path / "p.parquet", ["a"])
    with pytest.raises(ValueError):
        plan_shards(path, shard_size=0)
    with pytest.raises(ValueError):
        plan_shards(path, max_shards=0)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["a"]}), bad)
    with pytest.raises(PromptTableError, match="prompt column 'prompt'"):
        plan_shards(str(bad))
    assert len(plan_shards(str(bad), prompt_column="text")) == 1


def _keys(output) -> dict[tuple[str, int], tuple[int, str]]:
    rows = current(output)
    return {k: (int(s), f) for k, s, f in zip(rows.index, rows["seed"], rows["file_name"], strict=True)}


async def _run_shards(gateway, shards, **config) -> list:
    return await asyncio.gather(
        *(run_batch(gateway, row_start=s["start"], row_stop=s["stop"], shard=s["label"], **config) for s in shards)
    )


async def test_shards_into_one_output_finalize_into_one_dataset(tmp_path, gateway, monkeypatch):
    ids = [f"q{i:02d}" for i in range(10)] + ["猫"]
    texts = [f"a paper boat number {i}" for i in range(11)]
    texts[4] = "forbidden-content boat"
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids, row_group_size=3)
    output = tmp_path / "sharded"
    config = {"prompts": prompts, "output": str(output), "images_per_prompt": 2, "base_seed": 77}

    shards = plan_shards(prompts, shard_size=4)
    assert [(s["start"], s["stop"]) for s in shards] == [(0, 4), (4, 8), (8, 11)]
    # The first two shards at the same time, as mapped tasks would run.
    await _run_shards(gateway, shards[:2], **config)
    report = finalize_output(str(output), prompts=prompts, images_per_prompt=2)
    assert (report.expected_images, report.succeeded, report.failed, report.missing) == (22, 14, 2, 6)
    assert not report.complete
    summary = json.loads((output / SUMMARY_FILE).read_text())
    refused = [("q04", 0, "ContentPolicyError"), ("q04", 1, "ContentPolicyError")]
    assert sorted(map(tuple, summary["failed_images"])) == refused
    assert sorted(map(tuple, summary["missing_images"])) == sorted(
        (pid, i) for pid in ["q08", "q09", "猫"] for i in range(2)
    )

    await _run_shards(gateway, shards[2:], **config)
    report = finalize_output(str(output), prompts=prompts, images_per_prompt=2)
    assert (report.succeeded, report.failed, report.missing) == (20, 2, 0)
    dataset = pd.read_parquet(output / DATASET_TABLE)
    assert len(dataset) == 20 and not dataset.duplicated(["prompt_id", "image_index"]).any()
    assert sorted(dataset["file_name"]) == image_files(output)
    assert set(dataset["shard"]) == {s["label"] for s in shards}
    assert json.loads((output / SUMMARY_FILE).read_text())["missing_images"] == []

    # Same table, another shard size, another output: identical seeds and keys.
    other = tmp_path / "other"
    await _run_shards(gateway, plan_shards(prompts, shard_size=7), **{**config, "output": str(other)})
    assert _keys(other) == _keys(output)
    whole = tmp_path / "whole"
    await run_batch(gateway, **{**config, "output": str(whole)})
    assert _keys(whole) == _keys(output)

    # Hugging Face loads the output as an image dataset, ignoring metadata/ parts and run_summary.json.
    hf_home = tmp_path / "hf"
    for variable, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}.items():
        monkeypatch.setenv(variable, value)
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(output), cache_dir=str(hf_home / "cache"), split="train")
    assert loaded.num_rows == 20
    assert {"image", "prompt_id", "image_index", "seed", "cost_usd"} <= set(loaded.column_names)
    first = loaded[0]
    assert first["image"].size == (256, 256)
    by_key = dataset.set_index(["prompt_id", "image_index"])
    assert first["seed"] == by_key.loc[(first["prompt_id"], first["image_index"]), "seed"]
    assert "猫" in set(loaded["prompt_id"])

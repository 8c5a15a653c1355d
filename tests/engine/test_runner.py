"""The batch runner end to end against the bundled gateway on a loopback socket: bad rows, metadata, secrets,
progress, summary, per-image failures and fatal errors."""

from __future__ import annotations

import json
import logging
import re
import uuid

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagegen_provider.engine import COLUMNS, METADATA_SCHEMA, finalize_output
from imagegen_provider.engine.keys import derive_seed
from imagegen_provider.engine.metadata import MetadataSink
from imagegen_gateway import GatewayConfig

from ._support import (
    SMALL,
    SMALL_PRICE,
    all_files,
    current,
    history,
    image_files,
    numbered,
    run_batch,
    write_prompts,
)

CONNECTION_KEY = "sk-conn-secret-0123456789abcdef"
BYOK_KEY = "byok-provider-secret-fedcba9876543210"


# -- bad rows fail alone, without a request ----------------------------------------------------------------


async def test_null_empty_blank_and_too_long_prompts_fail_their_row_without_a_request(tmp_path, gateway):
    prompts = ["a red fox", None, "", " \t\n ", "x" * 1001, "a blue whale"]
    ids = ["ok1", "null", "empty", "blank", "long", "ok2"]
    path = write_prompts(tmp_path / "p.parquet", prompts, ids=ids)
    summary = await run_batch(gateway, prompts=path, output=str(tmp_path / "out"))
    assert (summary.total_images, summary.succeeded, summary.failed, summary.not_attempted) == (6, 2, 4, 0)
    assert summary.stopped_reason is None
    stats = gateway.stats()
    assert stats["generation_requests"] == 2
    assert sorted(body["prompt"] for body in stats["last_request_bodies"]) == ["a blue whale", "a red fox"]
    rows = current(tmp_path / "out")
    assert rows.loc[("ok1", 0), "status"] == "succeeded" and pd.isna(rows.loc[("ok1", 0), "error_type"])
    for pid, reason in [("null", "prompt is null"), ("empty", "prompt is empty"), ("blank", "prompt is empty"),
                        ("long", r"prompt: 1001 characters; dall-e-2 accepts at most 1000")]:
        row = rows.loc[(pid, 0)]
        assert row["status"] == "failed"
        assert row["error_type"] in ("InvalidRow", "RequestValidationError")
        assert re.search(reason, row["error_message"]), row["error_message"]
        assert f"id {pid!r}" in row["error_message"]  # names the row
        assert row["attempts"] == 0 and pd.isna(row["cost_usd"]) and pd.isna(row["file_name"])
    assert summary.failures_by_type == {"InvalidRow": 4}


async def test_content_policy_refusal_fails_only_that_image(tmp_path, gateway):
    ids, texts = numbered(6)
    texts[2] = "a poster with forbidden-content on it"
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    summary = await run_batch(gateway, prompts=path, output=str(tmp_path / "out"), max_attempts=3)
    assert (summary.succeeded, summary.failed, summary.stopped_reason) == (5, 1, None)
    row = current(tmp_path / "out").loc[(ids[2], 0)]
    assert (row["status"], row["error_type"], row["http_status"], row["attempts"]) == (
        "failed", "ContentPolicyError", 400, 1  # not retried
    )
    assert pd.isna(row["cost_usd"])
    assert gateway.stats()["content_policy_rejections"] == 1


async def test_custom_column_names_end_to_end(tmp_path, gateway):
    path = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"key": ["k1", "k2"], "caption": ["a tram", "a ferry"]}), path)
    summary = await run_batch(
        gateway, prompts=str(path), output=str(tmp_path / "out"), prompt_column="caption", id_column="key"
    )
    assert summary.succeeded == 2
    rows = current(tmp_path / "out")
    assert list(rows["prompt_id"]) == ["k1", "k2"] and list(rows["prompt"]) == ["a tram", "a ferry"]


# -- metadata ----------------------------------------------------------------------------------------------


async def test_metadata_reads_with_pandas_and_duckdb_in_the_public_schema(tmp_path, gateway):
    ids, texts = numbered(5)
    texts[1] = "forbidden-content"
    texts[3] = ""
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    await run_batch(
        gateway, prompts=path, output=str(output), images_per_prompt=2, flush_rows=3,
        labels={"dag_id": "dag_a", "task_id": "task_a"},
    )
    parts = sorted((output / "metadata").glob("*.parquet"))
    assert len(parts) >= 3  # several parts (flush_rows=3): readers see one table
    for part in parts:
        assert pq.read_schema(part).remove_metadata().equals(METADATA_SCHEMA)

    frame = pd.read_parquet(output / "metadata")
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == 10
    dtypes = frame.dtypes
    assert str(dtypes["image_index"]) == "int32" and str(dtypes["seed"]) == "int64"
    assert str(dtypes["started_at"]) == str(dtypes["finished_at"]) == "datetime64[us, UTC]"
    assert str(dtypes["cost_usd"]) == "float64" and str(dtypes["latency_ms"]) == "float64"
    assert frame["status"].value_counts().to_dict() == {"succeeded": 6, "failed": 4}
    assert set(frame["dag_id"]) == {"dag_a"} and set(frame["task_id"]) == {"task_a"}
    assert set(frame["shard"]) == {"all"}

    glob = f"{output}/metadata/*.parquet"
    count, succeeded, cost = duckdb.sql(
        f"select count(*), count(*) filter (where status = 'succeeded'), sum(cost_usd) from read_parquet('{glob}')"
    ).fetchall()[0]
    assert (count, succeeded) == (10, 6)
    assert cost == pytest.approx(6 * SMALL_PRICE)
    relation = duckdb.sql(f"select * from read_parquet('{glob}')")
    types = dict(zip(relation.columns, map(str, relation.types)))
    assert list(relation.columns) == list(COLUMNS)
    assert types["image_index"] == "INTEGER" and types["seed"] == "BIGINT"
    assert types["finished_at"] == "TIMESTAMP WITH TIME ZONE" and types["cost_usd"] == "DOUBLE"

    ok = frame[frame["status"] == "succeeded"].iloc[0]
    params = json.loads(ok["params"])
    assert params["model"] == "dall-e-2" and params["size"] == "256x256" and params["seed"] == ok["seed"]
    assert (ok["image_width"], ok["image_height"], ok["image_format"]) == (256, 256, "png")
    assert len(ok["image_sha256"]) == 64 and ok["image_bytes"] > 0 and ok["request_id"]
    assert ok["dialect"] == "openai" and ok["cost_source"] == "estimated"


async def test_no_secret_in_any_written_file_or_log(tmp_path, gateway_factory, monkeypatch, caplog):
    gateway = gateway_factory(GatewayConfig(api_key=CONNECTION_KEY))
    texts = ["a cathedral", "forbidden-content", "", "y" * 1001, "a canal"]
    path = write_prompts(tmp_path / "p.parquet", texts, ids=[f"s{i}" for i in range(5)])
    output = tmp_path / "out"
    defaults = {**SMALL, "byok_api_key": BYOK_KEY}
    # Keep the journal entries on disk (no part is written) so that they are checked too.
    monkeypatch.setattr(MetadataSink, "_write", lambda self, rows, journal: None)
    caplog.set_level(logging.DEBUG)
    summary = await run_batch(
        gateway, prompts=path, output=str(output), request_defaults=defaults, dialect="indoxhub",
        api_key=CONNECTION_KEY,
    )
    assert summary.succeeded == 2
    journal = list((output / "metadata" / "_journal").rglob("*.json"))
    assert sum(len(entry.read_bytes().splitlines()) for entry in journal) == 5  # rows, grouped into entries

    def check_no_secrets() -> int:
        files = all_files(tmp_path)
        for file in files:
            data = file.read_bytes()
            assert CONNECTION_KEY.encode() not in data and BYOK_KEY.encode() not in data, file
            assert b"byok_api_key" not in data or file.suffix == ".png", file
        return len(files)

    assert check_no_secrets() > 5
    monkeypatch.undo()
    finalize_output(str(output), prompts=path)  # folds the journal into a part, writes the dataset + summary
    assert check_no_secrets() > 5
    for params in history(output)["params"]:
        assert "byok" not in params and "api_key" not in params
    for text in [caplog.text, json.dumps(summary.to_dict())]:
        assert CONNECTION_KEY not in text and BYOK_KEY not in text


# -- progress and summary ----------------------------------------------------------------------------------

PROGRESS = re.compile(
    r"progress: (\d+)/(\d+) images \((\d+) succeeded, (\d+) failed, (\d+) already done\) \| "
    r"(\d+\.\d) images/min \| ETA (\S+) \| cost so far \$(\d+\.\d{4})"
)


async def test_progress_line_is_logged_at_the_interval(tmp_path, gateway_factory, caplog):
    gateway = gateway_factory(GatewayConfig(latency=(0.05, 0.05)))
    ids, texts = numbered(12)
    texts[0] = "forbidden-content"
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    caplog.set_level(logging.INFO, logger="imagegen_provider.progress")
    await run_batch(gateway, prompts=path, output=str(tmp_path / "out"), max_in_flight=2, progress_interval=0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "imagegen_provider.progress"]
    matches = [PROGRESS.fullmatch(line) for line in lines]
    assert all(matches), lines
    assert len(matches) >= 4  # periodic lines plus the final one
    assert any(0 < int(m.group(1)) < 12 for m in matches)  # a line mid-run
    last = matches[-1]
    assert last.group(1, 2, 3, 4, 5) == ("12", "12", "11", "1", "0")
    assert float(last.group(8)) == pytest.approx(11 * SMALL_PRICE, abs=1e-4)
    assert re.fullmatch(r"\d+m\d\ds|\d+h\d\dm|\?", last.group(7))


async def test_summary_reports_counts_cost_paths_and_duration(tmp_path, gateway):
    ids, texts = numbered(4)
    texts[3] = "forbidden-content"
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    summary = await run_batch(gateway, prompts=path, output=str(output), images_per_prompt=2, run_id="run-x")
    data = summary.to_dict()
    json.dumps(data)  # small and plain: fits XCom
    assert data["run_id"] == "run-x"
    assert (data["total_images"], data["succeeded"], data["failed"], data["skipped_existing"], data["not_attempted"]) == (
        8, 6, 2, 0, 0
    )
    assert data["cost_usd"] == pytest.approx(6 * SMALL_PRICE)
    assert data["output_uri"] == f"file://{output}"
    assert data["metadata_uri"] == f"file://{output}/metadata"
    assert data["duration_s"] > 0 and data["images_per_minute"] > 0
    assert data["failures_by_type"] == {"ContentPolicyError": 2}
    assert not summary.complete
    assert history(output)["run_id"].eq("run-x").all()


# -- one bad image never sinks the batch, and a paid image keeps its cost ----------------------------------


async def test_storage_failure_fails_that_row_and_keeps_its_cost(tmp_path, gateway):
    ids, texts = numbered(4)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    # A folder where p001's image must go: writing it fails (IsADirectoryError) after the image was paid for.
    blocked = output / "images" / "p001" / f"0-{derive_seed(0, 'p001', 0)}.png"
    blocked.mkdir(parents=True)
    summary = await run_batch(gateway, prompts=path, output=str(output))
    assert (summary.succeeded, summary.failed, summary.stopped_reason) == (3, 1, None)
    assert summary.cost_usd == pytest.approx(4 * SMALL_PRICE)  # the failed image was paid for too
    row = current(output).loc[("p001", 0)]
    assert row["status"] == "failed"
    assert row["error_type"] in ("IsADirectoryError", "OSError", "PermissionError")
    assert row["cost_usd"] == pytest.approx(SMALL_PRICE) and row["cost_source"] == "estimated"
    assert row["request_id"] and row["attempts"] == 1
    assert gateway.stats()["charged_images"] == 4

    # Storage fixed: the rerun regenerates only that image; finalize counts both payments.
    blocked.rmdir()
    summary = await run_batch(gateway, prompts=path, output=str(output))
    assert (summary.succeeded, summary.skipped_existing) == (1, 3)
    report = finalize_output(str(output), prompts=path)
    assert report.complete and report.succeeded == 4
    assert report.total_cost_usd == pytest.approx(5 * SMALL_PRICE)


# -- fatal errors stop dispatching at once -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["401", "402"])
async def test_fatal_error_stops_dispatch_and_keeps_what_was_done(tmp_path, gateway_factory, kind):
    max_in_flight = 4
    if kind == "401":
        gateway = gateway_factory(GatewayConfig(api_key=CONNECTION_KEY))
        client_key = "sk-wrong-key-0000000000000000"
        paid = 0
    else:
        # dall-e-2 at 256x256 costs $0.016 (prices.json): two images fit the balance, the third gets 402.
        gateway = gateway_factory(GatewayConfig(balance_usd=0.04, latency=(0.1, 0.1)))
        client_key = CONNECTION_KEY
        paid = 2
    ids, texts = numbered(24)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    summary = await run_batch(
        gateway, prompts=path, output=str(output), api_key=client_key, max_in_flight=max_in_flight, max_attempts=3
    )
    stats = gateway.stats()
    assert stats["generation_requests"] <= max_in_flight + 1
    assert stats["by_status"].get(kind, 0) >= 1
    assert summary.stopped_reason and summary.stopped_reason.startswith("fatal")
    assert f"HTTP {kind}" in summary.stopped_reason
    assert client_key not in summary.stopped_reason and CONNECTION_KEY not in summary.stopped_reason
    assert summary.succeeded == paid == stats["charged_images"]
    assert summary.not_attempted >= 24 - max_in_flight - 1
    assert summary.succeeded + summary.failed + summary.not_attempted == 24
    rows = history(output)
    assert len(rows) == summary.succeeded + summary.failed  # never-sent jobs leave no row
    done = rows[rows["status"] == "succeeded"]
    assert image_files(output) == sorted(done["file_name"])
    assert done["cost_usd"].notna().all()
    failed = rows[rows["status"] == "failed"]
    assert set(failed["http_status"]) == {int(kind)}
    assert set(failed["attempts"]) == {1}  # fatal errors are not retried


# -- object storage end to end -----------------------------------------------------------------------------


async def test_s3_prompts_and_output_with_resume(tmp_path, gateway, s3_server):
    import s3fs

    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    base = f"s3://{s3_server['bucket']}/run-{uuid.uuid4().hex}"
    ids, texts = numbered(5)
    fs.put_file(write_prompts(tmp_path / "p.parquet", texts, ids=ids), f"{base}/prompts.parquet")
    config = {
        "prompts": f"{base}/prompts.parquet", "output": f"{base}/out",
        "prompts_storage_options": options, "output_storage_options": options, "images_per_prompt": 2,
    }
    summary = await run_batch(gateway, **config)
    assert summary.succeeded == 10 and summary.output_uri == f"{base}/out"
    rows = current(f"{base}/out", options)
    assert len(rows) == 10
    for name in rows["file_name"]:
        assert fs.cat_file(f"{base}/out/{name}")[:8] == b"\x89PNG\r\n\x1a\n"
    frame = pd.read_parquet(f"{base}/out/metadata", storage_options=options)
    assert len(frame) == 10
    fs.invalidate_cache()
    assert fs.find(f"{base}/out/metadata/_journal") == []

    before = gateway.stats()["generation_requests"]
    summary = await run_batch(gateway, **config)
    assert (summary.succeeded, summary.skipped_existing) == (0, 10)
    assert gateway.stats()["generation_requests"] == before
    report = finalize_output(f"{base}/out", prompts=f"{base}/prompts.parquet", images_per_prompt=2,
                             output_storage_options=options, prompts_storage_options=options)
    assert report.complete and report.succeeded == 10
    assert fs.exists(f"{base}/out/metadata.parquet") and fs.exists(f"{base}/out/run_summary.json")

"""The batch runner end to end against the bundled gateway on a loopback socket: bad rows, metadata, secrets,
progress, summary, per-image failures and fatal errors."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import uuid

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagegen_gateway import GatewayConfig
from imagegen_provider.engine import COLUMNS, METADATA_SCHEMA, BatchRunner, RunConfig, finalize_output
from imagegen_provider.engine.keys import derive_seed
from imagegen_provider.engine.metadata import MetadataSink
from imagegen_provider.engine.runner import OutputWriteError
from imagegen_provider.transport.client import ImageGenClient

from ._support import (
    SMALL,
    SMALL_PRICE,
    all_files,
    current,
    history,
    image_files,
    make_client,
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
    types = dict(zip(relation.columns, map(str, relation.types), strict=True))
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
    counts = ("total_images", "succeeded", "failed", "skipped_existing", "not_attempted")
    assert tuple(data[name] for name in counts) == (
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


@pytest.fixture(autouse=True)
def _rescue_in_tmp(tmp_path, monkeypatch):
    """Rescue folders of these tests stay in their tmp folder, never in ~/.cache."""
    monkeypatch.setenv("IMAGEGEN_RESCUE_DIR", str(tmp_path / "rescue"))


async def test_storage_failure_stops_the_run_and_keeps_the_cost_of_the_paid_image(tmp_path, gateway):
    ids, texts = numbered(12)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    # A folder where p000's image must go: writing it fails (IsADirectoryError) after the image was paid for.
    blocked = output / "images" / "p000" / f"0-{derive_seed(0, 'p000', 0)}.png"
    blocked.mkdir(parents=True)
    with pytest.raises(OutputWriteError, match=r"refused a write \(image images/p000/.*IsADirectoryError") as raised:
        await run_batch(gateway, prompts=path, output=str(output), max_in_flight=1)
    summary = raised.value.summary
    assert summary.stopped_reason.startswith("storage:")
    # One slot: the job queued behind the failed one is dropped, never sent.
    assert (summary.succeeded, summary.failed, summary.not_attempted) == (0, 1, 11)
    assert summary.cost_usd == pytest.approx(SMALL_PRICE)  # the failed image was paid for
    assert gateway.stats()["charged_images"] == 1
    row = current(output).loc[("p000", 0)]
    assert row["status"] == "failed" and row["error_type"] == "IsADirectoryError"
    assert row["cost_usd"] == pytest.approx(SMALL_PRICE) and row["cost_source"] == "estimated"
    assert row["request_id"] and row["attempts"] == 1

    # The paid image was kept in the rescue folder: once storage is fixed, the rerun stores it first, then
    # generates only the rest. Nothing is paid twice, and its cost is counted once.
    assert "kept in" in str(raised.value) and "not paid again" in str(raised.value)
    blocked.rmdir()
    summary = await run_batch(gateway, prompts=path, output=str(output))
    assert (summary.succeeded, summary.skipped_existing) == (11, 1)
    assert current(output).loc[("p000", 0), "status"] == "succeeded"
    report = finalize_output(str(output), prompts=path)
    assert report.complete and report.succeeded == 12
    assert report.total_cost_usd == pytest.approx(12 * SMALL_PRICE)
    assert gateway.stats()["charged_images"] == 12


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


# -- every failure inside an image task is a row -----------------------------------------------------------


async def test_an_exception_in_a_stage_fails_its_row_with_the_cost_already_incurred(tmp_path, gateway, monkeypatch):
    ids, texts = numbered(4)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    original = BatchRunner._succeed

    def flaky_succeed(self, row, file_name, image):
        if row.prompt_id == "p001":
            raise RuntimeError("a bug in a stage")
        return original(self, row, file_name, image)

    monkeypatch.setattr(BatchRunner, "_succeed", flaky_succeed)
    summary = await run_batch(gateway, prompts=path, output=str(tmp_path / "out"))
    assert (summary.succeeded, summary.failed, summary.stopped_reason) == (3, 1, None)
    row = current(tmp_path / "out").loc[("p001", 0)]
    assert (row["status"], row["error_type"], row["attempts"]) == ("failed", "RuntimeError", 1)
    assert "a bug in a stage" in row["error_message"]
    assert row["cost_usd"] == pytest.approx(SMALL_PRICE)  # it was paid before the stage failed
    assert summary.cost_usd == pytest.approx(4 * SMALL_PRICE)


async def test_an_unexpected_client_exception_fails_only_its_row(tmp_path, gateway, monkeypatch):
    ids, texts = numbered(3)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    original = ImageGenClient.generate

    async def generate(self, request):
        if request.prompt == texts[1]:
            raise ValueError("unexpected")
        return await original(self, request)

    monkeypatch.setattr(ImageGenClient, "generate", generate)
    summary = await run_batch(gateway, prompts=path, output=str(tmp_path / "out"))
    assert (summary.succeeded, summary.failed) == (2, 1)
    row = current(tmp_path / "out").loc[("p001", 0)]
    assert (row["error_type"], row["error_message"], row["attempts"]) == ("ValueError", "ValueError: unexpected", 1)


# -- stopping on request -----------------------------------------------------------------------------------


async def test_request_stop_from_another_thread_cancels_in_flight_and_sends_nothing_new(tmp_path, gateway_factory):
    gateway = gateway_factory(GatewayConfig(latency=(3, 3)))
    ids, texts = numbered(10)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    config = RunConfig(prompts=path, output=str(output), request_defaults=SMALL, stop_grace_seconds=0)
    async with make_client(gateway, max_in_flight=2) as client:
        runner = BatchRunner(config, client=client)
        task = asyncio.create_task(runner.run())
        for _ in range(2000):
            if gateway.stats()["generation_requests"]:
                break
            await asyncio.sleep(0.01)
        sent = gateway.stats()["generation_requests"]
        assert sent >= 1
        stopper = threading.Thread(target=runner.request_stop, args=("operator on_kill",))
        stopper.start()
        summary = await asyncio.wait_for(task, 60)
        stopper.join()
    assert summary.stopped_reason == "stop requested: operator on_kill"
    assert gateway.stats()["generation_requests"] == sent
    rows = history(output)
    # Every request that had entered the client is on record as cancelled (one may not have reached the
    # gateway yet: its row still says it may have been charged, the safe assumption).
    assert sent <= len(rows) <= 2 and set(rows["error_type"]) == {"StopCancelled"}
    assert "may have charged it" in rows["error_message"].iloc[0]
    assert summary.not_attempted == 10 - len(rows)
    assert not (output / "metadata" / "_leases" / "all.json").exists()  # the lease was released


async def test_request_stop_before_the_run_sends_nothing(tmp_path, gateway):
    ids, texts = numbered(3)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    async with make_client(gateway) as client:
        config = RunConfig(prompts=path, output=str(tmp_path / "out"), request_defaults=SMALL)
        runner = BatchRunner(config, client=client)
        runner.request_stop("shutting down")
        summary = await runner.run()
    assert summary.stopped_reason == "stop requested: shutting down" and summary.not_attempted == 3
    assert gateway.stats()["generation_requests"] == 0


async def test_a_second_stop_request_cancels_at_once(tmp_path, gateway_factory):
    gateway = gateway_factory(GatewayConfig(latency=(3, 3)))
    ids, texts = numbered(4)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    config = RunConfig(prompts=path, output=str(tmp_path / "out"), request_defaults=SMALL, stop_grace_seconds=600)
    async with make_client(gateway, max_in_flight=1) as client:
        runner = BatchRunner(config, client=client)
        task = asyncio.create_task(runner.run())
        for _ in range(2000):
            if gateway.stats()["generation_requests"]:
                break
            await asyncio.sleep(0.01)
        runner.request_stop("first signal")  # grace: the request in flight may finish (600 s here)
        runner.request_stop("second signal")  # no more patience: cancel it
        summary = await asyncio.wait_for(task, 60)
    assert summary.stopped_reason == "stop requested: first signal"
    rows = history(tmp_path / "out")
    assert list(rows["error_type"]) == ["StopCancelled"] and gateway.stats()["generation_requests"] == 1


async def test_failed_and_discarded_paid_responses_are_all_costed(tmp_path, gateway, monkeypatch):
    from dataclasses import replace

    from imagegen_provider.transport.client import GenerationFailed
    from imagegen_provider.wire.errors import MalformedResponseError

    ids, texts = numbered(2)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    original = ImageGenClient.generate

    async def generate(self, request):
        generation = await original(self, request)
        if request.prompt == texts[0]:
            # Two paid responses thrown away (corrupt images), then this one: three payments.
            raise GenerationFailed(MalformedResponseError("not an image"), attempts=3, paid=(generation.result,) * 3)
        return replace(generation, attempts=2, discarded=(generation.result,))

    monkeypatch.setattr(ImageGenClient, "generate", generate)
    summary = await run_batch(gateway, prompts=path, output=str(tmp_path / "out"))
    rows = current(tmp_path / "out")
    failed, ok = rows.loc[("p000", 0)], rows.loc[("p001", 0)]
    assert (failed["status"], failed["error_type"], failed["attempts"]) == ("failed", "MalformedResponseError", 3)
    assert failed["cost_usd"] == pytest.approx(3 * SMALL_PRICE)
    assert (ok["status"], ok["attempts"]) == ("succeeded", 2)
    assert ok["cost_usd"] == pytest.approx(2 * SMALL_PRICE)  # the discarded response was paid too
    assert summary.cost_usd == pytest.approx(5 * SMALL_PRICE)

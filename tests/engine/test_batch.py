"""Batch API mode end to end against the bundled gateway on a loopback socket: the same images and metadata as
sync at half the cost, manifests that make reruns collect instead of paying twice, expiry and line failures
kept apart from what finished, budgets and dry runs at the batch price, and a killed CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from imagegen_gateway import GatewayConfig
from imagegen_provider.engine import BatchRunner, RunConfig, RunSummary
from imagegen_provider.engine.batch import BatchApiRunner, BatchOptions
from imagegen_provider.engine.batch_plan import COLLECTED, MANIFEST_DIR, BatchManifest, ManifestStore
from imagegen_provider.engine.report import build_cost_report
from imagegen_provider.transport.batch import BatchUnsupportedError

from ._support import current, image_files, make_client, numbered, write_prompts

REPO = Path(__file__).resolve().parents[2]
GPT = {"model": "gpt-image-1", "size": "1024x1024", "quality": "low"}
DALL_E_3 = {"model": "dall-e-3", "size": "1024x1024", "response_format": "b64_json"}
#: Columns allowed to differ between a sync and a batch run of the same table and seed (image_uri: the outputs differ).
RUN_SPECIFIC = {"image_uri", "run_id", "api", "batch_id", "request_id", "latency_ms", "started_at", "finished_at", "cost_usd",
                "cost_source"}


def _table(tmp_path: Path, n: int = 3) -> str:
    ids, prompts = numbered(n)
    return write_prompts(tmp_path / "prompts.parquet", prompts, ids=ids)


async def _run(gateway: Any, *, api: str, options: BatchOptions | None = None, dialect: str = "openai",
               **config: Any) -> RunSummary:
    config.setdefault("images_per_prompt", 2)
    config.setdefault("base_seed", 7)
    async with make_client(gateway, dialect=dialect, accepts_seed=True) as client:
        run_config = RunConfig(**config)
        if api == "sync":
            return await BatchRunner(run_config, client=client).run()
        opts = options or BatchOptions(poll_interval=0.05, timeout=60)
        return await BatchApiRunner(run_config, client=client, batch=opts).run()


def _manifests(output: Path) -> list[BatchManifest]:
    return [BatchManifest.from_json(p.read_bytes()) for p in sorted((output / MANIFEST_DIR).glob("*.json"))]


@pytest.mark.parametrize("request_defaults", [GPT, DALL_E_3], ids=["gpt-image-1", "dall-e-3"])
async def test_batch_gives_the_sync_images_and_metadata_at_half_the_cost(tmp_path, gateway, request_defaults):
    prompts = _table(tmp_path)
    sync_out, batch_out = tmp_path / "sync", tmp_path / "batch"
    sync = await _run(gateway, api="sync", prompts=prompts, output=str(sync_out), request_defaults=request_defaults)
    batch = await _run(gateway, api="batch", prompts=prompts, output=str(batch_out), request_defaults=request_defaults)
    assert sync.succeeded == batch.succeeded == 6 and batch.failed == 0
    assert image_files(sync_out) == image_files(batch_out)
    for name in image_files(sync_out):
        assert (sync_out / name).read_bytes() == (batch_out / name).read_bytes(), name
    a, b = current(sync_out), current(batch_out)
    assert set(a["api"]) == {"sync"} and set(b["api"]) == {"batch"} and a["batch_id"].isna().all()
    assert b["batch_id"].notna().all() and b["latency_ms"].isna().all()
    same = [c for c in a.columns if c not in RUN_SPECIFIC]
    pd.testing.assert_frame_equal(a[same].reset_index(drop=True), b[same].reset_index(drop=True))
    for sync_cost, batch_cost in zip(a["cost_usd"], b["cost_usd"], strict=True):
        assert batch_cost == sync_cost * 0.5 and sync_cost > 0
    assert batch.cost_usd == pytest.approx(sync.cost_usd / 2)
    assert set(b["cost_source"]) == {"estimated_batch"} and set(a["cost_source"]) == {"estimated"}
    report = build_cost_report([str(sync_out), str(batch_out)]).set_index("api")
    assert report.loc["batch", "cost_usd"] == pytest.approx(report.loc["sync", "cost_usd"] / 2)
    assert report.loc["batch", "images_succeeded"] == report.loc["sync", "images_succeeded"] == 6
    stats = gateway.stats()
    assert stats["batches_created"] == 1 and stats["batch_lines"] == 6 and stats["batch_lines_charged_twice"] == 0


async def test_no_wait_then_reruns_reattach_and_never_submit_twice(tmp_path, gateway_factory):
    gateway = gateway_factory(GatewayConfig(batch_delay=1.5))
    prompts, output = _table(tmp_path, 4), tmp_path / "out"
    config = {"prompts": prompts, "output": str(output), "request_defaults": GPT}
    no_wait = BatchOptions(wait=False)
    first = await _run(gateway, api="batch", options=no_wait, **config)
    assert first.succeeded == 0 and first.not_attempted == 8 and "rerun" in (first.stopped_reason or "")
    [manifest] = _manifests(output)
    assert manifest.batch_id and manifest.state in ("validating", "in_progress") and len(manifest.images) == 8
    second = await _run(gateway, api="batch", options=no_wait, **config)  # still in progress: nothing new
    assert second.succeeded == 0 and gateway.stats()["batches_created"] == 1
    third = await _run(gateway, api="batch", **config)
    assert third.succeeded == 8 and third.not_attempted == 0
    assert [m.state for m in _manifests(output)] == [COLLECTED]
    fourth = await _run(gateway, api="batch", **config)
    assert fourth.skipped_existing == 8 and fourth.succeeded == 0
    stats = gateway.stats()
    assert (stats["batches_created"], stats["batch_lines"], stats["batch_lines_resubmitted"]) == (1, 8, 0)


async def test_expired_and_failed_lines_keep_what_finished_and_the_rest_is_resubmitted(tmp_path, gateway_factory):
    gateway = gateway_factory(GatewayConfig(batch_expire_after_lines=5, batch_line_failure_rate=0.3, fault_seed=3))
    prompts, output = _table(tmp_path, 4), tmp_path / "out"
    config = {"prompts": prompts, "output": str(output), "request_defaults": GPT}
    first = await _run(gateway, api="batch", **config)
    rows = current(output)
    stored = set(rows.index[rows["status"] == "succeeded"])
    failed = rows[rows["status"] == "failed"]
    assert first.succeeded == len(stored) > 0 and first.failed == len(failed) > 0
    assert set(failed["http_status"]) == {500} and set(failed["error_type"]) == {"ServerError"}
    assert len(stored) + len(failed) == 5 and first.not_attempted == 3  # 3 lines expired: no row, no charge
    for _ in range(6):  # each rerun submits only what is not stored yet
        summary = await _run(gateway, api="batch", **config)
        if summary.succeeded + summary.skipped_existing == 8:
            break
    rows = current(output)
    assert (rows["status"] == "succeeded").all() and len(rows) == 8
    assert gateway.stats()["batch_lines_charged_twice"] == 0  # nothing stored was ever submitted again
    assert gateway.stats()["charged_images"] == 8


async def test_dry_run_and_budget_use_the_batch_price_before_uploading(tmp_path, gateway):
    prompts = _table(tmp_path, 4)
    config = {"prompts": prompts, "request_defaults": GPT}
    sync_estimate = await _run(gateway, api="sync", output=str(tmp_path / "a"), dry_run=True, **config)
    batch_estimate = await _run(gateway, api="batch", output=str(tmp_path / "b"), dry_run=True, **config)
    assert batch_estimate.estimated_cost_usd == pytest.approx(sync_estimate.estimated_cost_usd / 2)
    per_image = batch_estimate.estimated_cost_usd / 8
    capped = await _run(gateway, api="batch", output=str(tmp_path / "c"), max_cost_usd=per_image * 3.5, **config)
    assert capped.succeeded == 3 and "max_cost_usd" in (capped.stopped_reason or "")
    assert gateway.stats()["batch_lines"] == 3
    nothing = await _run(gateway, api="batch", output=str(tmp_path / "d"), max_cost_usd=per_image / 2, **config)
    assert nothing.succeeded == 0 and gateway.stats()["uploaded_files"] == 2  # c's input + its output only


async def test_dialects_without_batch_are_refused_before_sending(tmp_path, gateway):
    with pytest.raises(BatchUnsupportedError, match="indoxhub dialect has no batch API"):
        await _run(gateway, api="batch", dialect="indoxhub", prompts=_table(tmp_path), output=str(tmp_path / "o"),
                   request_defaults={"model": "openai/dall-e-3"})
    assert gateway.stats()["total_requests"] == 0


async def test_invalid_rows_fail_without_a_request_and_the_rest_is_submitted(tmp_path, gateway):
    prompts = write_prompts(tmp_path / "p.parquet", ["fine", None, "x" * 5000], ids=["a", "b", "c"])
    summary = await _run(gateway, api="batch", prompts=prompts, output=str(tmp_path / "o"), images_per_prompt=1,
                         request_defaults=DALL_E_3)
    assert (summary.succeeded, summary.failed) == (1, 2)
    rows = current(tmp_path / "o")
    assert list(rows.loc[rows["status"] == "failed", "error_type"]) == ["InvalidRow", "InvalidRow"]
    assert gateway.stats()["batch_lines"] == 1


async def test_a_crash_between_creation_and_manifest_is_resolved_by_the_submission_token(
    tmp_path, gateway, monkeypatch
):
    prompts, output = _table(tmp_path, 2), tmp_path / "out"
    config = {"prompts": prompts, "output": str(output), "request_defaults": GPT}
    real_save = ManifestStore.save

    def crash_once_named(self: ManifestStore, manifest: BatchManifest) -> None:
        if manifest.batch_id is not None:
            raise KeyboardInterrupt("killed right after the batch was created")
        real_save(self, manifest)

    monkeypatch.setattr(ManifestStore, "save", crash_once_named)
    with pytest.raises(KeyboardInterrupt):
        await _run(gateway, api="batch", **config)
    monkeypatch.setattr(ManifestStore, "save", real_save)
    assert [m.batch_id for m in _manifests(output)] == [None]  # only the pending manifest made it
    summary = await _run(gateway, api="batch", **config)
    assert summary.succeeded == 4
    assert gateway.stats()["batches_created"] == 1 and gateway.stats()["batch_lines_charged_twice"] == 0


async def test_stop_with_cancel_cancels_and_the_next_run_resubmits(tmp_path, gateway_factory):
    gateway = gateway_factory(GatewayConfig(batch_delay=30))
    prompts, output = _table(tmp_path, 2), tmp_path / "out"
    async with make_client(gateway, accepts_seed=True) as client:
        runner = BatchApiRunner(RunConfig(prompts=prompts, output=str(output), request_defaults=GPT,
                                          images_per_prompt=2),
                                client=client, batch=BatchOptions(poll_interval=0.05, cancel_on_stop=True))
        task = asyncio.create_task(runner.run())
        async with asyncio.timeout(30):
            while True:  # until the batch exists at the gateway
                if gateway.stats()["batches_created"]:
                    break
                await asyncio.sleep(0.05)
        runner.request_stop("test")
        summary = await task
    assert summary.succeeded == 0 and "stop requested" in (summary.stopped_reason or "")
    assert [m.state for m in _manifests(output)] in (["cancelling"], ["cancelled"])
    gateway.app.state.gateway.config = GatewayConfig()  # no more delay for the next batch
    again = await _run(gateway, api="batch", prompts=prompts, output=str(output), request_defaults=GPT)
    assert again.succeeded == 4 and gateway.stats()["charged_images"] == 4


@pytest.mark.e2e
def test_killed_cli_rerun_collects_without_paying_twice(tmp_path, gateway_factory):
    gateway = gateway_factory(GatewayConfig(batch_delay=4))
    prompts, output = _table(tmp_path, 3), tmp_path / "out"
    argv = [sys.executable, "-m", "imagegen_provider.cli", "run", prompts, str(output), "--base-url", gateway.url("/v1"),
            "--api-key", "sk-cli", "--model", "gpt-image-1", "--size", "1024x1024", "--quality", "low",
            "--images-per-prompt", "2", "--seed", "5", "--api", "batch", "--poll-interval", "0.1", "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list((output / MANIFEST_DIR).glob("batch_*.json")):
        assert time.monotonic() < deadline and first.poll() is None, first.stderr.read() if first.stderr else ""
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert gateway.stats()["batches_created"] == 1 and not image_files(output)
    second = subprocess.run(argv, env=env, capture_output=True, timeout=120)
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    run = json.loads(second.stdout)["run"]
    assert run["succeeded"] == 6
    stats = gateway.stats()
    assert (stats["batches_created"], stats["batch_lines"], stats["batch_lines_resubmitted"]) == (1, 6, 0)
    assert len(image_files(output)) == 6


async def test_input_files_are_cut_under_max_requests_and_max_bytes(tmp_path, gateway):
    prompts, output = _table(tmp_path, 4), tmp_path / "out"
    summary = await _run(gateway, api="batch", prompts=prompts, output=str(output), request_defaults=GPT,
                         options=BatchOptions(poll_interval=0.05, max_requests=3))
    assert summary.succeeded == 8 and sorted(len(m.images) for m in _manifests(output)) == [2, 3, 3]
    by_bytes = tmp_path / "by-bytes"
    summary = await _run(gateway, api="batch", prompts=prompts, output=str(by_bytes), request_defaults=GPT,
                         options=BatchOptions(poll_interval=0.05, max_bytes=1024))
    assert summary.succeeded == 8
    uploads = gateway.app.state.gateway.uploads
    sizes = [uploads.get(m.input_file_id).size for m in _manifests(by_bytes)]
    assert len(sizes) > 1 and max(sizes) <= 1024 and sum(len(m.images) for m in _manifests(by_bytes)) == 8


async def test_shards_of_one_output_keep_their_own_batches(tmp_path, gateway):
    prompts, output = _table(tmp_path, 4), tmp_path / "out"
    first = await _run(gateway, api="batch", prompts=prompts, output=str(output), request_defaults=GPT,
                       row_start=0, row_stop=2)
    second = await _run(gateway, api="batch", prompts=prompts, output=str(output), request_defaults=GPT,
                        row_start=2, row_stop=4)
    assert (first.succeeded, second.succeeded, second.skipped_existing) == (4, 4, 0)
    assert {m.shard for m in _manifests(output)} == {first.shard, second.shard}
    again = await _run(gateway, api="batch", prompts=prompts, output=str(output), request_defaults=GPT,
                       row_start=0, row_stop=2)
    assert (again.succeeded, again.skipped_existing) == (0, 4)
    assert gateway.stats()["batch_lines"] == 8


def _damage_first_line(gateway: Any, output_file_id: str) -> str:
    """Replace the first image of a batch's output file by a truncated PNG (valid base64, broken image)."""
    stored = gateway.app.state.gateway.uploads.get(output_file_id)
    lines = stored.path.read_bytes().splitlines()
    first = json.loads(lines[0])
    item = first["response"]["body"]["data"][0]
    item["b64_json"] = item["b64_json"][:200]
    lines[0] = json.dumps(first).encode()
    stored.path.write_bytes(b"\n".join(lines) + b"\n")
    stored.size = stored.path.stat().st_size
    return str(first["custom_id"])


async def test_a_broken_image_in_the_output_is_a_paid_failure_and_never_stored(tmp_path, gateway):
    prompts, output = _table(tmp_path, 2), tmp_path / "out"
    small = {"model": "dall-e-2", "size": "256x256", "response_format": "b64_json"}
    config = {"prompts": prompts, "output": str(output), "request_defaults": small}
    await _run(gateway, api="batch", options=BatchOptions(wait=False), **config)
    [batch] = gateway.app.state.batches.batches.values()
    async with asyncio.timeout(30):
        while True:
            if batch.status.value == "completed":
                break
            await asyncio.sleep(0.05)
    broken = _damage_first_line(gateway, batch.output_file_id)
    summary = await _run(gateway, api="batch", options=BatchOptions(wait=False), **config)
    assert (summary.succeeded, summary.failed) == (3, 1)
    rows = current(output)
    failed = rows[rows["status"] == "failed"].iloc[0]
    prompt_id = broken.split(":", 2)[2]
    assert (failed["prompt_id"], failed["error_type"]) == (prompt_id, "MalformedResponseError")
    assert failed["cost_usd"] == pytest.approx(0.016 * 0.5)  # charged by the gateway, so on record
    assert not any(name.startswith(f"images/{prompt_id}/{failed['image_index']}-") for name in image_files(output))
    again = await _run(gateway, api="batch", **config)  # the next run asks for that one image again
    assert again.succeeded == 1 and gateway.stats()["batch_lines"] == 5


async def test_the_key_is_in_no_manifest_row_or_log(tmp_path, gateway_factory, caplog):
    key = "sk-batch-SECRET-4f1e9a0b7c"
    gateway = gateway_factory(GatewayConfig(batch_line_failure_rate=0.5, fault_seed=1))
    prompts, output = _table(tmp_path, 3), tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        async with make_client(gateway, api_key=key, accepts_seed=True) as client:
            config = RunConfig(prompts=prompts, output=str(output), request_defaults=GPT, images_per_prompt=2)
            summary = await BatchApiRunner(config, client=client, batch=BatchOptions(poll_interval=0.05)).run()
    assert summary.failed > 0  # error lines were recorded too
    written = b"".join(p.read_bytes() for p in output.rglob("*") if p.is_file())
    assert key.encode() not in written and key not in caplog.text
    assert key not in json.dumps(summary.to_dict())

"""Killing one shard's process mid-run and letting its retry resume loses nothing and pays nothing twice.

The scheduler-free version of a task retry: ``imagegen run PROMPTS OUT --rows 0:30 --no-finalize`` (one
shard) against the gateway subprocess on loopback, SIGKILLed once a few images are stored, then the same
command again (the retry), then finalize. The gateway counts every image it charged, so:

* what the killed run paid for but did not make durable (an image stored and recorded as succeeded) is
  exactly what was in flight when it died: at most ``--max-in-flight`` requests on the wire plus the
  responses still being stored;
* the retry pays exactly for the images not yet durable: ``charged - stored == in flight at kill``, i.e. no
  stored image was paid twice;
* every stored image has exactly one current succeeded row, with its cost; no image has two succeeded rows
  in the history.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from imagegen_provider.engine.finalize import finalize_output
from imagegen_provider.engine.metadata import current_rows, read_metadata
from imagegen_provider.engine.storage import StorageLocation
from tests.scale._support import PYTHON, REPO, child_env, gateway_process, stop_group

PROMPTS = REPO / "sample_data" / "prompts.parquet"
ROWS = 30
MAX_IN_FLIGHT = 4


def _shard(output, base_url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            PYTHON, "-m", "imagegen_provider.cli", "run", str(PROMPTS), str(output), "--rows", f"0:{ROWS}",
            "--no-finalize", "--base-url", base_url, "--api-key", "k", "--max-in-flight", str(MAX_IN_FLIGHT),
            "--model", "gpt-image-1", "--quality", "low", "--size", "1024x1024", "--seed", "2026",
            "--progress-interval", "1", "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=REPO,
        start_new_session=True,
    )


def _stored(output) -> set[str]:
    images = output / "images"
    return {str(p.relative_to(output)) for p in images.rglob("*.png")} if images.exists() else set()


def _durable(output) -> set[tuple[str, int]]:
    """Images a rerun skips: a succeeded row on record (parts or journal) and the file present."""
    location = StorageLocation.from_url(str(output))
    current = current_rows(read_metadata(location))
    if current.empty:
        return set()
    stored = _stored(output)
    return {
        (pid, int(idx))
        for pid, idx, status, name in zip(current["prompt_id"], current["image_index"], current["status"],
                                          current["file_name"], strict=True)
        if status == "succeeded" and name in stored
    }


@pytest.mark.e2e
def test_killed_shard_retry_pays_nothing_twice(tmp_path, record_property):
    output = tmp_path / "out"
    with gateway_process("--latency", "0.4-0.8", "--fault-seed", "3") as gateway:
        first = _shard(output, gateway.api_base)
        deadline = time.monotonic() + 60
        try:
            while len(_stored(output)) < 8:
                assert first.poll() is None, f"shard ended before it could be killed:\n{first.stderr.read()}"
                assert time.monotonic() < deadline, "no images after 60 s"
                time.sleep(0.02)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
        finally:
            stop_group(first, signal.SIGKILL)
        assert first.returncode == -signal.SIGKILL
        time.sleep(1.0)  # requests the gateway had admitted finish (and were charged) on its side
        killed = gateway.stats()
        durable = _durable(output)
        stored_at_kill = len(_stored(output))
        in_flight_at_kill = killed["charged_images"] - len(durable)
        assert 0 < len(durable) < ROWS
        assert 0 <= in_flight_at_kill <= 2 * MAX_IN_FLIGHT, (killed["charged_images"], len(durable))

        retry = _shard(output, gateway.api_base)
        out, err = retry.communicate(timeout=120)
        assert retry.returncode == 0, err[-3000:]
        summary = json.loads(out)["run"]
        final = gateway.stats()

    report = finalize_output(str(output))
    figures = {
        "charged_at_kill": killed["charged_images"],
        "durable_at_kill": len(durable),
        "files_at_kill": stored_at_kill,
        "in_flight_at_kill": in_flight_at_kill,
        "retry_skipped": summary["skipped_existing"],
        "retry_succeeded": summary["succeeded"],
        "charged_total": final["charged_images"],
        "images_final": report.succeeded,
    }
    record_property("figures", figures)
    print("shard retry:", json.dumps(figures))

    # The retry skipped exactly the durable images and paid for the rest once.
    assert summary["skipped_existing"] == len(durable)
    assert summary["succeeded"] == ROWS - len(durable)
    assert summary["failed"] == 0 and summary["not_attempted"] == 0
    assert final["charged_images"] - killed["charged_images"] == ROWS - len(durable)
    assert final["charged_images"] - report.succeeded == in_flight_at_kill <= 2 * MAX_IN_FLIGHT
    assert final["by_status"] == {"200": final["generation_requests"]}

    # Nothing lost: one current succeeded row with a cost per stored image, and one image per prompt.
    assert report.succeeded == ROWS and report.failed == 0
    table = pq.read_table(output / "metadata.parquet").to_pandas()
    assert len(table) == ROWS
    assert table["prompt_id"].is_unique
    assert set(table["prompt_id"]) == set(pq.read_table(PROMPTS).column("id").to_pylist()[:ROWS])
    assert (table["status"] == "succeeded").all()
    assert table["cost_usd"].notna().all() and (table["cost_usd"] > 0).all()
    assert set(table["file_name"]) == _stored(output)
    history = read_metadata(StorageLocation.from_url(str(output))).to_pandas()
    succeeded = history[history["status"] == "succeeded"].drop_duplicates(
        ["run_id", "prompt_id", "image_index", "finished_at"]
    )
    assert succeeded.groupby(["prompt_id", "image_index"]).size().max() == 1
    assert round(report.total_cost_usd, 6) == round(table["cost_usd"].sum(), 6)

"""Airflow kills a running generation task (SIGTERM, as when a user marks it failed or it times out): the
operator's ``on_kill`` stops the batch — no request starts after the signal — and the output stays
resumable: a rerun generates only the images that were not stored."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from imagegen_gateway import GatewayConfig
from imagegen_provider.engine.metadata import read_metadata
from imagegen_provider.engine.storage import StorageLocation
from imagegen_provider.operators.image_generation import ImageGenerationOperator

from .conftest import FAST_REQUEST, SECRET, make_context, write_prompts

DAG_ID = "imagegen_test_on_kill"
PROMPTS = 30

DAG_FILE = '''
import pendulum
from airflow.sdk import DAG

from imagegen_provider.operators.image_generation import ImageGenerationOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    ImageGenerationOperator(
        task_id="generate", prompts_path={prompts!r}, output_path={output!r}, imagegen_conn_id="imagegen_kill",
        model="dall-e-2", size="256x256", response_format="b64_json", progress_interval=60.0,
        metadata_asset=False,
    )
'''


def _airflow() -> str:
    return shutil.which("airflow", path=os.path.dirname(sys.executable)) or "airflow"


def _wait_for(predicate, *, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def _quiet(gateway, seconds: float):
    """A predicate: no request has arrived at ``gateway`` for ``seconds``."""
    seen = {"count": -1, "since": 0.0}

    def predicate() -> bool:
        count = gateway.stats()["generation_requests"]
        if count != seen["count"]:
            seen.update(count=count, since=time.monotonic())
        return time.monotonic() - seen["since"] >= seconds

    return predicate


@pytest.mark.e2e
def test_sigterm_stops_the_batch_and_leaves_it_resumable(airflow_db, gateway_factory, tmp_path):
    # Two requests at a time, 1.5 s each: after the first pair arrives the next is over a second away.
    slow = gateway_factory(GatewayConfig(latency=(1.5, 1.5)))
    prompts = write_prompts(tmp_path / "prompts.parquet", [f"a slow harbour, take {i}" for i in range(PROMPTS)])
    output = tmp_path / "out"
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / f"{DAG_ID}.py").write_text(
        textwrap.dedent(DAG_FILE).format(dag_id=DAG_ID, prompts=str(prompts), output=str(output))
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env.update(
        AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST=json.dumps([
            {"name": "imagegen-kill-test", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {"path": str(dags)}},
            {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {}},
        ]),
        AIRFLOW_CONN_IMAGEGEN_KILL=json.dumps({
            "conn_type": "imagegen", "host": "127.0.0.1", "port": slow.port, "password": SECRET,
            "extra": {"max_in_flight": 2, "max_attempts": 1},
        }),
        PYTHONWARNINGS="ignore",
    )
    subprocess.run([_airflow(), "dags", "reserialize"], env=env, check=True, capture_output=True, timeout=240)
    task = subprocess.Popen(
        [_airflow(), "tasks", "test", DAG_ID, "generate"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_for(lambda: slow.stats()["generation_requests"] >= 2, seconds=180, what="the first requests")
        # The first request goes alone (the pacer's cold-start probe) and the next ones follow together when it
        # answers: signal in the quiet second after a burst, not between two requests of the same burst.
        _wait_for(_quiet(slow, 0.3), seconds=30, what="a quiet moment between requests")
        sent_at_signal = slow.stats()["generation_requests"]
        task.send_signal(signal.SIGTERM)
        log, _ = task.communicate(timeout=120)
    finally:
        if task.poll() is None:
            task.kill()
            task.wait()
    sent = slow.stats()["generation_requests"]
    assert sent == sent_at_signal, f"{sent - sent_at_signal} requests started after SIGTERM\n{log[-3000:]}"
    assert sent < PROMPTS
    assert "on_kill: stopping the batch" in log, log[-3000:]
    # Airflow 3.0's in-process runner echoes its own "mask this" requests (MaskSecret(value=...)) at debug level.
    assert SECRET not in "\n".join(line for line in log.splitlines() if "MaskSecret" not in line)

    # Every stored image has its metadata row (journal or part) and every succeeded row its image.
    rows = read_metadata(StorageLocation.from_url(str(output))).to_pandas()
    stored = {p.relative_to(output).as_posix() for p in (output / "images").rglob("*") if p.is_file()}
    succeeded = rows[rows.status == "succeeded"]
    assert set(succeeded.file_name) == stored
    assert not (output / "metadata.parquet").exists()  # a killed batch is not a finished dataset

    # The rerun asks only for what is missing.
    healthy = gateway_factory()
    rerun_conn = "imagegen_kill_rerun"
    os.environ[f"AIRFLOW_CONN_{rerun_conn.upper()}"] = json.dumps(
        {"conn_type": "imagegen", "host": "127.0.0.1", "port": healthy.port, "password": SECRET}
    )
    try:
        op = ImageGenerationOperator(
            task_id="generate", prompts_path=str(prompts), output_path=str(output), imagegen_conn_id=rerun_conn,
            progress_interval=60.0, **FAST_REQUEST,
        )
        result = op.execute(make_context())
    finally:
        del os.environ[f"AIRFLOW_CONN_{rerun_conn.upper()}"]
    assert healthy.stats()["generation_requests"] == PROMPTS - len(stored)
    assert result["dataset"]["complete"] is True
    assert len(pd.read_parquet(output / "metadata.parquet")) == PROMPTS

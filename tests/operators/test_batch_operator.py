"""ImageGenerationOperator(api="batch"): waits on the worker when it cannot defer, defers to the trigger and
collects in execute_complete when it can, and cancels its batches when killed."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pandas as pd
import pytest

from imagegen_gateway import GatewayConfig
from imagegen_provider.operators.image_generation import ImageGenerationOperator
from imagegen_provider.triggers.batch import BatchCompletionTrigger

from .conftest import make_context

try:
    from airflow.sdk.exceptions import AirflowException, TaskDeferred
except ImportError:  # Airflow 3.0
    from airflow.exceptions import AirflowException, TaskDeferred  # type: ignore[no-redef,attr-defined,unused-ignore]

GPT = {"model": "gpt-image-1", "size": "1024x1024", "quality": "low"}


def _operator(conn_id: str, prompts: Any, output: Any, **kwargs: Any) -> ImageGenerationOperator:
    return ImageGenerationOperator(task_id="generate_batch", prompts_path=str(prompts), output_path=str(output),
                                   imagegen_conn_id=conn_id, api="batch", images_per_prompt=2, seed=3,
                                   batch_poll_interval=0.05, progress_interval=60.0, **GPT, **kwargs)


def _rows(output: Any) -> pd.DataFrame:
    return pd.read_parquet(f"{output}/metadata.parquet")


def test_without_a_triggerer_to_poll_it_waits_on_the_worker(prompts_file, tmp_path, make_conn):
    # Host "local": the in-process gateway has no process a triggerer could poll.
    output = tmp_path / "out"
    op = _operator(make_conn(), prompts_file, output)
    result = op.execute(make_context())
    assert result["run"]["succeeded"] == 12 and result["run"]["pending_batches"] == []
    rows = _rows(output)
    assert set(rows["api"]) == {"batch"} and rows["batch_id"].notna().all()
    assert set(rows["cost_source"]) == {"simulated"}


async def _event(trigger: BatchCompletionTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return dict(event.payload)
    raise AssertionError("no event")


def test_defers_to_the_trigger_and_collects_on_completion(prompts_file, tmp_path, gateway_factory, loopback_conn):
    gateway = gateway_factory(GatewayConfig(batch_delay=0.5))
    output = tmp_path / "out"
    op = _operator(loopback_conn(gateway, accepts_seed=True), prompts_file, output)
    context = make_context()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    trigger, method = deferred.value.trigger, deferred.value.method_name
    assert isinstance(trigger, BatchCompletionTrigger) and method == "execute_complete"
    assert len(trigger.batch_ids) == 1 and gateway.stats()["images_generated"] == 0  # nothing done yet
    event = asyncio.run(_event(trigger))
    assert event["status"] == "ended"
    result = op.execute_complete(context, event)
    assert result["run"]["succeeded"] == 12 and result["dataset"]["complete"] is True
    stats = gateway.stats()
    assert (stats["batches_created"], stats["batch_lines"], stats["batch_lines_charged_twice"]) == (1, 12, 0)
    assert set(_rows(output)["batch_id"]) == set(trigger.batch_ids)


def test_a_timed_out_trigger_fails_the_task_and_the_retry_collects(prompts_file, tmp_path, gateway_factory,
                                                                     loopback_conn):
    gateway = gateway_factory(GatewayConfig(batch_delay=1.0))
    output = tmp_path / "out"
    conn_id = loopback_conn(gateway, accepts_seed=True)
    op = _operator(conn_id, prompts_file, output)
    with pytest.raises(TaskDeferred):
        op.execute(make_context())
    with pytest.raises(AirflowException, match="rerun collects"):
        op.execute_complete(make_context(), {"status": "timeout", "batches": {}, "message": "still running"})
    time.sleep(1.5)
    retry = _operator(conn_id, prompts_file, output, deferrable=False)
    assert retry.execute(make_context())["run"]["succeeded"] == 12
    assert gateway.stats()["batches_created"] == 1


def test_on_kill_cancels_the_batches(prompts_file, tmp_path, gateway_factory, loopback_conn):
    gateway = gateway_factory(GatewayConfig(batch_delay=60))
    conn_id = loopback_conn(gateway, accepts_seed=True)
    op = _operator(conn_id, prompts_file, tmp_path / "out", deferrable=False)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            op.execute(make_context())
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 30
    while gateway.stats()["batches_created"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    op.on_kill()
    worker.join(30)
    assert not worker.is_alive() and failure and isinstance(failure[0], AirflowException)
    batches = gateway.app.state.batches.batches
    assert [b.status.value for b in batches.values()] in (["cancelling"], ["cancelled"])
    assert gateway.stats()["charged_images"] == 0
    # The task retry: the cancelled batch's images are submitted again, once, and all collected.
    gateway.app.state.gateway.config = GatewayConfig()
    retry = _operator(conn_id, prompts_file, tmp_path / "out", deferrable=False)
    assert retry.execute(make_context())["run"]["succeeded"] == 12
    stats = gateway.stats()
    assert (stats["batches_created"], stats["charged_images"], stats["batch_lines_charged_twice"]) == (2, 12, 0)


def test_batch_arguments_are_checked_when_the_dag_is_parsed(prompts_file, tmp_path):
    with pytest.raises(ValueError, match="api must be one of sync, batch"):
        ImageGenerationOperator(task_id="t", prompts_path=str(prompts_file), output_path=str(tmp_path), api="bulk")
    with pytest.raises(ValueError, match="poll_interval and timeout must be positive"):
        ImageGenerationOperator(task_id="t", prompts_path=str(prompts_file), output_path=str(tmp_path), api="batch",
                                batch_poll_interval=0)
    op = ImageGenerationOperator(task_id="t", prompts_path=str(prompts_file), output_path=str(tmp_path), api="batch",
                                 deferrable=False, batch_max_requests=10, cancel_batches_on_kill=False)
    settings = op.batch_settings
    assert (settings.batch, settings.deferrable, settings.max_requests, settings.cancel_on_kill) == (True, False, 10,
                                                                                                      False)


def test_waiting_past_batch_timeout_fails_the_task_and_its_retry_collects(prompts_file, tmp_path, gateway_factory,
                                                                          loopback_conn):
    gateway = gateway_factory(GatewayConfig(batch_delay=2.0))
    conn_id = loopback_conn(gateway, accepts_seed=True)
    op = _operator(conn_id, prompts_file, tmp_path / "out", deferrable=False, batch_timeout=0.3)
    with pytest.raises(AirflowException, match="task retry collects them"):
        op.execute(make_context())
    assert not (tmp_path / "out" / "metadata.parquet").exists()  # no dataset table for an unfinished run
    time.sleep(2.5)
    retry = _operator(conn_id, prompts_file, tmp_path / "out", deferrable=False)
    assert retry.execute(make_context())["run"]["succeeded"] == 12
    assert gateway.stats()["batches_created"] == 1

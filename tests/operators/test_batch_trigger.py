"""BatchCompletionTrigger against the bundled gateway on a loopback socket, its connection from env JSON: it
fires once every batch ended, fires ``timeout`` when they do not, survives serialization, and cancels the
batches when the deferred task is killed."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from imagegen_gateway import GatewayConfig
from imagegen_provider.transport.batch import ENDPOINT, BatchClient
from imagegen_provider.transport.client import ImageGenClient
from imagegen_provider.triggers.batch import BatchCompletionTrigger

from .conftest import SECRET


async def _submit(handle: Any, count: int) -> str:
    lines = b"".join(
        json.dumps({"custom_id": f"c{i}", "method": "POST", "url": ENDPOINT,
                    "body": {"model": "dall-e-2", "prompt": f"p{i}", "size": "256x256", "seed": i,
                             "response_format": "b64_json"}}).encode() + b"\n"
        for i in range(count)
    )
    async with ImageGenClient(base_url=handle.url("/v1"), api_key=SECRET) as client:
        batches = BatchClient(client)
        file_id = await batches.upload(io.BytesIO(lines), filename="in.jsonl")
        return (await batches.create(input_file_id=file_id, metadata={}, submission="t")).id


async def _first_event(trigger: BatchCompletionTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return dict(event.payload)
    raise AssertionError("the trigger ended without an event")


async def test_fires_when_every_batch_ended_and_logs_progress(gateway_factory: Any, loopback_conn: Any,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    handle = gateway_factory(GatewayConfig(batch_delay=0.3))
    conn_id = loopback_conn(handle)
    ids = [await _submit(handle, 2), await _submit(handle, 1)]
    trigger = BatchCompletionTrigger(imagegen_conn_id=conn_id, batch_ids=ids, poll_interval=0.1, timeout=30)
    classpath, kwargs = trigger.serialize()
    revived = BatchCompletionTrigger(**kwargs)
    assert classpath == "imagegen_provider.triggers.batch.BatchCompletionTrigger" and revived.serialize() == (
        classpath, kwargs)
    event = await _first_event(revived)
    assert event == {"status": "ended", "batches": {ids[0]: "completed", ids[1]: "completed"}}
    logged = capsys.readouterr().out  # the trigger logs through Airflow's structlog, to stdout here
    assert "in_progress, 0/2 requests done" in logged and "completed, 2/2 requests done" in logged
    assert SECRET not in logged


async def test_times_out_with_the_states_it_saw(gateway_factory: Any, loopback_conn: Any) -> None:
    handle = gateway_factory(GatewayConfig(batch_delay=60))
    batch_id = await _submit(handle, 1)
    trigger = BatchCompletionTrigger(imagegen_conn_id=loopback_conn(handle), batch_ids=[batch_id],
                                     poll_interval=0.05, timeout=0.3)
    event = await _first_event(trigger)
    assert event["status"] == "timeout" and event["batches"] == {batch_id: "in_progress"}


async def test_a_refused_key_ends_the_wait_with_an_error(gateway_factory: Any, make_conn: Any) -> None:
    handle = gateway_factory(GatewayConfig(api_key="another-key"))
    conn_id = make_conn("127.0.0.1", port=handle.port)
    event = await _first_event(BatchCompletionTrigger(imagegen_conn_id=conn_id, batch_ids=["batch_x"],
                                                      poll_interval=0.05, timeout=5))
    assert event["status"] == "error" and SECRET not in event["message"]


async def test_on_kill_cancels_the_batches(gateway_factory: Any, loopback_conn: Any) -> None:
    handle = gateway_factory(GatewayConfig(batch_delay=60))
    batch_id = await _submit(handle, 2)
    trigger = BatchCompletionTrigger(imagegen_conn_id=loopback_conn(handle), batch_ids=[batch_id])
    await trigger.on_kill()
    async with ImageGenClient(base_url=handle.url("/v1"), api_key=SECRET) as client:
        info = await BatchClient(client).retrieve(batch_id)
    stats = handle.stats()
    assert info.status in ("cancelling", "cancelled") and stats["charged_images"] == 0, (info, stats)

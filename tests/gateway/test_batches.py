"""The bundled gateway's Files and Batch APIs driven by the official ``openai`` SDK over a loopback socket:
batch answers are the sync answers (byte for byte) at the batch price; delays, line failures, expiry and
cancellation behave as documented; the other dialects say they have no batch API."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import httpx
import openai
import pytest

from imagegen_gateway import GatewayConfig

ENDPOINT = "/v1/images/generations"


def _client(handle: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=handle.url("/v1"), api_key="sk-batch-test", max_retries=0, timeout=60)


def _jsonl(bodies: dict[str, dict[str, Any]]) -> bytes:
    lines = [json.dumps({"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body}) for cid, body in bodies.items()]
    return ("\n".join(lines) + "\n").encode()


def _submit(client: openai.OpenAI, bodies: dict[str, dict[str, Any]]) -> Any:
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl(bodies))), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(_jsonl(bodies))
    return client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,  # type: ignore[arg-type]
                                 completion_window="24h", metadata={"run": "test"})


def _wait(client: openai.OpenAI, batch_id: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s")


def _lines(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    text = client.files.content(file_id).text
    return {line["custom_id"]: line for line in map(json.loads, text.splitlines())}


def _body(prompt: str, seed: int, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-image-1", "prompt": prompt, "size": "1024x1024", "quality": "low", "seed": seed, **extra}


def test_batch_answers_are_the_sync_answers_at_half_price(gateway_factory: Any) -> None:
    handle = gateway_factory(GatewayConfig())
    client = _client(handle)
    sync = [client.images.generate(model="gpt-image-1", prompt=f"kite {i}", size="1024x1024", quality="low",
                                   extra_body={"seed": 100 + i}) for i in range(2)]
    dall_e = client.images.generate(model="dall-e-3", prompt="a lamp", response_format="b64_json",
                                    extra_body={"seed": 9})
    sync_spent = handle.stats()["spent_usd"]
    httpx.post(handle.url("/_gateway/reset"))
    bodies = {f"p{i}": _body(f"kite {i}", 100 + i) for i in range(2)}
    bodies["lamp"] = {"model": "dall-e-3", "prompt": "a lamp", "response_format": "b64_json", "seed": 9}
    batch = _wait(client, _submit(client, bodies).id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (3, 3, 0)
    assert batch.error_file_id is None and batch.metadata == {"run": "test"}
    out = _lines(client, batch.output_file_id)
    for i in range(2):
        answer = out[f"p{i}"]["response"]
        assert answer["status_code"] == 200
        assert answer["body"]["data"][0]["b64_json"] == sync[i].data[0].b64_json  # type: ignore[index]
        assert answer["body"]["usage"]["output_tokens"] == sync[i].usage.output_tokens  # type: ignore[union-attr]
    assert out["lamp"]["response"]["body"]["data"][0]["b64_json"] == dall_e.data[0].b64_json  # type: ignore[index]
    stats = handle.stats()
    assert stats["spent_usd"] == pytest.approx(sync_spent / 2)
    assert (stats["batch_lines"], stats["batch_lines_resubmitted"], stats["images_generated"]) == (3, 0, 3)
    again = _wait(client, _submit(client, {"p0": _body("kite 0", 100)}).id)
    assert again.status == "completed"
    assert (handle.stats()["batch_lines_resubmitted"], handle.stats()["batch_lines_charged_twice"]) == (1, 1)
    assert stats["by_route"]["/v1/batches"] >= 2 and stats["by_route"]["/v1/files"] >= 2


def test_retrieve_file_and_list_batches(gateway_factory: Any) -> None:
    client = _client(gateway_factory(GatewayConfig()))
    first = _submit(client, {"a": _body("one", 1)})
    second = _submit(client, {"b": _body("two", 2)})
    assert client.files.retrieve(first.input_file_id).purpose == "batch"
    page = client.batches.list(limit=1)
    assert [batch.id for batch in page.data] == [second.id] and page.has_more
    assert [batch.id for batch in client.batches.list(limit=5, after=second.id).data] == [first.id]
    assert [batch.id for batch in client.batches.list()] == [second.id, first.id]  # the SDK pages through
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-nope")


def test_cancel_during_delay_leaves_every_line_unfinished_and_unpaid(gateway_factory: Any) -> None:
    handle = gateway_factory(GatewayConfig(batch_delay=60))
    client = _client(handle)
    batch = _submit(client, {f"c{i}": _body("x", i) for i in range(3)})
    time.sleep(0.2)
    assert client.batches.retrieve(batch.id).status == "in_progress"
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = _wait(client, batch.id)
    assert done.status == "cancelled" and done.output_file_id is None
    errors = _lines(client, done.error_file_id)
    assert {line["error"]["code"] for line in errors.values()} == {"batch_cancelled"} and len(errors) == 3
    assert handle.stats()["charged_images"] == 0
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_expiry_keeps_what_finished(gateway_factory: Any) -> None:
    handle = gateway_factory(GatewayConfig(batch_expire_after_lines=2))
    client = _client(handle)
    done = _wait(client, _submit(client, {f"e{i}": _body("x", i) for i in range(5)}).id)
    assert done.status == "expired"
    assert sorted(_lines(client, done.output_file_id)) == ["e0", "e1"]
    expired = _lines(client, done.error_file_id)
    assert sorted(expired) == ["e2", "e3", "e4"]
    assert all(line["response"] is None and line["error"]["code"] == "batch_expired" for line in expired.values())
    assert handle.stats()["charged_images"] == 2


def test_line_failures_and_invalid_lines_go_to_the_error_file(gateway_factory: Any) -> None:
    handle = gateway_factory(GatewayConfig(batch_line_failure_rate=1.0))
    client = _client(handle)
    bodies = {"bad": {"model": "dall-e-3", "prompt": "x", "n": 2}, "fail": _body("x", 1),
              "policy": _body("forbidden-content please", 2)}
    done = _wait(client, _submit(client, bodies).id)
    assert done.status == "completed" and done.output_file_id is None
    assert done.request_counts is not None and done.request_counts.failed == 3
    errors = _lines(client, done.error_file_id)
    assert errors["bad"]["response"]["status_code"] == 400 and errors["bad"]["response"]["body"]["error"]["param"] == "n"
    assert errors["policy"]["response"]["body"]["error"]["code"] == "content_policy_violation"
    assert errors["fail"]["response"]["status_code"] == 500
    assert handle.stats()["charged_images"] == 0


def test_an_invalid_input_file_fails_the_batch(gateway_factory: Any) -> None:
    client = _client(gateway_factory(GatewayConfig(batch_max_requests=2)))
    duplicate = b"\n".join(json.dumps({"custom_id": "same", "method": "POST", "url": ENDPOINT,
                                       "body": _body("x", 1)}).encode() for _ in range(2))
    uploaded = client.files.create(file=("dup.jsonl", io.BytesIO(duplicate)), purpose="batch")
    failed = _wait(client, client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,  # type: ignore[arg-type]
                                                 completion_window="24h").id)
    assert failed.status == "failed" and failed.errors is not None
    assert "repeats custom_id" in (failed.errors.data or [])[0].message  # type: ignore[operator]
    too_many = _wait(client, _submit(client, {f"t{i}": _body("x", i) for i in range(3)}).id)
    assert too_many.status == "failed" and too_many.errors is not None
    assert [error.code for error in too_many.errors.data or []] == ["too_many_requests"]


def test_refusals_at_upload_and_creation(gateway_factory: Any) -> None:
    client = _client(gateway_factory(GatewayConfig(batch_max_file_bytes=100)))
    with pytest.raises(openai.BadRequestError, match="larger than 100 bytes"):
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 101)), purpose="batch")
    small = client.files.create(file=("s.jsonl", io.BytesIO(b"{}")), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert httpx.get(str(client.base_url).rstrip("/") + "/batches").status_code == 401


@pytest.mark.parametrize("prefix", ["/api/v1", "/router/v1"])
def test_other_dialects_have_no_batch_api(gateway: Any, prefix: str) -> None:
    for path in (f"{prefix}/batches", f"{prefix}/files", f"{prefix}/batches/batch_x"):
        response = httpx.get(gateway.url(path), headers={"authorization": "Bearer k"})
        assert response.status_code == 404 and "no batch API" in response.text
        assert "batch_unsupported" in response.text

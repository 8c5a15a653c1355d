"""The batch client against the bundled gateway on a loopback socket: streamed upload, creation that a lost
answer cannot duplicate, result lines one at a time (resumed after a dropped download), capped lines, and a
clear refusal for dialects without a batch API."""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from imagegen_gateway import GatewayConfig
from imagegen_provider.transport.batch import (
    ENDPOINT,
    BatchClient,
    BatchInfo,
    BatchLineTooLargeError,
    BatchUnsupportedError,
    ResultLine,
)
from imagegen_provider.transport.client import ImageGenClient
from imagegen_provider.transport.retry import RetryPolicy


def _input_file(count: int) -> Any:
    handle = tempfile.TemporaryFile()  # noqa: SIM115 - the caller closes it
    for i in range(count):
        body = {"model": "gpt-image-1", "prompt": f"tile {i}", "size": "1024x1024", "quality": "low", "seed": i}
        line = {"custom_id": f"img-{i}", "method": "POST", "url": ENDPOINT, "body": body}
        handle.write(json.dumps(line).encode() + b"\n")
    return handle


def _client(handle: Any, **options: Any) -> ImageGenClient:
    retry = RetryPolicy(max_attempts=3, backoff_initial=0.01, backoff_max=0.05)
    return ImageGenClient(base_url=handle.url("/v1"), api_key="sk-batch-secret", retry=retry, **options)


async def _until_done(batches: BatchClient, batch_id: str) -> BatchInfo:
    async with asyncio.timeout(30):
        while True:
            info = await batches.retrieve(batch_id)
            if info.terminal:
                return info
            await asyncio.sleep(0.05)


async def _collect(batches: BatchClient, file_id: str) -> list[ResultLine]:
    return [line async for line in batches.result_lines(file_id)]


async def _submit(batches: BatchClient, count: int, submission: str = "sub-1") -> BatchInfo:
    with _input_file(count) as source:
        file_id = await batches.upload(source, filename="input.jsonl")
    return await batches.create(input_file_id=file_id, metadata={"run": "r1"}, submission=submission)


async def test_upload_create_poll_and_stream_results(gateway_factory: Any) -> None:
    handle = gateway_factory(GatewayConfig())
    async with _client(handle) as client:
        batches = BatchClient(client)
        created = await _submit(batches, 3)
        assert created.metadata == {"run": "r1", "imagegen_submission": "sub-1"}
        done = await _until_done(batches, created.id)
        assert (done.status, done.counts.total, done.counts.completed) == ("completed", 3, 3)
        assert done.output_file_id is not None
        lines = await _collect(batches, done.output_file_id)
    assert sorted(line.custom_id for line in lines) == ["img-0", "img-1", "img-2"]
    for line in lines:
        assert line.status_code == 200 and line.body is not None
        assert base64.b64decode(line.body["data"][0]["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert handle.stats()["batches_created"] == 1


class _Lossy(httpx.AsyncBaseTransport):
    """Forwards to a real transport; loses the first answer to ``POST .../batches`` (after the gateway acted on
    it) and cuts the first download of a file's content half-way."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.lost_create = False
        self.cut_download = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        path = request.url.path
        if request.method == "POST" and path.endswith("/batches") and not self.lost_create:
            self.lost_create = True
            await response.aread()
            raise httpx.ReadError("connection lost", request=request)
        if path.endswith("/content") and not self.cut_download:
            self.cut_download = True
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, stream=_Cut(body[: len(body) // 2]))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Cut(httpx.AsyncByteStream):
    def __init__(self, head: bytes) -> None:
        self.head = head

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        raise httpx.ReadError("connection reset")


async def test_a_lost_creation_answer_creates_one_batch_and_a_cut_download_resumes(gateway_factory: Any) -> None:
    handle = gateway_factory(GatewayConfig())
    lossy = _Lossy()
    async with _client(handle, transport=lossy) as client:
        batches = BatchClient(client)
        created = await _submit(batches, 4, submission="only-once")
        assert lossy.lost_create
        done = await _until_done(batches, created.id)
        assert done.output_file_id is not None
        lines = await _collect(batches, done.output_file_id)
    assert lossy.cut_download
    assert sorted(line.custom_id for line in lines) == [f"img-{i}" for i in range(4)]  # each line exactly once
    stats = handle.stats()
    assert stats["batches_created"] == 1 and stats["batch_lines"] == 4


async def test_a_line_over_the_cap_is_refused(gateway_factory: Any) -> None:
    handle = gateway_factory(GatewayConfig())
    async with _client(handle) as client:
        done = await _until_done(BatchClient(client), (await _submit(BatchClient(client), 1)).id)
        assert done.output_file_id is not None
        with pytest.raises(BatchLineTooLargeError):
            await _collect(BatchClient(client, max_line_bytes=1000), done.output_file_id)


async def test_errors_name_the_call_and_never_the_key(gateway_factory: Any) -> None:
    handle = gateway_factory(GatewayConfig(api_key="the-right-key"))
    async with _client(handle) as client:
        with pytest.raises(Exception) as caught:
            await BatchClient(client).retrieve("batch_x")
    assert caught.value.__class__.__name__ == "AuthenticationError"
    assert "sk-batch-secret" not in str(caught.value)


async def test_dialects_without_batch_are_refused_before_sending(gateway_factory: Any) -> None:
    handle = gateway_factory(GatewayConfig())
    async with ImageGenClient(base_url=handle.url("/api/v1"), api_key="k", dialect="indoxhub") as client:
        with pytest.raises(BatchUnsupportedError, match="indoxhub dialect has no batch API"):
            BatchClient(client)
    assert handle.stats()["total_requests"] == 0

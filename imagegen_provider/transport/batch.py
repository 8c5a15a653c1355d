"""OpenAI's Batch API (``/files`` and ``/batches``) through the same HTTP client as :class:`ImageGenClient`:
same connection pool, auth header, timeouts and User-Agent; 429/5xx/transport errors retried with the client's
:class:`RetryPolicy` (Retry-After honoured up to ``max_retry_after``); error messages redacted of the key.

Nothing large is held in memory: the input JSONL is uploaded from a file object that httpx streams in chunks,
and the output file is read as a stream cut into lines, one at a time, each under ``max_line_bytes`` (a line
can carry a multi-MB base64 image). Bodies are decoded with a bound per piece (the transport's ``body`` module);
other answers are capped at 8 MB. A dropped download resumes where it stopped (``Range``).

Creating a batch is the one call that costs money and is not idempotent: it is never retried blindly. Each
creation carries a submission token in its metadata; after a failed creation the recent batches are searched
for that token before asking again, so a lost response cannot submit the same images twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import httpx
import orjson

from imagegen_provider.transport.body import iter_capped, read_capped
from imagegen_provider.transport.client import ImageGenClient
from imagegen_provider.transport.retry import is_retryable, parse_retry_after
from imagegen_provider.wire.errors import (
    GatewayConnectionError,
    ImageGenError,
    MalformedResponseError,
    error_from_response,
    excerpt,
)

log = logging.getLogger(__name__)

ENDPOINT = "/v1/images/generations"
COMPLETION_WINDOW = "24h"
#: Metadata key of the token that makes batch creation safe to retry.
SUBMISSION_KEY = "imagegen_submission"
#: Largest line of an output or error file (one image's JSON, base64 inside), decoded bytes.
DEFAULT_MAX_LINE_BYTES = 192 * 1024 * 1024
#: Largest JSON answer of the other calls (a batch object, a file object, a page of batches).
_MAX_JSON_BYTES = 8 * 1024 * 1024
#: Largest output or error file read (decoded): OpenAI's outputs stay far below; a gateway streaming forever not.
_MAX_FILE_BYTES = 1 << 40
#: Pages of ``GET /batches`` searched for a submission token after a failed creation.
_SEARCH_PAGES = 5

STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled")
TERMINAL_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})


@dataclass(frozen=True)
class _Answer:
    """A small answer read under :data:`_MAX_JSON_BYTES`."""

    status_code: int
    headers: httpx.Headers
    content: bytes


class BatchUnsupportedError(ImageGenError):
    """The connection's dialect (or gateway) has no batch API: nothing was sent."""

    fatal = True


class BatchLineTooLargeError(MalformedResponseError):
    """A line of a result file went past ``max_line_bytes``."""


@dataclass(frozen=True)
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0


def _count(value: Any) -> int:
    """A count from the gateway, believed only when it is a sane non-negative integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**9 else 0


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class BatchInfo:
    """The parts of a ``batch`` object the engine acts on, checked before believed."""

    id: str
    status: str
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: RequestCounts = field(default_factory=RequestCounts)
    metadata: Mapping[str, str] = field(default_factory=dict)
    errors: tuple[str, ...] = ()

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_payload(cls, payload: Any) -> BatchInfo:
        """:raises MalformedResponseError: not a batch object, or an unknown status."""
        if not isinstance(payload, dict) or not _text(payload.get("id")):
            raise MalformedResponseError("batch answer is not a batch object")
        status = payload.get("status")
        if status not in STATUSES:
            raise MalformedResponseError(f"batch {payload['id']} has an unknown status {excerpt(str(status))!r}")
        counts = _object(payload.get("request_counts"))
        metadata = _object(payload.get("metadata"))
        listed = _object(payload.get("errors")).get("data")
        errors = [item for item in listed if isinstance(item, dict)] if isinstance(listed, list) else []
        return cls(
            id=payload["id"], status=status, input_file_id=_text(payload.get("input_file_id")),
            output_file_id=_text(payload.get("output_file_id")), error_file_id=_text(payload.get("error_file_id")),
            counts=RequestCounts(*(_count(counts.get(key)) for key in ("total", "completed", "failed"))),
            metadata={str(k): str(v) for k, v in metadata.items() if isinstance(v, str)},
            errors=tuple(excerpt(f"{e.get('code')}: {e.get('message')} (line {e.get('line')})") for e in errors[:5]),
        )


@dataclass(frozen=True)
class ResultLine:
    """One line of an output or error file."""

    custom_id: str
    #: HTTP status of the line's request; ``None`` when it never ran (expired, cancelled).
    status_code: int | None
    request_id: str | None
    body: Mapping[str, Any] | None
    error_code: str | None = None
    error_message: str | None = None


def parse_result_line(raw: bytes, *, secrets: list[str | None]) -> ResultLine:
    """:raises MalformedResponseError: not a result line (no ``custom_id``, not JSON)."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise MalformedResponseError("a batch result line is not JSON") from None
    if not isinstance(line, dict) or not _text(line.get("custom_id")):
        raise MalformedResponseError("a batch result line has no custom_id")
    response = _object(line.get("response"))
    error = _object(line.get("error"))
    status = response.get("status_code")
    body = response.get("body") if isinstance(response.get("body"), dict) else None
    return ResultLine(
        custom_id=line["custom_id"],
        status_code=status if isinstance(status, int) and 100 <= status < 600 else None,
        request_id=_text(response.get("request_id")),
        body=body,
        error_code=_text(error.get("code")),
        error_message=excerpt(str(error.get("message")), secrets) if _text(error.get("message")) else None,
    )


class BatchClient:
    """The Files and Batch APIs of the gateway ``client`` talks to, over ``client``'s own HTTP client.

    :param client: an open :class:`ImageGenClient` of the ``openai`` dialect.
    :param max_line_bytes: cap on one line of a result file.
    :raises BatchUnsupportedError: the client's dialect has no batch API.
    """

    def __init__(self, client: ImageGenClient, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if client.dialect.name != "openai":
            raise BatchUnsupportedError(
                f"the {client.dialect.name} dialect has no batch API; use api='sync' (batch needs an "
                "OpenAI-compatible gateway with /files and /batches)"
            )
        self._client = client
        self._http: httpx.AsyncClient = client._http
        self.base_url = client.base_url
        self.max_line_bytes = max_line_bytes

    @property
    def _secrets(self) -> list[str | None]:
        return [self._client.api_key_for_redaction]

    # -- calls -------------------------------------------------------------------------------------------

    async def upload(self, source: IO[bytes], *, filename: str) -> str:
        """Upload a JSONL input file (``purpose=batch``) streamed from ``source``; returns the file id."""

        async def send() -> _Answer:
            source.seek(0)
            return await self._request("POST", self.base_url + "/files", data={"purpose": "batch"},
                                       files={"file": (filename, source, "application/jsonl")})

        payload = await self._json(send, what="upload")
        file_id = _text(payload.get("id")) if isinstance(payload, dict) else None
        if file_id is None:
            raise MalformedResponseError("the file upload answer has no id")
        return file_id

    async def create(self, *, input_file_id: str, metadata: Mapping[str, str], submission: str) -> BatchInfo:
        """Create a batch on :data:`ENDPOINT`. ``submission`` is a token unique to this creation: a retried
        creation first looks for a batch already carrying it."""
        body = {"input_file_id": input_file_id, "endpoint": ENDPOINT, "completion_window": COMPLETION_WINDOW,
                "metadata": {**metadata, SUBMISSION_KEY: submission}}
        attempts = 0
        while True:
            attempts += 1
            try:
                response = await self._request("POST", self.base_url + "/batches", json=body)
                return BatchInfo.from_payload(self._checked_json(response))
            except (ImageGenError, httpx.TransportError) as exc:
                if not self._should_retry(exc, attempts):
                    raise self._as_error(exc, "create") from None
                await asyncio.sleep(self._delay(exc, attempts))
                existing = await self.find_submission(submission)
                if existing is not None:
                    return existing

    async def retrieve(self, batch_id: str) -> BatchInfo:
        url = f"{self.base_url}/batches/{batch_id}"
        return BatchInfo.from_payload(await self._json(lambda: self._request("GET", url), what="retrieve"))

    async def cancel(self, batch_id: str) -> BatchInfo:
        """Ask the gateway to cancel; a batch that already ended (409) is returned as it is."""
        url = f"{self.base_url}/batches/{batch_id}/cancel"
        response = await self._request("POST", url)
        if response.status_code == 409:
            return await self.retrieve(batch_id)
        return BatchInfo.from_payload(self._checked_json(response))

    async def find_submission(self, submission: str) -> BatchInfo | None:
        """The batch created with ``submission`` among the most recent ones, if any."""
        after: str | None = None
        for _ in range(_SEARCH_PAGES):
            params = {"limit": "100", **({"after": after} if after else {})}
            page = await self._list_page(params)
            items = page.get("data") if isinstance(page, dict) else None
            for item in items or []:
                info = BatchInfo.from_payload(item)
                if info.metadata.get(SUBMISSION_KEY) == submission:
                    return info
            if not (isinstance(page, dict) and page.get("has_more") and items):
                return None
            after = _text(items[-1].get("id")) if isinstance(items[-1], dict) else None
        return None

    async def _list_page(self, params: dict[str, str]) -> Any:
        return await self._json(lambda: self._request("GET", self.base_url + "/batches", params=params), what="list")

    async def result_lines(self, file_id: str) -> AsyncIterator[ResultLine]:
        """The lines of an output or error file, one at a time, never the whole file."""
        async for raw in self._raw_lines(file_id):
            yield parse_result_line(raw, secrets=self._secrets)

    # -- plumbing ----------------------------------------------------------------------------------------

    async def _raw_lines(self, file_id: str) -> AsyncIterator[bytes]:
        """Lines of a file; a dropped connection resumes at the byte after the last whole line."""
        consumed = 0
        attempts = 0
        url = f"{self.base_url}/files/{file_id}/content"
        while True:
            attempts += 1
            try:
                async for raw, size in self._lines_from(url, consumed):
                    consumed += size
                    attempts = 0
                    if raw.strip():
                        yield raw
                return
            except (ImageGenError, httpx.TransportError) as exc:
                if isinstance(exc, BatchLineTooLargeError) or not self._should_retry(exc, attempts):
                    raise self._as_error(exc, "download") from None
                await asyncio.sleep(self._delay(exc, attempts))

    async def _lines_from(self, url: str, offset: int) -> AsyncIterator[tuple[bytes, int]]:
        # A range counts bytes of the encoded body: a resumed download asks for it unencoded.
        headers = {"Range": f"bytes={offset}-", "Accept-Encoding": "identity"} if offset else {}
        async with self._http.stream("GET", url, headers=headers) as response:
            if response.status_code not in (200, 206):
                content = await read_capped(response, max_bytes=_MAX_JSON_BYTES, what=f"error answer from {url}")
                raise error_from_response(response.status_code, content,
                                          retry_after=parse_retry_after(response.headers), secrets=self._secrets)
            skip = offset if response.status_code == 200 else 0  # the server ignored the range
            pending = bytearray()
            # Decoded with a bound per piece (no gzip bomb); the file as a whole may be large, each line may not.
            async for chunk in iter_capped(response, max_bytes=_MAX_FILE_BYTES, what=f"batch file {url}"):
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                pending += chunk
                for line in self._whole_lines(pending):
                    yield line
            if pending.strip():
                yield bytes(pending), len(pending)

    def _whole_lines(self, pending: bytearray) -> list[tuple[bytes, int]]:
        """Cut the complete lines off the front of ``pending`` (in place)."""
        lines = []
        start = 0
        while (end := pending.find(b"\n", start)) != -1:
            if end - start > self.max_line_bytes:
                raise BatchLineTooLargeError(f"a batch result line is larger than {self.max_line_bytes} bytes")
            # Blank lines are passed on too: their bytes count towards the resume offset.
            lines.append((bytes(pending[start:end]), end + 1 - start))
            start = end + 1
        del pending[:start]
        if len(pending) > self.max_line_bytes:
            raise BatchLineTooLargeError(f"a batch result line is larger than {self.max_line_bytes} bytes")
        return lines

    async def _json(self, send: Callable[[], Awaitable[_Answer]], *, what: str) -> Any:
        attempts = 0
        while True:
            attempts += 1
            try:
                return self._checked_json(await send())
            except (ImageGenError, httpx.TransportError) as exc:
                if not self._should_retry(exc, attempts):
                    raise self._as_error(exc, what) from None
                await asyncio.sleep(self._delay(exc, attempts))

    async def _request(self, method: str, url: str, **options: Any) -> _Answer:
        """One exchange whose body is read under :data:`_MAX_JSON_BYTES` (a gateway is untrusted)."""
        async with self._http.stream(method, url, **options) as response:
            content = await read_capped(response, max_bytes=_MAX_JSON_BYTES, what=f"batch API answer from {url}")
        return _Answer(response.status_code, response.headers, content)

    def _checked_json(self, response: _Answer) -> Any:
        content = response.content
        if response.status_code != 200:
            raise error_from_response(response.status_code, content, request_id=response.headers.get("x-request-id"),
                                      retry_after=parse_retry_after(response.headers), secrets=self._secrets)
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            raise MalformedResponseError("batch API answer is not JSON") from None

    def _should_retry(self, exc: BaseException, attempts: int) -> bool:
        return is_retryable(exc) and attempts < max(1, self._client.retry.max_attempts)

    def _delay(self, exc: BaseException, attempts: int) -> float:
        policy = self._client.retry
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float):
            return min(policy.max_retry_after, float(retry_after))
        return random.uniform(0.0, min(policy.backoff_max, policy.backoff_initial * 2.0 ** max(0, attempts - 1)))

    def _as_error(self, exc: BaseException, what: str) -> ImageGenError:
        if isinstance(exc, ImageGenError):
            return exc
        # The class name only: httpx messages can quote the request.
        return GatewayConnectionError(f"batch {what} at {self.base_url} failed: {type(exc).__name__}")

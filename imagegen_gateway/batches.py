"""OpenAI's Batch API for ``/v1/images/generations``, with the Files API routes it needs.

A batch is worked on by a background task of the server's event loop, in named stages: validate the input
file (JSONL, unique ``custom_id``, ``POST`` to the batch's endpoint, at most ``batch_max_requests`` lines),
wait ``batch_delay``, then serve each line exactly as the synchronous route would (same parsing, rules, seed
and render, so the same request and seed give byte-identical images), charged the price table's batch
fraction (or ``batch_discount``) of the sync price, and write the answer to the output file (200) or the
error file (anything else). Configurable faults:
``batch_line_failure_rate`` (500 lines), ``batch_expire_after_lines`` (the batch expires part-way, the rest of
its lines are written to the error file with code ``batch_expired``), and cancellation (``cancelling`` until the
worker notices, then ``cancelled``; unfinished lines get ``batch_cancelled``).

Under ``httpx.ASGITransport`` the batch advances only while the client's event loop runs; served on a socket
(``imagegen gateway``, tests) it advances on its own. Batches live in memory: a restarted gateway forgets them.

The indoxhub and router dialects have no batch API: their ``files`` and ``batches`` routes answer 404 with
code ``batch_unsupported``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import IO, Any

import anyio.to_thread
import orjson
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from imagegen_gateway.charges import batch_fraction, billed_usage
from imagegen_gateway.files import PURPOSES, FileTooLarge, StoredUpload, UploadStore
from imagegen_gateway.parsing import GenParams, parse_request
from imagegen_gateway.responses import ImageOut, error_response, openai_body
from imagegen_gateway.rules import InvalidRequest
from imagegen_gateway.state import GatewayState

#: Endpoints a batch may target here (OpenAI also batches chat, embeddings... which this gateway does not serve).
BATCH_ENDPOINTS = frozenset({"/v1/images/generations"})
COMPLETION_WINDOWS = frozenset({"24h"})
UNSUPPORTED_PREFIXES = ("/api/v1", "/router/v1")
_MAX_REPORTED_ERRORS = 20
_UNSEEDED_NONCES = 2**31

Auth = Callable[[Request, str], Response | None]
MakeImages = Callable[..., Awaitable[list[ImageOut]]]


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


TERMINAL = frozenset({BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})


@dataclass
class Batch:
    """One batch and everything its ``batch`` object reports."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    base_url: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: BatchStatus = BatchStatus.VALIDATING
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    times: dict[str, int] = field(default_factory=dict)
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)

    def move(self, status: BatchStatus) -> None:
        self.status = status
        self.times[f"{status.value}_at"] = int(time.time())

    def as_object(self) -> dict[str, Any]:
        stamps = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
                  "cancelled_at")
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status.value, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "expires_at": self.created_at + 86_400,
            **{stamp: self.times.get(stamp) for stamp in stamps},
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }


@dataclass
class _Outputs:
    """The output and error files of a batch being worked on."""

    output: tuple[StoredUpload, IO[bytes]]
    errors: tuple[StoredUpload, IO[bytes]]
    written: dict[str, int] = field(default_factory=lambda: {"output": 0, "errors": 0})

    def write(self, kind: str, line: dict[str, Any]) -> None:
        handle = self.output[1] if kind == "output" else self.errors[1]
        handle.write(orjson.dumps(line) + b"\n")
        self.written[kind] += 1


class BatchService:
    """Every batch of one gateway, and the tasks working on them."""

    def __init__(self, gateway: GatewayState, make_images: MakeImages) -> None:
        self.gateway = gateway
        self._make_images = make_images
        self.batches: OrderedDict[str, Batch] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        seed = gateway.config.fault_seed
        self._failures = random.Random(None if seed is None else f"batch:{seed}")
        #: Every custom_id ever served, and those charged: resubmissions and double charges in the stats.
        self._seen: set[str] = set()
        self._charged: set[str] = set()

    def create(self, batch: Batch) -> None:
        self.batches[batch.id] = batch
        self.gateway.stats.batches_created += 1
        task = asyncio.get_running_loop().create_task(self._work(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _work(self, batch: Batch) -> None:
        stored = self.gateway.uploads.get(batch.input_file_id)
        assert stored is not None  # checked at creation
        limit = self.gateway.config.batch_max_requests
        total, errors = await anyio.to_thread.run_sync(_validate_file, stored, batch.endpoint, limit)
        if errors:
            batch.errors = errors
            batch.move(BatchStatus.FAILED)
            return
        batch.total = total
        # A cancel that arrived while the file was being validated stands: the batch stays cancelling.
        if batch.status is not BatchStatus.CANCELLING:
            batch.move(BatchStatus.IN_PROGRESS)
        await self._delay(batch)
        outputs = _Outputs(self.gateway.uploads.open_output(f"{batch.id}_output.jsonl"),
                           self.gateway.uploads.open_output(f"{batch.id}_error.jsonl"))
        try:
            await self._lines(batch, stored, outputs)
        finally:
            outputs.output[1].close()
            outputs.errors[1].close()
        self._finish(batch, outputs)

    async def _delay(self, batch: Batch) -> None:
        """``batch_delay``, cut short by a cancellation."""
        # Plain asyncio: this task is the server loop's own, outside any request's (anyio) cancel scope.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(batch.cancel_requested.wait(), timeout=self.gateway.config.batch_delay)

    async def _lines(self, batch: Batch, stored: StoredUpload, outputs: _Outputs) -> None:
        expire_after = self.gateway.config.batch_expire_after_lines
        done = 0
        with stored.path.open("rb") as lines:
            for raw in lines:
                if not raw.strip():
                    continue
                request = orjson.loads(raw)
                custom_id = request["custom_id"]
                stop = self._stop_code(batch, done, expire_after)
                if stop is not None:
                    outputs.write("errors", _unfinished_line(custom_id, stop))
                    continue
                status, body = await self._serve_line(batch, custom_id, request.get("body"))
                outputs.write("output" if status == 200 else "errors", _answer_line(custom_id, status, body))
                done += 1
                batch.completed += status == 200
                batch.failed += status != 200

    def _stop_code(self, batch: Batch, done: int, expire_after: int | None) -> str | None:
        if batch.status is BatchStatus.CANCELLING:
            return "batch_cancelled"
        if expire_after is not None and done >= expire_after:
            return "batch_expired"
        return None

    async def _serve_line(self, batch: Batch, custom_id: str, body: Any) -> tuple[int, dict[str, Any]]:
        """One line, as ``POST /v1/images/generations`` would answer it (minus rate limits and sync faults)."""
        stats = self.gateway.stats
        stats.batch_lines += 1
        if custom_id in self._seen:
            stats.batch_lines_resubmitted += 1
        self._seen.add(custom_id)
        config = self.gateway.config
        try:
            params = parse_request("openai", body, default_response_format=config.default_response_format)
        except InvalidRequest as exc:
            return 400, _error_body(exc.message, code=exc.code, param=exc.param)
        params = self._seeded(params)
        refusal = self._refusal(params)
        if refusal is not None:
            return refusal
        usage = billed_usage(params.bare_model, params.prompt, params.width, params.height, params.quality, params.n)
        fraction = config.batch_discount if config.batch_discount is not None else batch_fraction(params.model)
        cost = round(usage.cost_usd * fraction, 9)
        if not self.gateway.can_afford(cost):
            return 402, _error_body("Insufficient balance", type_="insufficient_quota", code="insufficient_quota")
        self.gateway.charge(cost, params.n)
        if custom_id in self._charged:
            stats.batch_lines_charged_twice += 1
        self._charged.add(custom_id)
        images = await self._make_images(self.gateway, params, base_url=batch.base_url)
        stats.images_generated += params.n
        return 200, openai_body(params, images, usage, int(time.time()))

    def _seeded(self, params: GenParams) -> GenParams:
        """Like the sync route: an unseeded line gets a nonce unless the gateway repeats unseeded images."""
        if params.seed_given or self.gateway.config.repeat_unseeded:
            return params
        return replace(params, seed=secrets.randbelow(_UNSEEDED_NONCES))

    def _refusal(self, params: GenParams) -> tuple[int, dict[str, Any]] | None:
        config = self.gateway.config
        trigger = config.content_policy_trigger
        if trigger and trigger.lower() in params.prompt.lower():
            self.gateway.stats.content_policy_rejections += 1
            return 400, _error_body("Your request was rejected as a result of our safety system.",
                                    code="content_policy_violation", param="prompt")
        if self._failures.random() < config.batch_line_failure_rate:
            self.gateway.stats.faults["batch_line_500"] += 1
            return 500, _error_body("The server had an error while processing your request.",
                                    type_="server_error", code="internal_error")
        return None

    def _finish(self, batch: Batch, outputs: _Outputs) -> None:
        uploads = self.gateway.uploads
        if outputs.written["output"]:
            uploads.publish(outputs.output[0])
            batch.output_file_id = outputs.output[0].id
        else:
            outputs.output[0].path.unlink(missing_ok=True)
        if outputs.written["errors"]:
            uploads.publish(outputs.errors[0])
            batch.error_file_id = outputs.errors[0].id
        else:
            outputs.errors[0].path.unlink(missing_ok=True)
        if batch.status is BatchStatus.CANCELLING:
            batch.move(BatchStatus.CANCELLED)
        elif batch.completed + batch.failed < batch.total:
            batch.move(BatchStatus.EXPIRED)
        else:
            batch.move(BatchStatus.FINALIZING)
            batch.move(BatchStatus.COMPLETED)


def _error_body(message: str, *, type_: str = "invalid_request_error", code: str | None = None,
                param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _answer_line(custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": secrets.token_hex(16), "body": body}, "error": None}


def _unfinished_line(custom_id: str, code: str) -> dict[str, Any]:
    message = ("This request could not be executed before the completion window expired." if code == "batch_expired"
               else "This request was not executed because the batch was cancelled.")
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _line_problem(number: int, raw: bytes, endpoint: str, seen: set[str]) -> str | None:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return f"Line {number} is not valid JSON."
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str) or not line["custom_id"]:
        return f"Line {number} has no custom_id."
    if line["custom_id"] in seen:
        return f"Line {number} repeats custom_id {line['custom_id']!r}; custom_id must be unique within a batch."
    seen.add(line["custom_id"])
    if line.get("method") != "POST" or line.get("url") != endpoint:
        return f"Line {number} must be a POST to {endpoint}, the batch's endpoint."
    if not isinstance(line.get("body"), dict):
        return f"Line {number} has no JSON object body."
    return None


def _validate_file(stored: StoredUpload, endpoint: str, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """Stage 1 (in a worker thread): how many lines the input file holds, or what is wrong with it."""
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    count = 0
    with stored.path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            count += 1
            problem = _line_problem(number, raw, endpoint, seen)
            if problem is not None and len(errors) < _MAX_REPORTED_ERRORS:
                errors.append({"code": "invalid_request", "message": problem, "param": None, "line": number})
    if count == 0:
        errors.append({"code": "empty_file", "message": "The input file holds no request.", "param": None,
                       "line": None})
    if count > limit:
        errors.append({"code": "too_many_requests", "param": None, "line": None,
                       "message": f"The input file holds {count} requests; a batch takes at most {limit}."})
    return count, errors


# --- routes -------------------------------------------------------------------------------------------------


def _not_found(what: str, ident: str) -> Response:
    return error_response("openai", 404, f"No such {what}: '{ident}'", code="not_found", param="id")


def _bad(message: str, param: str | None = None) -> Response:
    return error_response("openai", 400, message, code="invalid_value", param=param)


class BatchRoutes:
    """The Files and Batch API handlers of one app (``auth`` is the app's bearer-key check)."""

    def __init__(self, service: BatchService, auth: Auth) -> None:
        self.service = service
        self.auth = auth

    @property
    def _uploads(self) -> UploadStore:
        return self.service.gateway.uploads

    async def upload_file(self, request: Request) -> Response:
        if (denied := self.auth(request, "openai")) is not None:
            return denied
        limit = self.service.gateway.config.batch_max_file_bytes
        try:
            async with request.form(max_part_size=1024 * 1024) as form:
                purpose, upload = form.get("purpose"), form.get("file")
                if not isinstance(purpose, str) or purpose not in PURPOSES:
                    return _bad(f"purpose must be one of {', '.join(sorted(PURPOSES))}", "purpose")
                if not isinstance(upload, UploadFile):
                    return _bad("A file is required.", "file")
                stored = await self._uploads.save_upload(upload, purpose=purpose, max_bytes=limit)
        except (MultiPartException, AssertionError, ValueError) as exc:
            return _bad(f"Could not read the multipart body: {exc}")
        except FileTooLarge as exc:
            return _bad(str(exc), "file")
        return JSONResponse(stored.as_object())

    async def retrieve_file(self, request: Request) -> Response:
        if (denied := self.auth(request, "openai")) is not None:
            return denied
        stored = self._uploads.get(request.path_params["file_id"])
        if stored is None:
            return _not_found("file", request.path_params["file_id"])
        return JSONResponse(stored.as_object())

    async def file_content(self, request: Request) -> Response:
        if (denied := self.auth(request, "openai")) is not None:
            return denied
        stored = self._uploads.get(request.path_params["file_id"])
        if stored is None:
            return _not_found("file", request.path_params["file_id"])
        return FileResponse(stored.path, media_type="application/jsonl")

    async def create_batch(self, request: Request) -> Response:
        if (denied := self.auth(request, "openai")) is not None:
            return denied
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _bad("We could not parse the JSON body of your request.")
        problem = self._creation_problem(body)
        if problem is not None:
            return problem
        batch = Batch(id=f"batch_{secrets.token_hex(12)}", input_file_id=body["input_file_id"],
                      endpoint=body["endpoint"], completion_window=body["completion_window"],
                      metadata=body.get("metadata"), base_url=str(request.base_url))
        self.service.create(batch)
        return JSONResponse(batch.as_object())

    def _creation_problem(self, body: Any) -> Response | None:
        if not isinstance(body, dict):
            return _bad("The body must be a JSON object.")
        if body.get("endpoint") not in BATCH_ENDPOINTS:
            return _bad(f"endpoint must be one of {', '.join(sorted(BATCH_ENDPOINTS))}", "endpoint")
        if body.get("completion_window") not in COMPLETION_WINDOWS:
            return _bad("completion_window must be '24h'", "completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16
                                         and all(isinstance(v, str) for v in metadata.values())):
            return _bad("metadata must be at most 16 string values", "metadata")
        stored = self._uploads.get(str(body.get("input_file_id")))
        if stored is None:
            return _not_found("file", str(body.get("input_file_id")))
        if stored.purpose != "batch":
            return _bad("The input file must be uploaded with purpose 'batch'.", "input_file_id")
        return None

    async def retrieve_batch(self, request: Request) -> Response:
        if (denied := self.auth(request, "openai")) is not None:
            return denied
        batch = self.service.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _not_found("batch", request.path_params["batch_id"])
        return JSONResponse(batch.as_object())

    async def cancel_batch(self, request: Request) -> Response:
        if (denied := self.auth(request, "openai")) is not None:
            return denied
        batch = self.service.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _not_found("batch", request.path_params["batch_id"])
        if batch.status in TERMINAL or batch.status is BatchStatus.FINALIZING:
            return error_response("openai", 409, f"Cannot cancel a batch with status {batch.status.value}.",
                                  code="conflict")
        if batch.status is not BatchStatus.CANCELLING:
            batch.move(BatchStatus.CANCELLING)
            batch.cancel_requested.set()
        return JSONResponse(batch.as_object())

    async def list_batches(self, request: Request) -> Response:
        if (denied := self.auth(request, "openai")) is not None:
            return denied
        try:
            limit = max(1, min(100, int(request.query_params.get("limit", "20"))))
        except ValueError:
            return _bad("limit must be an integer", "limit")
        newest_first = list(reversed(self.service.batches.values()))
        after = request.query_params.get("after")
        if after is not None:
            ids = [batch.id for batch in newest_first]
            newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
        page = newest_first[:limit]
        return JSONResponse({"object": "list", "data": [batch.as_object() for batch in page],
                             "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                             "has_more": len(newest_first) > limit})


async def batch_unsupported(request: Request) -> Response:
    """The indoxhub and router dialects document no batch API."""
    dialect = "indoxhub" if request.url.path.startswith("/api/") else "router"
    return error_response(dialect, 404, f"The {dialect} dialect has no batch API (files and batches are served "
                          "on the openai dialect's /v1 only).", code="batch_unsupported")


def batch_routes(gateway: GatewayState, *, auth: Auth, make_images: MakeImages) -> tuple[BatchService, list[Route]]:
    """The service and the routes of the Files and Batch APIs."""
    service = BatchService(gateway, make_images)
    handlers = BatchRoutes(service, auth)
    routes = [
        Route("/v1/files", handlers.upload_file, methods=["POST"]),
        Route("/v1/files/{file_id}", handlers.retrieve_file, methods=["GET"]),
        Route("/v1/files/{file_id}/content", handlers.file_content, methods=["GET"]),
        Route("/v1/batches", handlers.create_batch, methods=["POST"]),
        Route("/v1/batches", handlers.list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", handlers.retrieve_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", handlers.cancel_batch, methods=["POST"]),
    ]
    for prefix in UNSUPPORTED_PREFIXES:
        for what in ("files", "batches"):
            routes.append(Route(f"{prefix}/{what}", batch_unsupported, methods=["GET", "POST"]))
            routes.append(Route(f"{prefix}/{what}/{{rest:path}}", batch_unsupported, methods=["GET", "POST"]))
    return service, routes

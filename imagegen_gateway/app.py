"""The gateway's ASGI app: three generation dialects, OpenAI's edits and variations, URL images, models, and
a stats side door.

Order of every image request (generation, edit, variation), chosen to match how real gateways behave and to
keep tests predictable; each step is a named stage of :func:`_serve`:

1. auth (401) → 2. body and rules (400: OpenAI's documented rules on ``/v1`` for OpenAI's models, generic
   checks otherwise; uploads for edits and variations) → 3. content policy (400) → 4. rate limit (429,
   immediate, before any latency) → 5. balance (402) → 6. fault draw; the request is charged now unless a
   fault other than a dropped connection fires → 7. latency → 8. fault response or images.

Requests rejected in steps 1-3 consume no rate-limit tokens.

Faults (``GatewayConfig.fail_*_rate``, ``corrupt_b64_rate``, ``envelope_failure_rate``) are neither charged
nor counted in ``images_generated``. A dropped connection (``drop_rate``) is: the image was made and paid
for, only the response is lost; ``charged_images - images_generated`` in the stats is what clients paid
for and never got. Over a socket the drop is a real aborted connection; under ``httpx.ASGITransport`` the
client gets :class:`~imagegen_gateway.responses.DroppedConnection`, an ``httpx.RemoteProtocolError``.

Stats semantics: ``total_requests``/``by_status``/``by_route`` count every request except ``/_gateway/*``;
``accepted_timeline`` counts successful (fault-free 200) generation requests per wall-clock second.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import anyio
import anyio.to_thread
import orjson
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegen_gateway.batches import batch_routes
from imagegen_gateway.charges import BilledUsage, billed_usage
from imagegen_gateway.config import GatewayConfig
from imagegen_gateway.faults import Fault, corrupt_base64
from imagegen_gateway.inputs import MAX_UPLOAD_BYTES, MB, check_inputs, read_image
from imagegen_gateway.inputs import digest as input_digest
from imagegen_gateway.limiter import retry_after_headers
from imagegen_gateway.parsing import GenParams, parse_request
from imagegen_gateway.render import RenderSpec
from imagegen_gateway.responses import (
    DroppedConnection,
    DroppingResponse,
    ImageOut,
    bad_gateway_html,
    completed_event,
    error_response,
    indoxhub_body,
    indoxhub_envelope_failure,
    openai_body,
    partial_event,
    revised_prompt,
    router_body,
)
from imagegen_gateway.rules import InvalidRequest, Operation, rules_for
from imagegen_gateway.state import GatewayState

GENERATION_ROUTES = {
    "/v1/images/generations": "openai",
    "/api/v1/images/generations": "indoxhub",
    "/router/v1/images/generations": "router",
}
EDIT_ROUTE = "/v1/images/edits"
VARIATION_ROUTE = "/v1/images/variations"
#: Every route that makes images (counted in flight).
IMAGE_ROUTES = frozenset({*GENERATION_ROUTES, EDIT_ROUTE, VARIATION_ROUTE})
MODEL_ROUTES = {"/v1/models": "openai", "/api/v1/models": "indoxhub", "/router/v1/models": "router"}
REQUEST_ID = "imagegen.request_id"
# Images at least this big are rendered in a worker thread so the event loop keeps serving.
THREAD_RENDER_PIXELS = 512 * 512

#: Nonces stay below 2**31: the seed range every documented gateway accepts, so it can be replayed anywhere.
UNSEEDED_NONCES = 2**31

CONTENT_POLICY_MESSAGE = "Your request was rejected as a result of our safety system."


def _gateway(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


def _route_label(path: str) -> str:
    if path.startswith("/files/"):
        return "/files"
    if path.startswith(("/v1/files", "/v1/batches")):
        return "/v1/" + path.split("/")[2]
    if path in IMAGE_ROUTES or path in MODEL_ROUTES or path == "/healthz":
        return path
    return "other"


class Instrumentation:
    """Pure ASGI middleware: an ``x-request-id`` on every response, and the wire counters.

    Pure ASGI rather than ``BaseHTTPMiddleware`` so that streamed bodies pass through untouched and a
    deliberately dropped connection still propagates to the server.
    """

    def __init__(self, app: ASGIApp, gateway: GatewayState) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        exchange = _Exchange(send, request_id=uuid.uuid4().hex, counted=not path.startswith("/_gateway"))
        scope[REQUEST_ID] = exchange.request_id
        making_images = path in IMAGE_ROUTES
        self._arrived(path, counted=exchange.counted, making_images=making_images)
        # Counters are read from ``self.gateway.stats`` again at the end: /_gateway/reset swaps the object.
        try:
            await self.app(scope, receive, exchange.send)
        except DroppedConnection:
            self.gateway.stats.dropped_connections += 1
            self.gateway.stats.bytes_served += exchange.sent
            raise
        except Exception:
            if exchange.counted and exchange.status is None:
                self.gateway.stats.by_status[500] += 1
            raise
        else:
            if exchange.counted and exchange.status is not None:
                self.gateway.stats.by_status[exchange.status] += 1
                self.gateway.stats.bytes_served += exchange.sent
        finally:
            if making_images:
                current = self.gateway.stats
                current.in_flight = max(0, current.in_flight - 1)

    def _arrived(self, path: str, *, counted: bool, making_images: bool) -> None:
        stats = self.gateway.stats
        if counted:
            stats.total_requests += 1
            stats.by_route[_route_label(path)] += 1
        if making_images:
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)


class _Exchange:
    """One request's way out: adds the ``x-request-id`` header, notes the status and counts the body bytes."""

    def __init__(self, send: Send, *, request_id: str, counted: bool) -> None:
        self._send = send
        self.request_id = request_id
        self.counted = counted
        self.status: int | None = None
        self.sent = 0

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message["headers"] = [*message.get("headers", []), (b"x-request-id", self.request_id.encode())]
        elif message["type"] == "http.response.body":
            self.sent += len(message.get("body", b""))
        await self._send(message)


# --- auth ---------------------------------------------------------------------------------------------------


def _auth_error(request: Request, dialect: str) -> Response | None:
    """401 unless the request carries an acceptable bearer key. The key is never echoed."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    request_id = request.scope[REQUEST_ID]
    if scheme.lower() != "bearer" or not key:
        return error_response(
            dialect,
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth.",
            code="invalid_api_key",
            request_id=request_id,
        )
    expected = _gateway(request).config.api_key
    if expected is not None and not hmac.compare_digest(key.encode(), expected.encode()):
        return error_response(
            dialect, 401, "Incorrect API key provided", code="invalid_api_key", request_id=request_id
        )
    return None


# --- images -------------------------------------------------------------------------------------------------


def _spec(params: GenParams, index: int) -> RenderSpec:
    return RenderSpec(
        prompt=params.prompt,
        seed=params.seed,
        model=params.bare_model,
        width=params.width,
        height=params.height,
        output_format=params.output_format,
        quality=params.quality,
        style=params.style,
        negative_prompt=params.negative_prompt,
        background=params.background,
        compression=params.compression,
        index=index,
        source=params.source,
    )


async def _render(gateway: GatewayState, spec: RenderSpec) -> bytes:
    """Cached bytes without a thread hop; otherwise render once, however many requests want it at once
    (a benchmark's first burst asks for the same uncached image dozens of times)."""
    while True:
        cached = gateway.renderer.cached(spec)
        if cached is not None:
            return cached
        pending = gateway.rendering.get(spec)
        if pending is None:
            break
        await pending.wait()
    done = gateway.rendering[spec] = anyio.Event()
    try:
        if spec.width * spec.height >= THREAD_RENDER_PIXELS:
            return await anyio.to_thread.run_sync(gateway.renderer, spec)
        return gateway.renderer(spec)
    finally:
        del gateway.rendering[spec]
        done.set()


@functools.lru_cache(maxsize=32)
def _b64(data: bytes) -> str:
    # Cached renders come back as the same bytes object (whose hash Python caches), so benchmarks that ask
    # for one 2 MB image thousands of times encode it once: the gateway must not be what they measure.
    return base64.b64encode(data).decode("ascii")


class _FastJSONResponse(JSONResponse):
    """orjson rendering: a body carrying a 1024x1024 image is ~2.7 MB of JSON."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _partial_specs(params: GenParams, spec: RenderSpec) -> list[RenderSpec]:
    """Partial images are the same picture at lower resolution, growing towards the final one."""
    specs = []
    for index in range(params.partial_images):
        divisor = 2 ** (params.partial_images - index + 1)
        specs.append(replace(spec, width=max(16, spec.width // divisor), height=max(16, spec.height // divisor)))
    return specs


async def _images(request: Request, params: GenParams, *, corrupt: bool) -> list[ImageOut]:
    gateway = _gateway(request)
    return await make_images(gateway, params, base_url=str(request.base_url), corrupt=corrupt)


async def make_images(gateway: GatewayState, params: GenParams, *, base_url: str, corrupt: bool = False
                      ) -> list[ImageOut]:
    """The images of one request, as the sync routes and batch lines both deliver them (same render, same
    bytes). ``base_url``: where URL images are served when no ``public_base_url`` is configured."""
    revised = revised_prompt(params)
    if corrupt:
        # No rendering for a corrupted answer: its bytes can never be decoded anyway.
        return [ImageOut(b64_json=corrupt_base64(f"image-{i}"), revised_prompt=revised) for i in range(params.n)]
    out = []
    for index in range(params.n):
        spec = _spec(params, index)
        data = await _render(gateway, spec)
        if params.response_format == "url" and not params.stream:
            extension = "jpg" if spec.output_format == "jpeg" else spec.output_format
            token = gateway.files.put(data, spec.content_type, extension)
            base = (gateway.config.public_base_url or base_url).rstrip("/")
            out.append(ImageOut(url=f"{base}/files/{token}", revised_prompt=revised))
        else:
            out.append(ImageOut(b64_json=_b64(data), revised_prompt=revised))
    return out


def _usage_payload(params: GenParams, usage: BilledUsage) -> dict[str, Any]:
    if params.dialect == "router":
        return usage.router()
    return usage.openai_gpt() if params.gpt else usage.openai_compatible()


async def _stream_chunks(request: Request, params: GenParams, images: list[ImageOut], created: int) -> list[bytes]:
    """Every SSE event of a streamed response. Each image's partials precede its completed event; each
    completed event carries the usage of the images completed so far, so the last one holds the total."""
    gateway = _gateway(request)
    chunks: list[bytes] = []
    for index, image in enumerate(images):
        for partial_index, spec in enumerate(_partial_specs(params, _spec(params, index))):
            chunks.append(partial_event(params, _b64(await _render(gateway, spec)), partial_index, created))
        usage = billed_usage(params.bare_model, params.prompt, params.width, params.height, params.quality, index + 1)
        chunks.append(completed_event(params, image, _usage_payload(params, usage), created))
    return chunks


def _success_body(
    request: Request, params: GenParams, images: list[ImageOut], usage: BilledUsage, started: float
) -> dict[str, Any]:
    created = int(time.time())
    if params.dialect == "indoxhub":
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        return indoxhub_body(params, images, usage, request.scope[REQUEST_ID], duration_ms)
    if params.dialect == "router":
        return router_body(params, images, usage, created)
    return openai_body(params, images, usage, created)


# --- the generation endpoints: one flow in named stages ---------------------------------------------------

#: A stage that either lets the request go on or answers it.
Refusal = Response | None


async def _read_json(request: Request, dialect: str) -> GenParams | Response:
    """Stage 2 for JSON routes: decode the body, remember it for the stats, resolve its parameters."""
    gateway = _gateway(request)
    try:
        body = json.loads(await request.body())
    except ValueError:
        return _invalid(request, dialect, InvalidRequest("We could not parse the JSON body of your request.",
                                                         None, "invalid_json"))
    gateway.stats.record_body(request.url.path, body)
    try:
        return parse_request(dialect, body, default_response_format=gateway.config.default_response_format)
    except InvalidRequest as exc:
        return _invalid(request, dialect, exc)


def _form_reader(operation: Operation) -> Callable[[Request, str], Awaitable[GenParams | Response]]:
    async def read(request: Request, dialect: str) -> GenParams | Response:
        try:
            return await _read_form(request, dialect, operation)
        except InvalidRequest as exc:
            return _invalid(request, dialect, exc)

    return read


async def _read_form(request: Request, dialect: str, operation: Operation) -> GenParams:
    """Stage 2 for the multipart routes (edits, variations): text fields through the same rules as JSON, then
    the uploaded images, whose fingerprint makes the picture."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
        raise InvalidRequest(f"The upload is larger than {MAX_UPLOAD_BYTES // MB} MB.", "image", "upload_too_large")
    try:
        form = await request.form()
    except (MultiPartException, AssertionError, ValueError) as exc:
        raise InvalidRequest(f"Could not read the multipart body: {exc}", None, "invalid_multipart") from None
    fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    uploads = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
    if sum(upload.size or 0 for _, upload in uploads) > MAX_UPLOAD_BYTES:  # a chunked body declares no length
        raise InvalidRequest(f"The upload is larger than {MAX_UPLOAD_BYTES // MB} MB.", "image", "upload_too_large")
    gateway = _gateway(request)
    gateway.stats.record_body(request.url.path, {**fields, "files": [key for key, _ in uploads]})
    params = parse_request(dialect, fields, default_response_format=gateway.config.default_response_format,
                           operation=operation, form=True)
    images = [read_image(await upload.read(), "image") for key, upload in uploads if _is_image_field(key)]
    masks = [read_image(await upload.read(), "mask") for key, upload in uploads if key == "mask"]
    mask = masks[0] if masks else None
    check_inputs(rules_for(params.model), operation, images, mask)
    return replace(params, source=input_digest(images, mask))


def _is_image_field(key: str) -> bool:
    """``image``, or an array of them as SDKs spell it: ``image[]``, ``image[0]``."""
    return key == "image" or key.startswith("image[")


def _invalid(request: Request, dialect: str, exc: InvalidRequest) -> Response:
    return error_response(dialect, 400, exc.message, code=exc.code, param=exc.param,
                          request_id=request.scope[REQUEST_ID])


def _seeded(gateway: GatewayState, params: GenParams) -> GenParams:
    """A request without a seed gets a per-request nonce (the images of one request differ by their index, and
    repeated requests differ as a real model's do), unless the gateway repeats unseeded images for benchmarks
    (then the seed derived from the prompt stays)."""
    if params.seed_given or gateway.config.repeat_unseeded:
        return params
    return replace(params, seed=secrets.randbelow(UNSEEDED_NONCES))


def _policy_refusal(request: Request, params: GenParams) -> Refusal:
    """Stage 3: a prompt containing the configured trigger word is refused as a content-policy violation."""
    gateway = _gateway(request)
    trigger = gateway.config.content_policy_trigger
    if not trigger or trigger.lower() not in params.prompt.lower():
        return None
    gateway.stats.content_policy_rejections += 1
    return error_response(params.dialect, 400, CONTENT_POLICY_MESSAGE, code="content_policy_violation",
                          param="prompt", request_id=request.scope[REQUEST_ID])


def _rate_limit(request: Request, params: GenParams, headers: dict[str, str]) -> Refusal:
    """Stage 4: take one request and ``n`` image tokens, or answer 429 at once (before any latency). Adds the
    ``x-ratelimit-*`` headers to ``headers`` for every later answer."""
    gateway = _gateway(request)
    config = gateway.config
    if not gateway.limiter.enabled:
        return None
    decision = gateway.limiter.acquire(params.n)
    if config.rate_limit_headers:
        headers.update(decision.headers)
    if decision.allowed:
        return None
    gateway.stats.rate_limited += 1
    refusal_headers = dict(headers)
    if config.retry_after_header:
        refusal_headers.update(retry_after_headers(decision.retry_after))
    unit = "requests" if decision.limit == "requests" else "images"
    return error_response(
        params.dialect, 429,
        f"Rate limit reached for {unit} per minute. Please try again in {decision.retry_after:.3g}s.",
        type_=unit, code="rate_limit_exceeded", request_id=request.scope[REQUEST_ID], headers=refusal_headers,
    )


def _charge(
    request: Request, params: GenParams, usage: BilledUsage, headers: dict[str, str]
) -> Fault | Response | None:
    """Stages 5-6: 402 unless the balance covers the request; then draw the fault, and charge unless a fault
    other than a dropped connection fires. Charged before any ``await``, so concurrent requests can never
    overdraw the balance."""
    gateway = _gateway(request)
    if not gateway.can_afford(usage.cost_usd):
        return error_response(params.dialect, 402, "Insufficient balance", type_="insufficient_quota",
                              code="insufficient_quota", request_id=request.scope[REQUEST_ID], headers=headers)
    fault = gateway.faults.draw(envelope=params.dialect == "indoxhub")
    if fault is None or fault.charges:
        gateway.charge(usage.cost_usd, params.n)
    if fault is not None:
        gateway.stats.faults[fault.value] += 1
    return fault


def _fault_response(request: Request, params: GenParams, fault: Fault | None, headers: dict[str, str],
                    started: float) -> Refusal:
    """Stage 8a: the answer of a fault that replaces the images (502/503/500, IndoxHub's ``success: false``)."""
    request_id: str = request.scope[REQUEST_ID]
    if fault is Fault.BAD_GATEWAY:
        return bad_gateway_html(headers)
    if fault is Fault.UNAVAILABLE:
        return error_response(params.dialect, 503, "The server is overloaded or not ready yet.",
                              type_="server_error", code="service_unavailable", request_id=request_id,
                              headers={**headers, "retry-after": "1"})
    if fault is Fault.SERVER_ERROR:
        return error_response(params.dialect, 500, "The server had an error while processing your request.",
                              type_="server_error", code="internal_error", request_id=request_id, headers=headers)
    if fault is Fault.ENVELOPE_FAILURE:
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        return JSONResponse(indoxhub_envelope_failure(params, request_id, duration_ms), headers=headers)
    return None


async def _deliver(request: Request, params: GenParams, usage: BilledUsage, fault: Fault | None,
                   headers: dict[str, str], started: float) -> Response:
    """Stage 8b: the images, buffered or streamed; a dropped connection sends half of it and aborts."""
    gateway = _gateway(request)
    images = await _images(request, params, corrupt=fault is Fault.CORRUPT_B64)
    if params.stream:
        chunks = await _stream_chunks(request, params, images, int(time.time()))
        if fault is Fault.DROP:
            return DroppingResponse(b"".join(chunks), media_type="text/event-stream", headers=headers)
        response: Response = StreamingResponse(
            iter(chunks), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"}
        )
    else:
        payload = _success_body(request, params, images, usage, started)
        if fault is Fault.DROP:
            return DroppingResponse(orjson.dumps(payload), media_type="application/json", headers=headers)
        response = _FastJSONResponse(payload, headers=headers)
    if fault is None:
        gateway.stats.images_generated += params.n
        gateway.stats.record_accepted()
    return response


Reader = Callable[[Request, str], Awaitable[GenParams | Response]]


async def _serve(request: Request, dialect: str, read: Reader) -> Response:
    """The order of the module docstring: auth, parameters, policy, rate limit, balance and faults, latency,
    then the answer. Requests refused before the rate limit consume no tokens."""
    started = time.perf_counter()
    gateway = _gateway(request)
    gateway.stats.generation_requests += 1
    denied = _auth_error(request, dialect)
    if denied is not None:
        return denied
    params = await read(request, dialect)
    if isinstance(params, Response):
        return params
    params = _seeded(gateway, params)
    headers: dict[str, str] = {}
    refused = _policy_refusal(request, params) or _rate_limit(request, params, headers)
    if refused is not None:
        return refused
    usage = billed_usage(params.bare_model, params.prompt, params.width, params.height, params.quality, params.n)
    fault = _charge(request, params, usage, headers)
    if isinstance(fault, Response):
        return fault
    delay = gateway.faults.latency()
    if delay > 0:
        await anyio.sleep(delay)
    faulty = _fault_response(request, params, fault, headers, started)
    if faulty is not None:
        return faulty
    return await _deliver(request, params, usage, fault, headers, started)


def _endpoint(dialect: str, read: Reader, name: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await _serve(request, dialect, read)

    endpoint.__name__ = name
    return endpoint


# --- the other routes ---------------------------------------------------------------------------------------


async def get_file(request: Request) -> Response:
    """Serve an image handed out as a URL. No auth, like a CDN link: but we record whether the client
    (wrongly) sent its API key along."""
    gateway = _gateway(request)
    gateway.stats.file_requests += 1
    if "authorization" in request.headers:
        gateway.stats.file_requests_with_authorization += 1
    stored = gateway.files.get(request.path_params["token"])
    if stored is None:
        gateway.stats.file_not_found += 1
        return JSONResponse(
            {"error": {"message": "File not found or expired", "type": "invalid_request_error", "code": "not_found"}},
            status_code=404,
        )
    return Response(stored.data, media_type=stored.content_type, headers={"cache-control": "private, max-age=3600"})


async def list_models(request: Request) -> Response:
    dialect = MODEL_ROUTES.get(request.url.path, "openai")
    denied = _auth_error(request, dialect)
    if denied is not None:
        return denied
    models = [
        {"id": model, "object": "model", "created": 0, "owned_by": "imagegen-local-gateway"}
        for model in _gateway(request).config.models
    ]
    return JSONResponse({"object": "list", "data": models})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def stats(request: Request) -> Response:
    return JSONResponse(_gateway(request).snapshot())


async def reset(request: Request) -> Response:
    _gateway(request).reset()
    return JSONResponse({"status": "reset"})


def create_app(config: GatewayConfig | None = None) -> Starlette:
    """The gateway as an ASGI app; ``app.state.gateway`` is its :class:`GatewayState`."""
    gateway = GatewayState(config or GatewayConfig())
    batches, batch_api = batch_routes(gateway, auth=_auth_error, make_images=make_images)
    routes = [
        *batch_api,
        *(Route(path, _endpoint(dialect, _read_json, f"generate_{dialect}"), methods=["POST"])
          for path, dialect in GENERATION_ROUTES.items()),
        Route(EDIT_ROUTE, _endpoint("openai", _form_reader(Operation.EDIT), "edit_openai"), methods=["POST"]),
        Route(VARIATION_ROUTE, _endpoint("openai", _form_reader(Operation.VARIATION), "variation_openai"),
              methods=["POST"]),
        *(Route(path, list_models, methods=["GET"]) for path in MODEL_ROUTES),
        Route("/files/{token}", get_file, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/_gateway/stats", stats, methods=["GET"]),
        Route("/_gateway/reset", reset, methods=["POST"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Instrumentation, gateway=gateway)])
    app.state.gateway = gateway
    app.state.batches = batches
    return app

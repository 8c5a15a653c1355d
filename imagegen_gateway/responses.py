"""Response bodies in each dialect's documented shape, and the responses that misbehave on purpose.

The shapes are those :func:`imagegen_provider.wire.normalize.normalize_response` parses (seeds 000-004);
keeping them here, apart from the request flow, makes it easy to compare the two side by side.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from imagegen_gateway.charges import BilledUsage
from imagegen_gateway.faults import NGINX_502_HTML
from imagegen_gateway.parsing import GenParams
from imagegen_gateway.rules import DALL_E_2, rules_for


class DroppedConnection(httpx.RemoteProtocolError):
    """Raised by the gateway to abort a connection half-way through a response (``drop_rate``).

    Over a real socket uvicorn aborts the connection and the client sees its own transport error (httpx:
    ``RemoteProtocolError``/``ReadError``). Under ``httpx.ASGITransport`` there is no socket: the exception
    itself reaches the client, and since it *is* an ``httpx.RemoteProtocolError`` the client's retry logic
    treats it exactly like the real thing.
    """


@dataclass(frozen=True)
class ImageOut:
    """One generated image as it goes on the wire: base64 or a URL."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


def revised_prompt(params: GenParams) -> str | None:
    """Deterministic stand-in for the model's prompt rewrite; dall-e-2 never rewrites."""
    if rules_for(params.bare_model) is DALL_E_2:
        return None
    return f"{params.prompt} (rendered by imagegen local gateway, seed {params.seed})"


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- errors -----------------------------------------------------------------------------------------------


def error_response(
    dialect: str,
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    request_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error in the dialect's envelope: OpenAI's ``{"error": {...}}`` or IndoxHub's ``success: false``."""
    if dialect == "indoxhub":
        body: dict[str, Any] = {"success": False, "message": message, "request_id": request_id, "code": code}
    else:
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def bad_gateway_html(headers: Mapping[str, str] | None = None) -> Response:
    """What a proxy in front of a dead upstream sends: HTML, not JSON."""
    return Response(NGINX_502_HTML, status_code=502, media_type="text/html", headers=dict(headers or {}))


# --- success bodies ---------------------------------------------------------------------------------------


def _openai_item(image: ImageOut) -> dict[str, Any]:
    item: dict[str, Any] = {"b64_json": image.b64_json} if image.b64_json is not None else {"url": image.url}
    if image.revised_prompt is not None:
        item["revised_prompt"] = image.revised_prompt
    return item


def openai_body(params: GenParams, images: Sequence[ImageOut], usage: BilledUsage, created: int) -> dict[str, Any]:
    """Seeds 001-003. GPT image models add the rendition fields and token usage; others get the zeroed
    chat-style usage of OpenAI-compatible gateways."""
    body: dict[str, Any] = {"created": created, "data": [_openai_item(image) for image in images]}
    if params.gpt:
        body.update(
            size=params.size,
            quality=params.quality,
            output_format=params.output_format,
            background=params.reported_background,
            usage=usage.openai_gpt(),
        )
    else:
        body["usage"] = usage.openai_compatible()
    return body


def router_body(params: GenParams, images: Sequence[ImageOut], usage: BilledUsage, created: int) -> dict[str, Any]:
    """Seed 004: the OpenAI envelope with ``cost`` in ``usage``."""
    return {
        "created": created,
        "model": params.model,
        "data": [_openai_item(image) for image in images],
        "size": params.size,
        "quality": params.quality,
        "output_format": params.output_format,
        "background": params.reported_background,
        "usage": usage.router(),
    }


def indoxhub_body(
    params: GenParams, images: Sequence[ImageOut], usage: BilledUsage, request_id: str, duration_ms: float
) -> dict[str, Any]:
    """Seed 000: IndoxHub's envelope; both ``url`` and ``b64_json`` are present, one of them null."""
    data = []
    for image in images:
        item: dict[str, Any] = {"url": image.url, "b64_json": image.b64_json}
        if image.revised_prompt is not None:
            item["revised_prompt"] = image.revised_prompt
        data.append(item)
    return {
        "request_id": request_id,
        "created_at": iso_now(),
        "duration_ms": duration_ms,
        "provider": params.provider,
        "model": params.bare_model,
        "success": True,
        "message": "",
        "data": data,
        "usage": usage.indoxhub(duration_ms),
    }


def indoxhub_envelope_failure(params: GenParams, request_id: str, duration_ms: float) -> dict[str, Any]:
    """A documented IndoxHub behaviour: HTTP 200, but ``success: false`` and no image."""
    return {
        "request_id": request_id,
        "created_at": iso_now(),
        "duration_ms": duration_ms,
        "provider": params.provider,
        "model": params.bare_model,
        "success": False,
        "message": "Provider error: the upstream provider returned no image",
        "data": [],
        "usage": BilledUsage(0, 0, 0.0).indoxhub(duration_ms),
    }


# --- streaming --------------------------------------------------------------------------------------------

PARTIAL_EVENT = "image_generation.partial_image"
COMPLETED_EVENT = "image_generation.completed"


def sse_event(name: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stream_fields(params: GenParams, created: int) -> dict[str, Any]:
    return {
        "size": params.size,
        "quality": params.quality,
        "background": params.reported_background,
        "output_format": params.output_format,
        "created_at": created,
    }


def partial_event(params: GenParams, b64: str, index: int, created: int) -> bytes:
    return sse_event(
        PARTIAL_EVENT,
        {"type": PARTIAL_EVENT, "b64_json": b64, "partial_image_index": index, **stream_fields(params, created)},
    )


def completed_event(params: GenParams, image: ImageOut, usage: dict[str, Any], created: int) -> bytes:
    data: dict[str, Any] = {"type": COMPLETED_EVENT, "b64_json": image.b64_json, **stream_fields(params, created)}
    if image.revised_prompt is not None:
        data["revised_prompt"] = image.revised_prompt
    data["usage"] = usage
    return sse_event(COMPLETED_EVENT, data)


# --- the dropped connection -------------------------------------------------------------------------------


class DroppingResponse(Response):
    """Announces the full body (status 200, ``content-length``), sends half of it, then aborts."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[: len(self.body) // 2], "more_body": True})
        raise DroppedConnection("imagegen gateway dropped the connection (drop_rate fault injection)")

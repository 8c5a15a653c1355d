"""Turn every documented response shape into one :class:`GenerationResult`.

Shapes handled (unknown extra fields are ignored everywhere):

* OpenAI / aihubmix (seed 003): ``{created, data: [{b64_json|url, revised_prompt}], usage: {input_tokens,
  output_tokens, total_tokens, input_tokens_details, output_tokens_details}, size, quality, ...}``
* OpenAI-compatible gateways (seeds 001, 002): same envelope, ``usage`` absent or ``{prompt_tokens,
  completion_tokens, total_tokens}``
* IndoxHub (seed 000): ``{request_id, success, message, provider, model, duration_ms, data: [...],
  usage: {tokens_prompt, tokens_completion, tokens_total, cost, latency}}``
* Router (seed 004): OpenAI envelope whose ``usage`` may carry ``cost``.
* Streams: ``image_generation.partial_image`` / ``image_generation.completed`` SSE events.
"""

from __future__ import annotations

import binascii
import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import pybase64

from imagegen_provider.wire.errors import GatewayError, MalformedResponseError, excerpt
from imagegen_provider.wire.result import GeneratedImage, GenerationResult, Usage

log = logging.getLogger(__name__)

#: A reported cost above this, per image, is not believed (no documented model costs a tenth of it).
MAX_BELIEVABLE_COST_PER_IMAGE_USD = 1000.0
#: Token counts above this are not believed (the largest documented image uses a few thousand).
MAX_BELIEVABLE_TOKENS = 10_000_000


def loads(body: bytes | str) -> Any:
    """Parse JSON with orjson (a 1024x1024 image is ~2.7 MB of JSON: orjson parses it in about half the time
    of the standard library), falling back to the standard library for what orjson refuses (integers beyond
    64 bits, NaN), which JSON allows. Nesting too deep for either is a :class:`ValueError` like any bad JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            return json.loads(body)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


PARTIAL_EVENT = "image_generation.partial_image"
COMPLETED_EVENT = "image_generation.completed"


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def believable_cost(value: Any, *, field: str, images: int = 1) -> float | None:
    """A reported cost in USD, or ``None`` (unknown, with a warning naming ``field``) when it is not a finite,
    non-negative amount below :data:`MAX_BELIEVABLE_COST_PER_IMAGE_USD` per image. Never summed otherwise."""
    if value is None or value == "":
        return None
    cost = _float(value)
    if cost is None or not math.isfinite(cost) or cost < 0 or cost > MAX_BELIEVABLE_COST_PER_IMAGE_USD * max(1, images):
        log.warning("Ignoring the reported cost in %s: %.60r is not a believable amount in USD", field, value)
        return None
    return cost


def _tokens(value: Any, field: str) -> int | None:
    """A token count, or ``None`` (with a warning naming ``field``) when it is negative or absurd."""
    count = _int(value)
    if count is None:
        if value is not None and not isinstance(value, (int, float, str)):
            log.warning("Ignoring %s: %.60r is not a token count", field, value)
        return None
    if count < 0 or count > MAX_BELIEVABLE_TOKENS:
        log.warning("Ignoring %s: %d is not a believable token count", field, count)
        return None
    return count


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _details(usage: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    details = usage.get(key)
    return details if isinstance(details, Mapping) else {}


def normalize_usage(usage: Any, *, images: int = 1) -> tuple[Usage, float | None]:
    """Canonical :class:`Usage` and the reported cost (USD) from any documented usage shape. Numbers that are
    not believable (NaN, infinite, negative, absurd) are recorded as unknown, with a warning naming the field.

    :param images: images in the response, for the per-image ceiling on the cost.
    """
    if not isinstance(usage, Mapping):
        return Usage(), None
    input_tokens = _first_tokens(usage, "input_tokens", "prompt_tokens", "tokens_prompt")
    output_tokens = _first_tokens(usage, "output_tokens", "completion_tokens", "tokens_completion")
    total = _first_tokens(usage, "total_tokens", "tokens_total")
    if total is None and input_tokens is not None and output_tokens is not None:
        total = input_tokens + output_tokens
    in_details = _details(usage, "input_tokens_details")
    out_details = _details(usage, "output_tokens_details")
    canonical = Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=total,
        input_text_tokens=_tokens(in_details.get("text_tokens"), "usage.input_tokens_details.text_tokens"),
        input_image_tokens=_tokens(in_details.get("image_tokens"), "usage.input_tokens_details.image_tokens"),
        output_text_tokens=_tokens(out_details.get("text_tokens"), "usage.output_tokens_details.text_tokens"),
        output_image_tokens=_tokens(out_details.get("image_tokens"), "usage.output_tokens_details.image_tokens"),
    )
    key = "cost" if usage.get("cost") is not None else "cost_usd"
    return canonical, believable_cost(usage.get(key), field=f"usage.{key}", images=images)


def _first_tokens(usage: Mapping[str, Any], *names: str) -> int | None:
    """The first of ``names`` present in ``usage`` (the three documented spellings), checked."""
    for name in names:
        if usage.get(name) is not None:
            return _tokens(usage.get(name), f"usage.{name}")
    return None


def decode_b64_image(value: str, *, request_id: str | None = None) -> bytes:
    """Strict base64 decode (a ``data:`` URL prefix is tolerated); garbage is a malformed response."""
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        # pybase64 (SIMD) rather than the stdlib: the same strict rules and errors, but a 2 MB image decodes
        # in ~0.25 ms instead of ~10 ms, which was half the client's CPU per image (bench overhead case).
        data = pybase64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedResponseError("bad base64 in b64_json", request_id=request_id) from None
    if not data:
        raise MalformedResponseError("empty b64_json", request_id=request_id)
    return data


def _image(item: Any, index: int, request_id: str | None) -> GeneratedImage:
    if not isinstance(item, Mapping):
        raise MalformedResponseError(f"data[{index}] is not an object", request_id=request_id)
    b64 = _str(item.get("b64_json"))
    url = _str(item.get("url"))
    revised = _str(item.get("revised_prompt"))
    if b64:
        return GeneratedImage(data=decode_b64_image(b64, request_id=request_id), url=url, revised_prompt=revised)
    if url and url[:5].lower() == "data:":
        # An inline image in ``url`` (some gateways do this): decoded and verified like b64_json, never fetched.
        header = url.partition(",")[0].lower()
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            raise MalformedResponseError(
                f"data[{index}].url is a data: URL but not a base64 image", request_id=request_id
            )
        return GeneratedImage(data=decode_b64_image(url, request_id=request_id), revised_prompt=revised)
    if url:
        return GeneratedImage(url=url, revised_prompt=revised)
    raise MalformedResponseError(f"data[{index}] has neither b64_json nor url", request_id=request_id)


def _request_id(payload: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    return (
        _str(payload.get("request_id"))
        or _str(payload.get("id"))
        or _header_request_id(headers)
    )


def _header_request_id(headers: Mapping[str, str]) -> str | None:
    # LiteLLM proxies name the call in x-litellm-call-id; x-request-id wins when both are there.
    names = ("x-request-id", "request-id", "x-litellm-call-id")
    return next((value for value in (_str(headers.get(name)) for name in names) if value), None)


def _reported_cost(body_cost: float | None, headers: Mapping[str, str], images: int) -> float | None:
    """The body's cost, else a LiteLLM proxy's ``x-litellm-response-cost`` header (as untrusted as the body)."""
    if body_cost is not None:
        return body_cost
    return believable_cost(headers.get("x-litellm-response-cost"), field="x-litellm-response-cost header",
                           images=images)


def normalize_response(
    body: bytes | str | Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    secrets: Iterable[str | None] = (),
) -> GenerationResult:
    """Normalise a 200 response body of any dialect.

    :raises MalformedResponseError: not JSON, not an object, no images, bad base64.
    :raises GatewayError: a 200 whose envelope says ``success: false`` (IndoxHub).
    """
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    if isinstance(body, Mapping):
        payload: Any = body
    else:
        try:
            payload = loads(body)
        except ValueError:
            raise MalformedResponseError(
                "body is not JSON",
                request_id=_str(headers.get("x-request-id")),
                body_excerpt=excerpt(body, secrets),
            ) from None
    if not isinstance(payload, Mapping):
        raise MalformedResponseError("body is not a JSON object", body_excerpt=excerpt(json.dumps(payload), secrets))
    request_id = _request_id(payload, headers)

    if payload.get("success") is False:
        message = excerpt(_str(payload.get("message")) or "gateway reported success=false", secrets)
        raise GatewayError(
            message, status=200, request_id=request_id, body_excerpt=excerpt(json.dumps(payload)[:2000], secrets)
        )

    data = payload.get("data")
    if not isinstance(data, list) or not data:
        raise MalformedResponseError(
            "no data in response", request_id=request_id, body_excerpt=excerpt(json.dumps(payload)[:2000], secrets)
        )
    images = [_image(item, index, request_id) for index, item in enumerate(data)]
    usage, cost = normalize_usage(payload.get("usage"), images=len(images))
    return GenerationResult(
        images=images,
        usage=usage,
        reported_cost_usd=_reported_cost(cost, headers, len(images)),
        request_id=request_id,
        provider=_str(payload.get("provider")) or _str(headers.get("x-provider")),
        model=_str(payload.get("model")),
        created=_int(payload.get("created")),
        output_format=_str(payload.get("output_format")),
        size=_str(payload.get("size")),
        quality=_str(payload.get("quality")),
        background=_str(payload.get("background")),
    )


class StreamAssembler:
    """Builds the result of a ``stream=true`` response one SSE event at a time, so that nothing but the final
    image(s) (and the partial images, only when asked for) is held while the stream lasts.

    The final image(s) come from ``image_generation.completed``; an ``error`` event, or a stream that ends
    without a completed image, is an error.
    """

    def __init__(
        self,
        *,
        headers: Mapping[str, str] | None = None,
        keep_partials: bool = False,
        secrets: Iterable[str | None] = (),
    ) -> None:
        self._headers = {k.lower(): v for k, v in (headers or {}).items()}
        self._request_id = _header_request_id(self._headers)
        self._keep_partials = keep_partials
        self._secrets = list(secrets)
        self._images: list[GeneratedImage] = []
        self._partials: list[bytes] = []
        self._usage: Any = None
        self._last: Mapping[str, Any] = {}

    def feed(self, name: str, raw: str) -> None:
        """One event: its name and its data."""
        if not raw or raw.strip() == "[DONE]":
            return
        try:
            event = loads(raw)
        except ValueError:
            shown = excerpt(name, self._secrets, limit=40)
            raise MalformedResponseError(f"stream event {shown!r} is not JSON", request_id=self._request_id) from None
        if not isinstance(event, Mapping):
            return
        kind = _str(event.get("type")) or name
        if kind == "error" or ("error" in event and kind not in (PARTIAL_EVENT, COMPLETED_EVENT)):
            inner = event.get("error")
            error: Mapping[str, Any] = inner if isinstance(inner, Mapping) else event
            message = _str(error.get("message")) or "error event in stream"
            raise GatewayError(excerpt(message, self._secrets), status=200, request_id=self._request_id)
        if kind == PARTIAL_EVENT:
            if self._keep_partials and _str(event.get("b64_json")):
                self._partials.append(decode_b64_image(event["b64_json"], request_id=self._request_id))
        elif kind == COMPLETED_EVENT:
            self._completed(event)

    def _completed(self, event: Mapping[str, Any]) -> None:
        b64 = _str(event.get("b64_json"))
        if not b64:
            raise MalformedResponseError("completed event without b64_json", request_id=self._request_id)
        self._images.append(GeneratedImage(data=decode_b64_image(b64, request_id=self._request_id),
                                           revised_prompt=_str(event.get("revised_prompt"))))
        if "usage" in event:
            self._usage = event.get("usage")
        self._last = event

    def result(self) -> GenerationResult:
        if not self._images:
            raise MalformedResponseError(
                "stream ended without an image_generation.completed event", request_id=self._request_id
            )
        usage, cost = normalize_usage(self._usage, images=len(self._images))
        last = self._last
        return GenerationResult(
            images=self._images,
            usage=usage,
            reported_cost_usd=_reported_cost(cost, self._headers, len(self._images)),
            request_id=self._request_id,
            created=_int(last.get("created_at")),
            output_format=_str(last.get("output_format")),
            size=_str(last.get("size")),
            quality=_str(last.get("quality")),
            background=_str(last.get("background")),
            partial_images=self._partials,
        )


def normalize_stream(
    events: Iterable[tuple[str, str]],
    *,
    headers: Mapping[str, str] | None = None,
    keep_partials: bool = False,
    secrets: Iterable[str | None] = (),
) -> GenerationResult:
    """Normalise the SSE events of a ``stream=true`` response: ``(event name, data)`` pairs."""
    assembler = StreamAssembler(headers=headers, keep_partials=keep_partials, secrets=secrets)
    for name, raw in events:
        assembler.feed(name, raw)
    return assembler.result()

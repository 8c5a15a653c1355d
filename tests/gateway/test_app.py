"""The bundled gateway, end to end: each dialect's shape as the client's normaliser reads it, auth, money,
rate limits, faults, streaming, URL images and the stats side door.

Most tests go through ``httpx.ASGITransport`` (fast, no sockets); the ones about connections and the CLI use
a real loopback socket.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse
from PIL import Image

from imagegen_gateway import (
    GatewayConfig,
    add_gateway_arguments,
    config_from_args,
    create_app,
    run_gateway_in_thread,
)
from imagegen_gateway.config import parse_latency
from imagegen_gateway.limiter import FixedWindow, GatewayLimiter, SlidingWindow, TokenBucket, format_duration
from imagegen_gateway.responses import DroppedConnection
from imagegen_provider.wire.errors import (
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    ContentPolicyError,
    GatewayError,
    InsufficientBalanceError,
    MalformedResponseError,
    RateLimitError,
    ServerError,
    error_from_response,
)
from imagegen_provider.wire.normalize import normalize_response, normalize_stream
from imagegen_provider.wire.result import GenerationResult

KEY = "sk-test-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPENAI = "/v1/images/generations"
INDOXHUB = "/api/v1/images/generations"
ROUTER = "/router/v1/images/generations"


@asynccontextmanager
async def gateway(**options: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewayConfig(**options))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test", headers=AUTH) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


def image_of(data: bytes | None) -> Image.Image:
    assert data is not None
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def parse(response: httpx.Response) -> GenerationResult:
    assert response.status_code == 200, response.text
    return normalize_response(response.content, headers=response.headers)


def error_of(response: httpx.Response) -> GatewayError:
    retry_after = response.headers.get("retry-after")
    return error_from_response(
        response.status_code,
        response.content,
        request_id=response.headers.get("x-request-id"),
        retry_after=float(retry_after) if retry_after else None,
    )


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    counters: dict[str, Any] = (await client.get("/_gateway/stats")).json()
    return counters


def text(value: str | None) -> str:
    """A field the response must carry."""
    assert value is not None
    return value


# --- dialect shapes -----------------------------------------------------------------------------------------


async def test_openai_default_model_returns_a_url_like_openai() -> None:
    async with gateway() as client:
        response = await client.post(OPENAI, json={"prompt": "a lighthouse"})
        body = response.json()
        assert set(body) == {"created", "data", "usage"}
        assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        assert "revised_prompt" not in body["data"][0]  # dall-e-2 never rewrites prompts
        result = parse(response)
        assert result.request_id == response.headers["x-request-id"]
        (image,) = result.images
        assert image.data is None and text(image.url).startswith("http://gateway.test/files/")
        download = await client.get(text(image.url), headers={"Authorization": ""})
        assert download.status_code == 200 and download.headers["content-type"] == "image/png"
        assert image_of(download.content).size == (1024, 1024)


async def test_openai_gpt_image_shape_tokens_and_format() -> None:
    async with gateway() as client:
        response = await client.post(
            OPENAI,
            json={"prompt": "a" * 40, "model": "gpt-image-1", "size": "1536x1024", "quality": "high",
                  "output_format": "jpeg", "output_compression": 70, "n": 2},
        )
        body = response.json()
        assert (body["size"], body["quality"], body["output_format"], body["background"]) == (
            "1536x1024", "high", "jpeg", "opaque",
        )
        # OpenAI's image-token table (in the engine's prices.json): 1536x1024 high is 6208 tokens.
        assert body["usage"]["output_tokens_details"] == {"image_tokens": 2 * 6208, "text_tokens": 0}
        result = parse(response)
        assert result.usage.input_tokens == 10 and result.usage.output_tokens == 12416
        assert result.usage.total_tokens == 12426
        assert len(result.images) == 2 and result.images[0].data != result.images[1].data
        for generated in result.images:
            # GPT image models always return base64
            assert generated.url is None and "seed" in text(generated.revised_prompt)
            image = image_of(generated.data)
            assert (image.format, image.size) == ("JPEG", (1536, 1024))


@pytest.mark.parametrize(
    ("size", "quality", "tokens"),
    [("1024x1024", "low", 272), ("1024x1024", None, 1056), ("1024x1536", "medium", 1584), ("auto", "auto", 1056),
     ("1536x1024", "high", 6208)],
)
async def test_gpt_image_output_tokens(size: str, quality: str | None, tokens: int) -> None:
    async with gateway() as client:
        body = {"prompt": "p", "model": "openai/gpt-image-1", "size": size}
        if quality:
            body["quality"] = quality
        result = parse(await client.post(OPENAI, json=body))
        assert result.usage.output_image_tokens == tokens


async def test_openai_b64_for_dalle3_with_revised_prompt() -> None:
    async with gateway(default_response_format="b64_json") as client:
        result = parse(await client.post(OPENAI, json={"prompt": "a harbour", "model": "dall-e-3",
                                                      "size": "1792x1024", "style": "natural"}))
        (image,) = result.images
        assert image_of(image.data).size == (1792, 1024)
        assert text(image.revised_prompt).startswith("a harbour (rendered by imagegen local gateway, seed ")


async def test_indoxhub_envelope() -> None:
    async with gateway() as client:
        response = await client.post(
            INDOXHUB,
            json={"model": "openai/dall-e-3", "prompt": "mountains", "n": 1, "response_format": "b64_json",
                  "byok_api_key": "sk-provider-secret-999",
                  "additional_params": {"seed": 7, "aspect_ratio": "16:9", "output_format": "webp"}},
        )
        body = response.json()
        assert body["success"] is True and body["message"] == ""
        assert (body["provider"], body["model"]) == ("openai", "dall-e-3")
        assert body["request_id"] == response.headers["x-request-id"]
        assert body["data"][0]["url"] is None
        assert body["usage"]["cost"] == 0.04 and body["usage"]["latency"] == body["duration_ms"]
        assert body["created_at"].endswith("Z")
        result = parse(response)
        assert result.reported_cost_usd == 0.04 and result.provider == "openai"
        image = image_of(result.images[0].data)
        assert (image.format, image.size) == ("WEBP", (1024, 576))


async def test_indoxhub_provider_field_and_url_default() -> None:
    async with gateway() as client:
        response = await client.post(INDOXHUB, json={"model": "imagen-3", "provider": "google", "prompt": "x"})
        body = response.json()
        assert (body["provider"], body["model"]) == ("google", "imagen-3")
        assert body["data"][0]["b64_json"] is None
        assert (await client.get(body["data"][0]["url"])).status_code == 200
        assert body["usage"]["cost"] == 0.04  # imagen-3's list price in the engine's prices.json


async def test_router_tier_and_ratio_b64_by_default_with_cost() -> None:
    async with gateway() as client:
        response = await client.post(
            ROUTER,
            json={"model": "google/imagen-4", "prompt": "a city", "size": "2K", "aspect_ratio": "9:16",
                  "provider": {"order": ["google"]}, "seed": 5, "output_format": "png"},
        )
        body = response.json()
        assert set(body["usage"]) == {"input_tokens", "output_tokens", "total_tokens", "cost"}
        result = parse(response)
        assert result.reported_cost_usd == 0.04  # imagen-4's list price in the engine's prices.json
        assert image_of(result.images[0].data).size == (1152, 2048)


async def test_router_gpt_image_cost_by_tokens() -> None:
    async with gateway() as client:
        result = parse(await client.post(ROUTER, json={"model": "openai/gpt-image-1", "prompt": "abcd" * 100,
                                                       "resolution": "1K", "quality": "low"}))
        assert result.usage.input_tokens == 100 and result.usage.output_tokens == 272
        assert result.reported_cost_usd == round(100 * 5e-6 + 272 * 40e-6, 6)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": "x", "size": "1024x1024", "resolution": "2K"},
        {"model": "m", "prompt": "x", "size": "1024x1024", "aspect_ratio": "16:9"},
        {"model": "m", "prompt": "x", "size": "4K", "resolution": "2K"},
        {"prompt": "x"},
    ],
)
async def test_router_rejects_conflicts_and_missing_model(body: dict[str, Any]) -> None:
    async with gateway() as client:
        response = await client.post(ROUTER, json=body)
        assert response.status_code == 400
        assert isinstance(error_of(response), BadRequestError)


# --- determinism --------------------------------------------------------------------------------------------


async def _b64_images(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[bytes | None]:
    return [image.data for image in parse(await client.post(path, json=body)).images]


async def test_unseeded_requests_get_a_fresh_31_bit_nonce() -> None:
    body = {"model": "dall-e-3", "prompt": "a quiet lake", "response_format": "b64_json"}
    async with gateway() as client:
        seeds = set()
        for _ in range(3):
            revised = parse(await client.post(OPENAI, json=body)).images[0].revised_prompt
            assert revised is not None
            seeds.add(int(re.search(r"seed (\d+)", revised).group(1)))  # type: ignore[union-attr]
        assert len(seeds) == 3 and all(0 <= seed < 2**31 for seed in seeds)


async def test_repeat_unseeded_derives_the_seed_from_the_prompt() -> None:
    body = {"model": "dall-e-2", "prompt": "a quiet lake", "size": "256x256", "response_format": "b64_json"}
    async with gateway(repeat_unseeded=True) as first, gateway(repeat_unseeded=True) as second:
        assert await _b64_images(first, OPENAI, body) == await _b64_images(second, OPENAI, body)
        assert (await stats(first))["render_cache"] == {"hits": 0, "misses": 1}
        await _b64_images(first, OPENAI, body)
        assert (await stats(first))["render_cache"]["hits"] == 1


async def test_same_params_same_bytes_other_seed_other_bytes() -> None:
    body = {"model": "gpt-image-1", "prompt": "a quiet lake", "seed": 11, "size": "1024x1024", "n": 2}
    async with gateway() as first, gateway() as second:
        a = await _b64_images(first, OPENAI, body)
        assert a == await _b64_images(second, OPENAI, body)
        assert a[0] != a[1]  # images of one request differ
        assert await _b64_images(first, OPENAI, {**body, "seed": 12}) != a
        # No seed: a fresh nonce per request, so repeated requests differ as a real model's do.
        unseeded = {k: v for k, v in body.items() if k != "seed"}
        assert await _b64_images(first, OPENAI, unseeded) != await _b64_images(first, OPENAI, unseeded)
        # The same picture whichever dialect asked for it.
        router = await _b64_images(first, ROUTER, {**body, "model": "openai/gpt-image-1"})
        assert router == a


# --- URL images -----------------------------------------------------------------------------------------------


async def test_url_images_expire_and_authorization_is_counted() -> None:
    async with gateway(url_ttl_seconds=0.2) as client:
        result = parse(await client.post(OPENAI, json={"prompt": "x", "model": "dall-e-3", "response_format": "url"}))
        url = text(result.images[0].url)
        async with httpx.AsyncClient(transport=client._transport) as anonymous:
            assert (await anonymous.get(url)).status_code == 200
        counters = await stats(client)
        assert (counters["file_requests"], counters["file_requests_with_authorization"]) == (1, 0)
        assert (await client.get(url)).status_code == 200  # this client sends its key along: counted
        assert (await stats(client))["file_requests_with_authorization"] == 1
        await anyio.sleep(0.25)
        assert (await client.get(url)).status_code == 404
        assert (await client.get("/files/unknown.png")).status_code == 404
        assert (await stats(client))["file_not_found"] == 2


async def test_url_store_is_bounded() -> None:
    async with gateway(url_cache_size=2) as client:
        urls = []
        for i in range(3):
            result = parse(await client.post(OPENAI, json={"prompt": f"p{i}", "size": "256x256"}))
            urls.append(text(result.images[0].url))
        statuses = [(await client.get(url)).status_code for url in urls]
        assert statuses == [404, 200, 200]


async def test_public_base_url() -> None:
    async with gateway(public_base_url="https://cdn.example.com/") as client:
        result = parse(await client.post(OPENAI, json={"prompt": "x", "size": "256x256"}))
        assert text(result.images[0].url).startswith("https://cdn.example.com/files/")


# --- auth, money, validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [OPENAI, INDOXHUB, ROUTER, "/v1/models"])
async def test_missing_key_is_401_on_every_route(path: str) -> None:
    async with gateway() as client:
        no_key = {"Authorization": ""}
        if path.endswith("models"):
            response = await client.get(path, headers=no_key)
        else:
            response = await client.post(path, headers=no_key, json={"prompt": "x", "model": "m"})
        assert response.status_code == 401
        assert isinstance(error_of(response), AuthenticationError)


async def test_wrong_key_is_401_and_never_echoed() -> None:
    async with gateway(api_key="sk-right-key-123456") as client:
        response = await client.post(OPENAI, json={"prompt": "x"})
        assert response.status_code == 401
        assert response.json() == {"error": {"message": "Incorrect API key provided",
                                             "type": "invalid_request_error", "param": None,
                                             "code": "invalid_api_key"}}
        assert KEY not in response.text
        indox = await client.post(INDOXHUB, json={"prompt": "x"})
        assert indox.status_code == 401 and indox.json()["success"] is False
        assert indox.json()["request_id"] == indox.headers["x-request-id"]
        ok = await client.post(OPENAI, json={"prompt": "x", "size": "256x256"},
                               headers={"Authorization": "Bearer sk-right-key-123456"})
        assert ok.status_code == 200


async def test_balance_is_charged_and_402_when_exhausted() -> None:
    async with gateway(balance_usd=0.1) as client:
        body = {"prompt": "x", "model": "dall-e-3", "response_format": "b64_json"}
        assert (await client.post(OPENAI, json=body)).status_code == 200  # 0.04
        assert (await client.post(OPENAI, json={**body, "quality": "hd"})).status_code == 402  # 0.08 > 0.06
        response = await client.post(OPENAI, json=body)  # 0.04 fits
        assert response.status_code == 200
        response = await client.post(OPENAI, json=body)
        assert response.status_code == 402
        assert response.json()["error"]["code"] == "insufficient_quota"
        assert isinstance(error_of(response), InsufficientBalanceError)
        counters = await stats(client)
        assert counters["balance_usd"] == pytest.approx(0.02)
        assert counters["spent_usd"] == pytest.approx(0.08)
        assert counters["charged_images"] == counters["images_generated"] == 2


@pytest.mark.parametrize("path", [OPENAI, INDOXHUB, ROUTER])
async def test_content_policy_violation(path: str) -> None:
    async with gateway() as client:
        response = await client.post(path, json={"model": "dall-e-3", "prompt": "some FORBIDDEN-CONTENT here"})
        assert response.status_code == 400
        error = error_of(response)
        assert isinstance(error, ContentPolicyError)
        if path != INDOXHUB:
            assert response.json()["error"]["code"] == "content_policy_violation"
        assert (await stats(client))["charged_images"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompt": ""},
        {"prompt": "   "},
        {"prompt": 12},
        {"prompt": "x", "n": 0},
        {"prompt": "x", "n": 11},
        {"prompt": "x", "n": "2"},
        {"prompt": "x", "model": "dall-e-3", "n": 2},
        {"prompt": "x", "size": "big"},
        {"prompt": "x", "size": "100000x10"},
        {"prompt": "x", "response_format": "jpeg"},
        {"prompt": "x", "output_format": "gif"},
        {"prompt": "x", "model": "dall-e-2", "stream": True},
    ],
)
async def test_generic_validation_is_400(body: dict[str, Any]) -> None:
    async with gateway() as client:
        response = await client.post(OPENAI, json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


async def test_invalid_json_and_unknown_fields() -> None:
    async with gateway() as client:
        response = await client.post(OPENAI, content=b"{nope", headers={"content-type": "application/json"})
        assert response.status_code == 400
        ok = await client.post(OPENAI, json={"prompt": "x", "size": "256x256", "whatever": {"a": 1}, "user": "u"})
        assert ok.status_code == 200


# --- rate limits ----------------------------------------------------------------------------------------------


async def test_rpm_429_with_retry_after_and_ratelimit_headers() -> None:
    async with gateway(rpm=60, burst=2) as client:
        body = {"prompt": "x", "size": "256x256"}
        first = await client.post(OPENAI, json=body)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "60"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert re.fullmatch(r"\d+ms|1s", first.headers["x-ratelimit-reset-requests"])
        assert (await client.post(OPENAI, json=body)).status_code == 200
        limited = await client.post(OPENAI, json=body)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "1"
        assert 900 <= int(limited.headers["retry-after-ms"]) <= 1000
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
        assert "x-ratelimit-limit-images" not in limited.headers
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        error = error_of(limited)
        assert isinstance(error, RateLimitError) and error.retry_after == 1.0
        counters = await stats(client)
        assert counters["rate_limited"] == 1 and counters["by_status"] == {"200": 2, "429": 1}
        assert sum(count for _, count in counters["accepted_timeline"]) == 2


async def test_ipm_counts_n_and_reports_image_headers() -> None:
    async with gateway(ipm=60, image_burst=3) as client:
        body = {"prompt": "x", "size": "256x256", "n": 2, "response_format": "b64_json"}
        ok = await client.post(OPENAI, json=body)
        assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-images"] == "1"
        assert "x-ratelimit-limit-requests" not in ok.headers
        limited = await client.post(OPENAI, json=body)
        assert limited.status_code == 429
        assert "images" in limited.json()["error"]["message"]
        assert limited.headers["x-ratelimit-limit-images"] == "60"
        # More images than the bucket holds must wait until it is full again.
        limited_big = await client.post(OPENAI, json={**body, "n": 5})
        assert limited_big.status_code == 429


async def test_hidden_limits_and_no_retry_after() -> None:
    async with gateway(rpm=1, rate_limit_headers=False) as client:
        body = {"prompt": "x", "size": "256x256"}
        ok = await client.post(OPENAI, json=body)
        assert not any(h.startswith("x-ratelimit") for h in ok.headers)
        limited = await client.post(OPENAI, json=body)
        assert limited.status_code == 429
        assert not any(h.startswith("x-ratelimit") for h in limited.headers)
        assert 55 <= int(limited.headers["retry-after"]) <= 60
    async with gateway(rpm=1, retry_after_header=False) as client:
        await client.post(OPENAI, json=body)
        limited = await client.post(OPENAI, json=body)
        assert limited.status_code == 429
        assert "retry-after" not in limited.headers and "retry-after-ms" not in limited.headers
        assert "x-ratelimit-reset-requests" in limited.headers


async def test_429_comes_before_latency_and_faults() -> None:
    async with gateway(rpm=1, latency=0.3, fail_500_rate=1.0) as client:
        assert (await client.post(OPENAI, json={"prompt": "x"})).status_code == 500
        start = time.perf_counter()
        assert (await client.post(OPENAI, json={"prompt": "x"})).status_code == 429
        assert time.perf_counter() - start < 0.2


def test_token_bucket_refills_with_a_fake_clock() -> None:
    now = [100.0]
    bucket = TokenBucket(per_minute=120, capacity=None, clock=lambda: now[0])
    assert bucket.capacity == 2 and bucket.remaining == 2
    bucket.take(2)
    assert bucket.wait_time(1) == pytest.approx(0.5)
    now[0] += 0.5
    assert bucket.wait_time(1) == 0 and bucket.remaining == 1
    assert bucket.time_to_full == pytest.approx(0.5)
    limiter = GatewayLimiter(rpm=60, ipm=60, clock=lambda: now[0])
    assert limiter.acquire(1).allowed
    refused = limiter.acquire(1)
    assert not refused.allowed and refused.retry_after == pytest.approx(1.0)
    assert refused.headers["x-ratelimit-remaining-images"] == "0"


def test_sliding_window_counts_accepted_requests_over_60_seconds() -> None:
    now = [1000.0]
    window = SlidingWindow(per_minute=3, clock=lambda: now[0])
    for step in range(3):
        now[0] = 1000.0 + step * 10
        assert window.wait_time(1) == 0
        window.take(1)
    assert window.remaining == 0
    # The first request leaves the window 60 s after it was taken.
    assert window.wait_time(1) == pytest.approx(40.0)
    now[0] = 1060.0
    assert window.wait_time(1) == 0 and window.remaining == 1
    # A refusal is not counted: the limiter leaves a sliding window alone.
    limiter = GatewayLimiter(rpm=1, shape="sliding-window", clock=lambda: now[0])
    assert limiter.acquire().allowed
    for _ in range(5):
        assert not limiter.acquire().allowed
    now[0] += 60.0
    assert limiter.acquire().allowed


def test_fixed_window_resets_at_the_calendar_minute_and_counts_refusals() -> None:
    now = [6000.0 + 50.0]  # 50 s into a calendar minute
    limiter = GatewayLimiter(rpm=2, shape="fixed-window", clock=lambda: now[0])
    assert limiter.acquire().allowed and limiter.acquire().allowed
    refused = limiter.acquire()
    assert not refused.allowed and refused.retry_after == pytest.approx(10.0)
    assert limiter.requests is not None and limiter.requests.remaining == 0
    now[0] = 6060.0  # :00 of the next minute: the whole capacity again, whatever was refused before
    assert limiter.acquire().allowed and limiter.acquire().allowed
    assert not limiter.acquire().allowed
    # Refused requests were counted too (the counter is past capacity), as LiteLLM's proxy counts them.
    window = limiter.requests
    assert isinstance(window, FixedWindow) and window._count == 3


async def test_fixed_window_without_headers_sends_neither_retry_after_nor_ratelimit_headers() -> None:
    async with gateway(rpm=1, limiter="fixed-window", rate_limit_headers=False, retry_after_header=False) as client:
        assert (await client.post(OPENAI, json={"prompt": "x"})).status_code == 200
        refused = await client.post(OPENAI, json={"prompt": "x"})
        assert refused.status_code == 429
        assert "retry-after" not in refused.headers and "retry-after-ms" not in refused.headers
        assert not [h for h in refused.headers if h.startswith("x-ratelimit")]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.02, "20ms"), (0.9999, "1s"), (1.5, "1.5s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --- faults ---------------------------------------------------------------------------------------------------


async def test_502_is_an_nginx_html_page() -> None:
    async with gateway(fail_502_rate=1.0, balance_usd=1.0) as client:
        response = await client.post(OPENAI, json={"prompt": "x"})
        assert response.status_code == 502
        assert response.headers["content-type"].startswith("text/html")
        assert "<h1>502 Bad Gateway</h1>" in response.text and "nginx" in response.text
        assert isinstance(error_of(response), BadGatewayError)
        counters = await stats(client)
        assert counters["balance_usd"] == 1.0 and counters["charged_images"] == 0
        assert counters["images_generated"] == 0 and counters["faults"] == {"502": 1}


@pytest.mark.parametrize(("rate", "status"), [("fail_503_rate", 503), ("fail_500_rate", 500)])
async def test_server_errors(rate: str, status: int) -> None:
    async with gateway(**{rate: 1.0}) as client:
        response = await client.post(OPENAI, json={"prompt": "x"})
        assert response.status_code == status
        assert response.json()["error"]["type"] == "server_error"
        assert isinstance(error_of(response), ServerError)
        if status == 503:
            assert response.headers["retry-after"] == "1"
        indox = await client.post(INDOXHUB, json={"prompt": "x"})
        assert indox.status_code == status and indox.json()["success"] is False


async def test_corrupt_base64_is_a_malformed_200() -> None:
    async with gateway(corrupt_b64_rate=1.0) as client:
        response = await client.post(OPENAI, json={"prompt": "x", "model": "gpt-image-1"})
        assert response.status_code == 200
        with pytest.raises(MalformedResponseError, match="base64"):
            normalize_response(response.content, headers=response.headers)
        counters = await stats(client)
        assert counters["charged_images"] == 0 and counters["images_generated"] == 0


async def test_indoxhub_envelope_failure() -> None:
    async with gateway(envelope_failure_rate=1.0) as client:
        response = await client.post(INDOXHUB, json={"prompt": "x"})
        assert response.status_code == 200 and response.json()["success"] is False
        with pytest.raises(GatewayError) as caught:
            normalize_response(response.content, headers=response.headers)
        assert caught.value.status == 200
        # The other dialects cannot express it: they are served normally.
        assert (await client.post(OPENAI, json={"prompt": "x", "size": "256x256"})).status_code == 200


async def test_dropped_connection_under_asgi_transport_is_an_httpx_transport_error() -> None:
    async with gateway(drop_rate=1.0, balance_usd=1.0) as client:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.post(OPENAI, json={"prompt": "x", "model": "dall-e-3"})
        assert isinstance(caught.value, DroppedConnection)
        counters = await stats(client)
        # Generated and charged, but never delivered: a retry pays again.
        assert counters["charged_images"] == 1 and counters["images_generated"] == 0
        assert counters["balance_usd"] == pytest.approx(0.96)
        assert counters["dropped_connections"] == 1


async def test_fault_seed_makes_the_fault_sequence_reproducible() -> None:
    options = {"fail_502_rate": 0.3, "fail_500_rate": 0.3, "fault_seed": 1234}
    body = {"prompt": "x", "size": "256x256"}
    sequences = []
    async with gateway(**options) as first, gateway(**options) as second:
        for client in (first, second, first):
            sequences.append([(await client.post(OPENAI, json=body)).status_code for _ in range(20)])
            await client.post("/_gateway/reset")
    assert sequences[0] == sequences[1] == sequences[2]
    assert len(set(sequences[0])) == 3


async def test_latency_is_applied() -> None:
    async with gateway(latency=(0.1, 0.15)) as client:
        start = time.perf_counter()
        assert (await client.post(OPENAI, json={"prompt": "x", "size": "256x256"})).status_code == 200
        assert time.perf_counter() - start >= 0.1


# --- real sockets ---------------------------------------------------------------------------------------------


def test_dropped_connection_over_a_real_socket() -> None:
    with run_gateway_in_thread(GatewayConfig(drop_rate=1.0)) as handle:
        assert handle.base_url == f"http://127.0.0.1:{handle.port}"
        with httpx.Client(base_url=handle.base_url, headers=AUTH) as client:
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                client.post(OPENAI, json={"prompt": "x", "model": "gpt-image-1", "size": "1024x1024"})
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                client.post(ROUTER, json={"prompt": "x", "model": "m", "stream": True, "partial_images": 1})
            # The server survives its own sabotage.
            assert client.get("/healthz").json() == {"status": "ok"}
        counters = handle.stats()
        assert counters["dropped_connections"] == 2 and counters["charged_images"] == 2


async def test_real_socket_round_trip_and_url_download() -> None:
    with run_gateway_in_thread(GatewayConfig(rpm=600, burst=5)) as handle:
        async with httpx.AsyncClient(base_url=handle.base_url, headers=AUTH) as client:
            response = await client.post(INDOXHUB, json={"prompt": "x", "model": "openai/dall-e-2",
                                                         "size": "512x512"})
            result = parse(response)
            assert response.headers["x-ratelimit-limit-requests"] == "600"
            assert text(result.images[0].url).startswith(handle.base_url + "/files/")
            async with httpx.AsyncClient() as downloader:
                image = await downloader.get(text(result.images[0].url))
            assert image_of(image.content).size == (512, 512)
            models = (await client.get("/v1/models")).json()
            assert "gpt-image-1" in [m["id"] for m in models["data"]]
            events, headers = await _stream(client, ROUTER, {"model": "m", "prompt": "x", "stream": True, "n": 2,
                                                             "partial_images": 1, "size": "128x128"})
            assert headers["transfer-encoding"] == "chunked"  # really streamed, not buffered
            assert len(normalize_stream(events, headers=headers).images) == 2
        assert handle.stats()["file_requests_with_authorization"] == 0


def test_thread_server_shuts_down_and_frees_its_port() -> None:
    with run_gateway_in_thread() as handle:
        port = handle.port
        assert httpx.get(handle.url("/healthz")).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


# --- streaming ------------------------------------------------------------------------------------------------


async def _stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> tuple[list[tuple[str, str]], httpx.Headers]:
    async with aconnect_sse(client, "POST", path, json=body) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        events = [(event.event, event.data) async for event in source.aiter_sse()]
        return events, source.response.headers


async def test_openai_stream_partials_and_completed() -> None:
    async with gateway() as client:
        body = {"prompt": "x" * 8, "model": "gpt-image-1", "stream": True, "partial_images": 2, "n": 2,
                "size": "1024x1536", "quality": "low", "seed": 3}
        events, headers = await _stream(client, OPENAI, body)
        names = [name for name, _ in events]
        assert names == ["image_generation.partial_image"] * 2 + ["image_generation.completed"] + (
            ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        )
        first_partial = json.loads(events[0][1])
        assert first_partial["partial_image_index"] == 0 and first_partial["size"] == "1024x1536"
        result = normalize_stream(events, headers=headers, keep_partials=True)
        assert len(result.images) == 2 and len(result.partial_images) == 4
        assert image_of(result.images[0].data).size == (1024, 1536)
        assert image_of(result.partial_images[1]).size == (256, 384)
        assert result.usage.output_tokens == 2 * 408 and result.usage.input_tokens == 2
        assert (result.size, result.quality, result.output_format) == ("1024x1536", "low", "png")
        # The streamed image is the very image a buffered request returns.
        buffered = parse(await client.post(OPENAI, json={**body, "stream": False, "partial_images": None}))
        assert buffered.images[0].data == result.images[0].data


async def test_router_stream_any_model_with_cost() -> None:
    async with gateway() as client:
        events, headers = await _stream(client, ROUTER, {"prompt": "x", "model": "google/imagen-4", "stream": True,
                                                         "size": "256x256"})
        result = normalize_stream(events, headers=headers)
        # imagen-4's list price in the engine's prices.json
        assert result.reported_cost_usd == 0.04 and result.request_id == headers["x-request-id"]
        assert image_of(result.images[0].data).size == (256, 256)


async def test_corrupt_stream() -> None:
    async with gateway(corrupt_b64_rate=1.0) as client:
        events, headers = await _stream(client, OPENAI, {"prompt": "x", "model": "gpt-image-1", "stream": True})
        with pytest.raises(MalformedResponseError):
            normalize_stream(events, headers=headers)


# --- stats, models, health ------------------------------------------------------------------------------------


async def test_stats_never_store_secrets_and_reset_zeroes() -> None:
    async with gateway(balance_usd=1.0, rpm=60, burst=1) as client:
        await client.post(INDOXHUB, json={"prompt": "x", "model": "openai/dall-e-2", "size": "256x256",
                                          "byok_api_key": "sk-provider-secret-999",
                                          "additional_params": {"seed": 1}})
        counters = await stats(client)
        dumped = json.dumps(counters)
        assert "sk-provider-secret-999" not in dumped and KEY not in dumped
        assert counters["last_request_bodies"] == [
            {"prompt": "x", "model": "openai/dall-e-2", "size": "256x256", "additional_params": {"seed": 1}}
        ]
        assert counters["last_request_paths"] == [INDOXHUB]
        assert counters["total_requests"] == 1 and counters["by_route"] == {INDOXHUB: 1}
        # dall-e-2 256x256 costs $0.016
        assert counters["bytes_served"] > 0 and counters["balance_usd"] == pytest.approx(0.984)
        assert (await client.post(OPENAI, json={"prompt": "x"})).status_code == 429
        reset = await client.post("/_gateway/reset")
        assert reset.status_code == 200
        counters = await stats(client)
        assert counters["total_requests"] == 0 and counters["last_request_bodies"] == []
        assert counters["balance_usd"] == 1.0 and counters["accepted_timeline"] == []
        assert (await client.post(OPENAI, json={"prompt": "x", "size": "256x256"})).status_code == 200


async def test_last_bodies_are_bounded() -> None:
    async with gateway() as client:
        for i in range(55):
            await client.post(OPENAI, json={"prompt": ""  if i % 2 else f"p{i}", "size": "16x16"})
        bodies = (await stats(client))["last_request_bodies"]
        assert len(bodies) == 50 and bodies[-1]["prompt"] == "p54"


async def test_models_health_and_request_ids() -> None:
    async with gateway() as client:
        for path in ("/v1/models", "/api/v1/models", "/router/v1/models"):
            response = await client.get(path)
            assert response.status_code == 200 and response.json()["object"] == "list"
        health = await client.get("/healthz", headers={"Authorization": ""})
        assert health.json() == {"status": "ok"}
        ids = {health.headers["x-request-id"], (await client.get("/nowhere")).headers["x-request-id"]}
        assert len(ids) == 2 and all(len(i) == 32 for i in ids)


# --- configuration and CLI ------------------------------------------------------------------------------------


def test_config_from_args_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_gateway_arguments(parser)
    args = parser.parse_args(
        ["--port", "0", "--api-key", "k", "--rpm", "30", "--ipm", "50", "--burst", "3", "--latency", "0.3-1.5",
         "--fail-502-rate", "0.1", "--drop-rate", "0.05", "--fault-seed", "9", "--no-rate-limit-headers",
         "--no-retry-after", "--url-ttl-seconds", "5", "--default-response-format", "b64_json",
         "--content-policy-trigger", "", "--balance-usd", "2.5"]
    )
    config = config_from_args(args)
    assert args.port == 0 and args.host == "127.0.0.1"
    assert (config.api_key, config.rpm, config.ipm, config.burst) == ("k", 30, 50, 3)
    assert config.latency == (0.3, 1.5) and config.fail_502_rate == 0.1 and config.drop_rate == 0.05
    assert not config.rate_limit_headers and not config.retry_after_header
    assert config.content_policy_trigger is None and config.balance_usd == 2.5
    assert config_from_args(parser.parse_args([])) == GatewayConfig()


def test_latency_parsing_and_config_validation() -> None:
    assert parse_latency("0.5") == (0.5, 0.5) and parse_latency("0") is None
    with pytest.raises(argparse.ArgumentTypeError):
        parse_latency("2-1")
    assert GatewayConfig(latency=0.2).latency == (0.2, 0.2)  # type: ignore[arg-type]  # a number is accepted
    with pytest.raises(ValueError, match="fail_502_rate"):
        GatewayConfig(fail_502_rate=1.5)
    with pytest.raises(ValueError, match="rpm"):
        GatewayConfig(rpm=0)


def test_module_help_lists_the_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "imagegen_gateway", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for flag in ("--port", "--api-key", "--balance-usd", "--rpm", "--ipm", "--burst", "--latency",
                 "--fail-502-rate", "--fail-503-rate", "--fail-500-rate", "--drop-rate", "--corrupt-b64-rate",
                 "--envelope-failure-rate", "--fault-seed", "--url-ttl-seconds", "--no-rate-limit-headers",
                 "--no-retry-after", "--default-response-format", "--content-policy-trigger"):
        assert flag in result.stdout


def test_module_serves_and_announces_its_address() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "imagegen_gateway", "--port", "0", "--api-key", "sk-cli"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("imagegen gateway listening on http://127.0.0.1:")
        base_url = line.rsplit(" ", 1)[-1]
        body = {"prompt": "x", "model": "imagen-3", "size": "64x64", "response_format": "b64_json"}
        response = httpx.post(base_url + OPENAI, json=body,
                              headers={"Authorization": "Bearer sk-cli"})
        image = base64.b64decode(response.json()["data"][0]["b64_json"])
        assert image_of(image).size == (64, 64)
    finally:
        process.terminate()
        process.wait(timeout=10)

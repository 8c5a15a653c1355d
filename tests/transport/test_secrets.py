"""The API key never appears in an exception or a log record, whatever goes wrong, and even when a gateway
echoes it back."""

from __future__ import annotations

import logging
import traceback

import pytest

from imagegen_gateway import GatewayConfig
from imagegen_provider.transport import RetryPolicy
from imagegen_provider.wire.errors import (
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    GatewayConnectionError,
    ImageGenError,
    MalformedResponseError,
    ServerError,
)

from ._scripted import Reply
from .conftest import FAST_RETRY, KEY, generation_fails, small_request

GEN = "/v1/images/generations"
WRONG = "WRONGKEY-5150-abcdef"


def _texts_of_error(error: BaseException) -> list[str]:
    texts = [str(error), repr(error), *(str(arg) for arg in error.args)]
    texts.append("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    for attribute in ("body_excerpt", "reason"):
        value = getattr(error, attribute, None)
        if value:
            texts.append(str(value))
    return texts


def _leaking_records(records: list[logging.LogRecord], secret: str) -> list[str]:
    leaks = []
    for record in records:
        texts = [record.getMessage(), str(record.args), record.exc_text or ""]
        if record.exc_info and record.exc_info[1] is not None:
            texts.append("".join(traceback.format_exception(*record.exc_info)))
        if any(secret in text for text in texts):
            leaks.append(f"{record.name}: {record.getMessage()[:200]}")
    return leaks


async def test_key_absent_from_errors_and_debug_logs(gateway_factory, client_for, caplog):
    caplog.set_level(logging.DEBUG)
    # Importing Airflow (any earlier test in the session) raises httpx's logger to WARNING; open the HTTP
    # stack's loggers explicitly so that their records are part of what is checked.
    for name in ("httpx", "httpcore", "aiohttp"):
        caplog.set_level(logging.DEBUG, logger=name)
    errors: list[BaseException] = []

    wrong_gw = gateway_factory(GatewayConfig(api_key=KEY))
    with generation_fails(AuthenticationError) as caught:
        await client_for(wrong_gw, "openai", api_key=WRONG).generate(small_request())
    errors.append(caught.value)

    # 429 (hidden limit: Retry-After only), then success.
    limited_gw = gateway_factory(GatewayConfig(api_key=KEY, rpm=60, burst=1, rate_limit_headers=False))
    limited = client_for(limited_gw, "openai", retry=RetryPolicy(max_attempts=3))
    await limited.generate(small_request(prompt="one"))
    await limited.generate(small_request(prompt="two"))
    assert limited_gw.stats()["rate_limited"] >= 1

    for config, error_type in (
        (GatewayConfig(api_key=KEY, fail_500_rate=1.0), ServerError),
        (GatewayConfig(api_key=KEY, fail_502_rate=1.0), BadGatewayError),
        (GatewayConfig(api_key=KEY, drop_rate=1.0), GatewayConnectionError),
        (GatewayConfig(api_key=KEY, corrupt_b64_rate=1.0), MalformedResponseError),
    ):
        with generation_fails(error_type) as caught:
            await client_for(gateway_factory(config), "router", retry=FAST_RETRY).generate(small_request())
        errors.append(caught.value)

    records = caplog.records
    # The run did log, at every level down to DEBUG (the transport libraries included).
    assert sum("Attempt failed" in r.getMessage() for r in records) >= 1 + 1 + 4 * FAST_RETRY.max_attempts
    # Positive control: the HTTP stack's own records were captured too (and are checked above).
    assert any(r.name.startswith(("httpx", "httpcore", "aiohttp")) for r in records)
    for secret in (KEY, WRONG):
        assert _leaking_records(records, secret) == []
        for error in errors:
            assert not any(secret in text for text in _texts_of_error(error))


@pytest.mark.parametrize(
    ("reply", "error_type"),
    [
        (Reply(401, json={"error": {"message": f"Incorrect API key provided: {KEY}", "code": "invalid_api_key"}}),
         AuthenticationError),
        (Reply(401, json={"detail": f"Bearer {KEY} is not valid"}), AuthenticationError),
        (Reply(502, body=f"<html><body>upstream refused Authorization: Bearer {KEY}</body></html>",
               media_type="text/html"), BadGatewayError),
        (Reply(200, body=f"not json, but here is your key: {KEY}", media_type="text/plain"),
         MalformedResponseError),
        (Reply(200, json={"data": [], "echo": {"authorization": f"Bearer {KEY}"}}), MalformedResponseError),
        (Reply(200, json={"success": False, "message": f"provider rejected key {KEY}"}), ImageGenError),
    ],
)
async def test_gateway_echoing_the_key_is_redacted(scripted, client_for, caplog, reply, error_type):
    caplog.set_level(logging.DEBUG)
    scripted.on(GEN, reply)
    with generation_fails(error_type) as caught:
        await client_for(scripted.base_url + "/v1", retry=RetryPolicy(max_attempts=2, backoff_initial=0.01,
                                                                         backoff_max=0.02)).generate(small_request())
    texts = _texts_of_error(caught.value)
    assert not any(KEY in text for text in texts)
    assert "***" in str(caught.value)  # the echo was there, and was scrubbed
    assert _leaking_records(caplog.records, KEY) == []


async def test_unknown_provider_shaped_key_in_a_body_is_redacted(scripted, client_for):
    """A key we do not know (someone else's) is still scrubbed when it looks like one."""
    other = "sk-proj-Zx81kLmn0Qp2Rs4t"
    scripted.on(GEN, Reply(400, json={"error": {"message": f"key {other} is not allowed for this model"}}))
    with generation_fails(BadRequestError) as caught:
        await client_for(scripted.base_url + "/v1").generate(small_request())
    assert other not in str(caught.value) and "***" in str(caught.value)


async def test_byok_key_is_redacted_and_never_stored_by_the_gateway(scripted, keyed_gateway, client_for, caplog):
    caplog.set_level(logging.DEBUG)
    byok = "BYOK-provider-key-99887766"
    scripted.on("/api/v1/images/generations",
                Reply(400, json={"success": False, "message": f"provider key {byok} was rejected"}))
    request = small_request(model="openai/dall-e-3", size="1024x1024", byok_api_key=byok)
    with generation_fails(BadRequestError) as caught:
        await client_for(scripted.base_url + "/api/v1", "indoxhub").generate(request)
    assert byok not in str(caught.value)
    # It was sent (IndoxHub needs it)...
    assert scripted.requests_to("/api/v1/images/generations")[0].json()["byok_api_key"] == byok
    assert _leaking_records(caplog.records, byok) == []
    assert byok not in repr(request)

    gw = keyed_gateway
    await client_for(gw, "indoxhub").generate(request)
    # ...and the bundled gateway's stats side door never shows it.
    assert byok not in str(gw.stats()["last_request_bodies"])


async def test_stream_error_event_echoing_the_key_is_redacted(scripted, client_for, caplog):
    caplog.set_level(logging.DEBUG)
    event = f'{{"type": "error", "error": {{"message": "upstream said: invalid key {KEY}"}}}}'
    scripted.on(GEN, Reply(200, body=f"event: error\ndata: {event}\n\n", media_type="text/event-stream"))
    request = small_request(model="gpt-image-1", size="1024x1024", stream=True, response_format=None)
    with generation_fails(ImageGenError) as caught:
        await client_for(scripted.base_url + "/v1").generate(request)
    assert "upstream said" in str(caught.value)
    assert not any(KEY in text for text in _texts_of_error(caught.value))
    assert _leaking_records(caplog.records, KEY) == []

"""Every status code and fault, over real loopback sockets: which error, whether it was retried, how often.

The bundled gateway produces 400, 401, 402, 429, 500, 502 (HTML), 503, dropped connections and corrupt
base64; a scripted server produces the rest (403, 404, 408, 504, long HTML pages).
"""

from __future__ import annotations

import time

import pytest

from imagegen_gateway import GatewayConfig
from imagegen_gateway.faults import FaultInjector
from imagegen_provider.transport import RetryPolicy
from imagegen_provider.wire.errors import (
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    ContentPolicyError,
    GatewayConnectionError,
    GatewayError,
    InsufficientBalanceError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    RequestTimeoutError,
    ServerError,
)

from ._scripted import Reply, ok_image
from .conftest import FAST_RETRY, KEY, generation_fails, small_request, wait_for_stats

GEN = "/v1/images/generations"


def _attempts_until_clean(config: GatewayConfig, limit: int) -> int:
    """How many requests a seeded gateway needs before one gets no fault (its draws are reproducible)."""
    injector = FaultInjector(config)
    for attempt in range(1, limit + 1):
        if injector.draw(envelope=False) is None:
            return attempt
    raise AssertionError("the seed never yields a clean response within the limit")


# --- 4xx from the gateway -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["openai", "indoxhub", "router"])
async def test_content_policy_is_its_own_error_and_not_retried(keyed_gateway, client_for, dialect):
    gw = keyed_gateway
    client = client_for(gw, dialect)
    request = small_request(prompt="a poster with forbidden-content on it", model="gpt-image-1", size="1024x1024",
                            response_format=None)
    with generation_fails(ContentPolicyError) as caught:
        await client.generate(request)
    error = caught.value
    assert error.status == 400 and caught.attempts == 1 and not error.fatal and not error.retryable
    stats = gw.stats()
    assert stats["generation_requests"] == 1
    assert stats["content_policy_rejections"] == 1
    assert stats["charged_images"] == 0


async def test_other_400_is_bad_request_not_content_policy(keyed_gateway, client_for):
    gw = keyed_gateway
    # A model the client has no rules for, at a size the gateway cannot draw: only the server can refuse it.
    request = small_request(model="some-vendor/huge-model", size="9000x9000")
    with generation_fails(BadRequestError) as caught:
        await client_for(gw, "openai").generate(request)
    assert type(caught.value) is BadRequestError
    assert caught.attempts == 1 and "9000x9000" in str(caught.value)
    assert gw.stats()["generation_requests"] == 1


async def test_wrong_key_is_fatal_401_sent_once(gateway_factory, client_for):
    gw = gateway_factory(GatewayConfig(api_key="right"))
    with generation_fails(AuthenticationError) as caught:
        await client_for(gw, "openai", api_key="wrong-key-0042").generate(small_request())
    error = caught.value
    assert error.status == 401 and error.fatal and caught.attempts == 1
    assert "wrong-key-0042" not in str(error)
    assert gw.stats()["generation_requests"] == 1
    # The right key works against the same gateway.
    generation = await client_for(gw, "openai", api_key="right").generate(small_request())
    assert generation.attempts == 1


async def test_missing_key_is_401(gateway_factory, client_for):
    gw = gateway_factory(GatewayConfig())
    with generation_fails(AuthenticationError):
        await client_for(gw, "openai", api_key=None).generate(small_request())
    assert gw.stats()["generation_requests"] == 1


async def test_empty_balance_is_fatal_402(gateway_factory, client_for):
    gw = gateway_factory(GatewayConfig(api_key=KEY, balance_usd=0.001))
    with generation_fails(InsufficientBalanceError) as caught:
        await client_for(gw, "indoxhub").generate(small_request())
    assert caught.value.status == 402 and caught.value.fatal and caught.attempts == 1
    stats = gw.stats()
    assert stats["generation_requests"] == 1 and stats["charged_images"] == 0


# --- codes the gateway cannot produce ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type", "retried", "fatal"),
    [
        (403, PermissionDeniedError, False, True),
        (404, NotFoundError, False, False),
        (408, RequestTimeoutError, True, False),
        (500, ServerError, True, False),
        (504, ServerError, True, False),
    ],
)
async def test_status_codes_map_to_errors_and_retries(scripted, client_for, status, error_type, retried, fatal):
    scripted.on(GEN, Reply(status, json={"error": {"message": f"status {status} from the script", "code": None}}))
    client = client_for(scripted.base_url + "/v1", retry=RetryPolicy(max_attempts=3, backoff_initial=0.01,
                                                                        backoff_max=0.02))
    with generation_fails(error_type) as caught:
        await client.generate(small_request())
    error = caught.value
    assert type(error) is error_type
    assert error.status == status and error.fatal is fatal
    expected_attempts = 3 if retried else 1
    assert caught.attempts == expected_attempts
    assert len(scripted.requests_to(GEN)) == expected_attempts
    assert f"status {status} from the script" in str(error)


async def test_retryable_status_then_success(scripted, client_for):
    scripted.on(GEN, Reply(504, body="upstream timed out", media_type="text/plain"), Reply(408, json={}), ok_image())
    generation = await client_for(scripted.base_url + "/v1").generate(small_request())
    assert generation.attempts == 3
    assert len(scripted.requests_to(GEN)) == 3


# --- 5xx and faults from the gateway -----------------------------------------------------------------------


async def test_500_retried_up_to_max_attempts(gateway_factory, client_for):
    gw = gateway_factory(GatewayConfig(api_key=KEY, fail_500_rate=1.0))
    with generation_fails(ServerError) as caught:
        await client_for(gw, "openai", retry=RetryPolicy(max_attempts=4, backoff_initial=0.01,
                                                          backoff_max=0.02)).generate(small_request())
    assert caught.value.status == 500 and caught.attempts == 4
    stats = gw.stats()
    assert stats["generation_requests"] == 4 and stats["faults"] == {"500": 4}
    assert stats["charged_images"] == 0


async def test_503_honours_its_retry_after_then_gives_up(gateway_factory, client_for):
    gw = gateway_factory(GatewayConfig(api_key=KEY, fail_503_rate=1.0))
    started = time.monotonic()
    with generation_fails(ServerError) as caught:
        await client_for(gw, "openai", retry=RetryPolicy(max_attempts=2)).generate(small_request())
    elapsed = time.monotonic() - started
    assert caught.value.status == 503 and caught.attempts == 2
    assert caught.value.retry_after == 1.0
    assert elapsed >= 0.95  # the gateway's Retry-After: 1 was waited out between the two attempts
    assert gw.stats()["generation_requests"] == 2


async def test_intermittent_503_succeeds_after_retries(gateway_factory, client_for):
    config = GatewayConfig(api_key=KEY, fail_503_rate=0.5, fault_seed=1)
    expected = _attempts_until_clean(config, 4)
    assert expected >= 2  # the seed does exercise the retry
    gw = gateway_factory(config)
    generation = await client_for(gw, "openai", retry=RetryPolicy(max_attempts=4)).generate(small_request())
    assert generation.attempts == expected
    assert gw.stats()["generation_requests"] == expected


async def test_502_html_is_bad_gateway_with_short_message(gateway_factory, client_for):
    gw = gateway_factory(GatewayConfig(api_key=KEY, fail_502_rate=1.0))
    with generation_fails(BadGatewayError) as caught:
        await client_for(gw, "router", retry=RetryPolicy(max_attempts=2, backoff_initial=0.01,
                                                          backoff_max=0.02)).generate(small_request())
    error = caught.value
    assert error.status == 502 and caught.attempts == 2 and error.retryable
    assert "non-JSON" in str(error) and "HTML" in str(error)
    assert gw.stats()["generation_requests"] == 2


async def test_long_html_error_page_is_only_excerpted(scripted, client_for):
    page = "<html><head><title>502 Bad Gateway</title></head><body>" + "<p>upstream trace line</p>" * 2000 + \
        "<footer>END-OF-PAGE-MARKER</footer></body></html>"
    scripted.on(GEN, Reply(502, body=page, media_type="text/html"))
    with generation_fails(BadGatewayError) as caught:
        await client_for(scripted.base_url + "/v1", retry=RetryPolicy(max_attempts=1)).generate(small_request())
    message = str(caught.value)
    assert "non-JSON" in message and "HTML" in message
    assert len(page) > 50_000 and len(message) < 600
    assert "END-OF-PAGE-MARKER" not in message
    assert "\n" not in message


async def test_dropped_connections_every_time(gateway_factory, client_for):
    gw = gateway_factory(GatewayConfig(api_key=KEY, drop_rate=1.0))
    with generation_fails(GatewayConnectionError) as caught:
        await client_for(gw, "openai").generate(small_request())
    assert caught.attempts == FAST_RETRY.max_attempts and caught.value.retryable
    stats = wait_for_stats(gw, lambda s: s["dropped_connections"] == FAST_RETRY.max_attempts)
    assert stats["dropped_connections"] == FAST_RETRY.max_attempts
    # Each dropped response was generated and charged: the retries paid again.
    assert stats["charged_images"] == FAST_RETRY.max_attempts and stats["images_generated"] == 0


async def test_some_dropped_connections_are_retried_to_success(gateway_factory, client_for):
    gw = gateway_factory(GatewayConfig(api_key=KEY, drop_rate=0.3, fault_seed=1))
    client = client_for(gw, "openai", retry=RetryPolicy(max_attempts=6, backoff_initial=0.01, backoff_max=0.05))
    generations = [await client.generate(small_request(prompt=f"kite number {i}")) for i in range(10)]
    stats = wait_for_stats(gw, lambda s: s["generation_requests"] == sum(g.attempts for g in generations))
    assert len(generations) == 10 and all(g.images for g in generations)
    assert stats["dropped_connections"] >= 1
    assert sum(g.attempts for g in generations) == 10 + stats["dropped_connections"]
    assert stats["charged_images"] - stats["images_generated"] == stats["dropped_connections"]


async def test_corrupt_base64_every_time(gateway_factory, client_for):
    gw = gateway_factory(GatewayConfig(api_key=KEY, corrupt_b64_rate=1.0))
    with generation_fails(MalformedResponseError) as caught:
        await client_for(gw, "openai").generate(small_request())
    assert "base64" in str(caught.value)
    assert caught.attempts == FAST_RETRY.max_attempts
    assert gw.stats()["generation_requests"] == FAST_RETRY.max_attempts


async def test_some_corrupt_base64_succeeds_after_retry(gateway_factory, client_for):
    config = GatewayConfig(api_key=KEY, corrupt_b64_rate=0.5, fault_seed=7)
    expected = _attempts_until_clean(config, 5)
    assert expected >= 2
    gw = gateway_factory(config)
    generation = await client_for(gw, "openai", retry=RetryPolicy(max_attempts=5, backoff_initial=0.01,
                                                                   backoff_max=0.02)).generate(small_request())
    assert generation.attempts == expected
    assert generation.images[0].info.format == "png"


async def test_200_that_is_not_an_image(scripted, client_for):
    """Base64 that decodes, but to something that is not an image: malformed, retried."""
    scripted.on(GEN, Reply(200, json={"data": [{"b64_json": "bm90IGFuIGltYWdlIGF0IGFsbA=="}]}), ok_image(5, 5))
    generation = await client_for(scripted.base_url + "/v1").generate(small_request())
    assert generation.attempts == 2 and generation.images[0].info.width == 5


async def test_indoxhub_success_false_envelope_is_an_error(gateway_factory, client_for):
    gw = gateway_factory(GatewayConfig(api_key=KEY, envelope_failure_rate=1.0))
    with generation_fails(GatewayError) as caught:
        await client_for(gw, "indoxhub").generate(small_request())
    assert caught.value.status == 200
    assert "no image" in str(caught.value)


async def test_connection_refused_is_connection_error(client_for):
    from tests.conftest import free_port

    client = client_for(f"http://127.0.0.1:{free_port()}/v1",
                        retry=RetryPolicy(max_attempts=2, backoff_initial=0.01, backoff_max=0.02))
    with generation_fails(GatewayConnectionError) as caught:
        await client.generate(small_request())
    assert caught.attempts == 2
    assert "could not connect" in str(caught.value)

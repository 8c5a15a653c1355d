"""Whatever goes wrong inside ``generate`` comes out as a GenerationFailed carrying an ImageGenError, with the
attempts and paid responses: no raw httpx, JSON, URL or programming exception escapes."""

from __future__ import annotations

import gzip

import httpx
import pytest

from imagegen_provider.transport import GenerationFailed, ImageGenClient, RetryPolicy
from imagegen_provider.wire.errors import (
    ClientConfigurationError,
    ImageDownloadError,
    ImageGenError,
    MalformedResponseError,
    RequestValidationError,
    UnexpectedError,
)

from ._scripted import Reply, openai_image_body
from .conftest import KEY, generation_fails, small_request

GEN = "/v1/images/generations"
ONCE = RetryPolicy(max_attempts=1)


class ExplodingTransport(httpx.AsyncBaseTransport):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise self.exc


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ("[" * 200_000 + "]" * 200_000, {}),  # RecursionError in the JSON parser
        ('{"data": ' * 50_000 + "1" + "}" * 50_000, {}),
        (b"definitely not gzip", {"content-encoding": "gzip"}),  # decoding error
        (gzip.compress(b'{"data": []}')[:-8] + b"garbage!", {"content-encoding": "gzip"}),
        (b"{}", {"content-encoding": "br"}),  # never asked for: refused, not buffered
        (b"{}", {"content-encoding": "gzip, gzip"}),
    ],
    ids=["deep-array", "deep-object", "not-gzip", "corrupt-gzip", "brotli", "double-gzip"],
)
async def test_undecodable_bodies_are_malformed_responses(scripted, client_for, body, headers):
    scripted.on(GEN, Reply(200, body=body, headers=headers, media_type="application/json"))
    with generation_fails(MalformedResponseError) as caught:
        await client_for(scripted.base_url + "/v1", retry=ONCE).generate(small_request())
    assert caught.attempts == 1


async def test_download_redirect_loop_is_a_download_error_with_the_paid_response(scripted, client_for):
    scripted.on(GEN, lambda app, seen: Reply(200, json=openai_image_body(url=f"{app.base_url}/loop.png")))
    scripted.on("/loop.png", Reply(302, headers={"location": "/loop.png"}))
    with generation_fails(ImageDownloadError) as caught:
        await client_for(scripted.base_url + "/v1", retry=ONCE).generate(small_request(response_format="url"))
    assert "redirects" in str(caught.value)
    assert caught.attempts == 1 and len(caught.paid) == 1
    assert len(scripted.requests_to("/loop.png")) == 6  # bounded: the first request and five redirects


@pytest.mark.parametrize(
    "base_url", ["http://127.0.0.1:99999/v1", "http://exa mple.com/v1", "ftp://127.0.0.1/v1", "http://[::1/v1"]
)
async def test_bad_base_url_is_an_error_of_the_package(base_url):
    client = ImageGenClient(base_url=base_url, api_key=KEY, retry=ONCE)
    try:
        with pytest.raises(GenerationFailed) as caught:
            await client.generate(small_request())
    finally:
        await client.aclose()
    assert isinstance(caught.value.error, ImageGenError)
    assert caught.value.attempts <= 1


@pytest.mark.parametrize(
    ("exc", "error_type"),
    [
        (httpx.TooManyRedirects("loop"), UnexpectedError),
        (httpx.DecodingError("bad"), MalformedResponseError),
        (httpx.InvalidURL("bad"), ClientConfigurationError),
        (httpx.UnsupportedProtocol("gopher"), ClientConfigurationError),
        (ValueError("port out of range"), UnexpectedError),
        (ExceptionGroup("connect", [OSError("a"), ValueError("b")]), UnexpectedError),
        (RecursionError("deep"), MalformedResponseError),
        (RuntimeError("a bug"), UnexpectedError),
    ],
)
async def test_any_exception_from_the_transport_becomes_an_error(exc, error_type):
    client = ImageGenClient(base_url="http://gateway.test/v1", api_key=KEY, retry=ONCE,
                            transport=ExplodingTransport(exc))
    try:
        with generation_fails(error_type) as caught:
            await client.generate(small_request())
    finally:
        await client.aclose()
    assert caught.attempts == 1
    # Only class names: an exception's own message may quote the request.
    assert str(exc) not in str(caught.value) or not str(exc)


async def test_request_the_dialect_cannot_carry_is_a_permanent_failure(client_for):
    client = client_for("http://gateway.test/v1", dialect="openai")
    with generation_fails(RequestValidationError) as caught:
        await client.generate(small_request(provider={"order": ["a"]}))
    assert caught.value.permanent and caught.attempts == 0

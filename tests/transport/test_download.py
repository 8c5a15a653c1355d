"""Images returned as URLs: the key never reaches the image host, only http(s), a size cap (with and without
Content-Length), expired links, and image-host 5xx retried."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from PIL import Image

from imagegen_gateway import GatewayConfig
from imagegen_provider.transport import ImageDownloader, RetryPolicy
from imagegen_provider.transport.addresses import AddressPolicy
from imagegen_provider.wire.errors import ImageDownloadError, ImageExpiredError, ServerError

from ._scripted import Reply, openai_image_body, png_bytes
from .conftest import KEY, generation_fails, small_request, wait_for_stats

GEN = "/v1/images/generations"
FAST = RetryPolicy(max_attempts=4, backoff_initial=0.01, backoff_max=0.02)
#: The scripted image hosts listen on loopback; a downloader on its own (no gateway) must be told that is fine.
LOOPBACK_OK = AddressPolicy(allow_private=True)


def noisy_png(side: int = 64) -> bytes:
    """A PNG that does not compress: about 3 bytes a pixel."""
    import io

    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


class SlowTransport(httpx.AsyncHTTPTransport):
    """Delays every request: lets a short-lived URL expire between generation and download."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(self.delay)
        return await super().handle_async_request(request)


# --- the key stays with the gateway ---------------------------------------------------------------------


async def test_authorization_never_reaches_the_image_host(keyed_gateway, client_for):
    gw = keyed_gateway
    generation = await client_for(gw, "openai").generate(small_request(n=2, response_format="url"))
    stats = wait_for_stats(gw, lambda s: s["file_requests"] == 2)
    # The generation succeeded against a gateway that accepts only KEY: the key was sent there...
    assert len(generation.images) == 2 and stats["by_status"].get("401") is None
    # ...and not to the image URLs.
    assert stats["file_requests"] == 2
    assert stats["file_requests_with_authorization"] == 0


async def test_image_host_sees_no_credentials(scripted, client_for):
    image = png_bytes(12, 7)
    scripted.on(GEN, lambda app, seen: Reply(200, json=openai_image_body(url=f"{app.base_url}/cdn/a.png?sig=abc")))
    scripted.on("/cdn/a.png", Reply(200, body=image, media_type="image/png"))
    generation = await client_for(scripted.base_url + "/v1").generate(small_request(response_format="url"))
    assert generation.images[0].data == image
    [gen_request] = scripted.requests_to(GEN)
    [file_request] = scripted.requests_to("/cdn/a.png")
    assert gen_request.headers["authorization"] == f"Bearer {KEY}"
    assert "authorization" not in file_request.headers and "cookie" not in file_request.headers
    assert file_request.query == "sig=abc"


# --- schemes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/image.png", "data:image/png;base64,AAAA", "/files/x.png", ""]
)
async def test_only_http_urls_are_fetched(url):
    downloader = ImageDownloader(retry=FAST, policy=LOOPBACK_OK)
    try:
        with pytest.raises(ImageDownloadError) as caught:
            await downloader.fetch(url)
    finally:
        await downloader.aclose()
    assert "refusing" in str(caught.value)
    assert "root:" not in str(caught.value)


async def test_gateway_returning_a_file_url_fails_the_image_not_the_disk(scripted, client_for):
    scripted.on(GEN, Reply(200, json=openai_image_body(url="file:///etc/passwd")))
    with generation_fails(ImageDownloadError) as caught:
        await client_for(scripted.base_url + "/v1").generate(small_request(response_format="url"))
    # Paid for, once: the error says so and carries the response, and the generation was not repeated.
    assert caught.paid and caught.attempts == 1
    assert len(scripted.requests_to(GEN)) == 1


async def test_redirect_to_a_file_url_is_refused(scripted):
    scripted.on("/img.png", Reply(302, headers={"location": "file:///etc/passwd"}))
    downloader = ImageDownloader(retry=FAST, policy=LOOPBACK_OK)
    try:
        with pytest.raises(ImageDownloadError) as caught:
            await downloader.fetch(scripted.base_url + "/img.png")
    finally:
        await downloader.aclose()
    assert "root:" not in str(caught.value)
    assert len(scripted.requests_to("/img.png")) == 1  # not retried: asking again cannot help


async def test_http_redirect_is_followed(scripted):
    image = png_bytes(3, 3)
    scripted.on("/old.png", Reply(302, headers={"location": "/new.png"}))
    scripted.on("/new.png", Reply(200, body=image, media_type="image/png"))
    downloader = ImageDownloader(retry=FAST, policy=LOOPBACK_OK)
    try:
        assert await downloader.fetch(scripted.base_url + "/old.png") == image
    finally:
        await downloader.aclose()


# --- size cap --------------------------------------------------------------------------------------------


async def test_size_cap_with_content_length(gateway_factory, client_for):
    # repeat_unseeded: unseeded requests get the same image, so the same image inline tells its exact size.
    gw = gateway_factory(GatewayConfig(api_key=KEY, repeat_unseeded=True))
    request = small_request(response_format="url")
    size = len((await client_for(gw, "openai").generate(request.model_copy(update={"response_format": "b64_json"})))
               .images[0].data)
    with generation_fails(ImageDownloadError) as caught:
        await client_for(gw, "openai", max_response_bytes=size - 1).generate(request)
    assert "cap" in str(caught.value) and not isinstance(caught.value, ImageExpiredError)
    assert caught.paid
    exact = await client_for(gw, "openai", max_response_bytes=size).generate(request)
    assert exact.images[0].info.num_bytes == size


async def test_size_cap_without_content_length(scripted):
    image = noisy_png()
    chunks = [image[i:i + 1024] for i in range(0, len(image), 1024)]
    scripted.on("/chunked.png", Reply(200, chunks=chunks, media_type="image/png"))
    # Precondition: the host really sends no Content-Length.
    async with httpx.AsyncClient() as plain:
        probe = await plain.get(scripted.base_url + "/chunked.png")
    assert "content-length" not in probe.headers and probe.content == image

    small = ImageDownloader(max_bytes=len(image) - 1, retry=FAST, policy=LOOPBACK_OK)
    exact = ImageDownloader(max_bytes=len(image), retry=FAST, policy=LOOPBACK_OK)
    try:
        with pytest.raises(ImageDownloadError) as caught:
            await small.fetch(scripted.base_url + "/chunked.png")
        assert "exceeds" in str(caught.value)
        assert await exact.fetch(scripted.base_url + "/chunked.png") == image
    finally:
        await small.aclose()
        await exact.aclose()


# --- expired links and broken hosts ----------------------------------------------------------------------


async def test_expired_gateway_url(gateway_factory, client_for):
    gw = gateway_factory(GatewayConfig(api_key=KEY, url_ttl_seconds=0.2))
    client = client_for(gw, "openai", download_transport=SlowTransport(0.5))
    with generation_fails(ImageExpiredError) as caught:
        await client.generate(small_request(response_format="url"))
    error = caught.value
    assert error.status == 404 and caught.attempts == 1
    assert caught.paid and caught.paid[-1].images[0].url
    stats = wait_for_stats(gw, lambda s: s["file_not_found"] == 1)
    assert stats["file_not_found"] == 1 and stats["charged_images"] == 1
    assert stats["generation_requests"] == 1  # not regenerated: that would pay again


@pytest.mark.parametrize("status", [403, 404, 410])
async def test_expired_signed_url_hides_its_signature(scripted, status):
    scripted.on("/img.png", Reply(status, body="AccessDenied: Request has expired", media_type="text/plain"))
    downloader = ImageDownloader(retry=FAST, policy=LOOPBACK_OK)
    try:
        with pytest.raises(ImageExpiredError) as caught:
            await downloader.fetch(scripted.base_url + "/img.png?X-Amz-Signature=SIGNATURE-SECRET&X-Amz-Expires=60")
    finally:
        await downloader.aclose()
    assert caught.value.status == status
    assert "/img.png" in str(caught.value) and "SIGNATURE-SECRET" not in str(caught.value)
    assert len(scripted.requests_to("/img.png")) == 1


async def test_image_host_5xx_is_retried(scripted):
    image = png_bytes(4, 4)
    scripted.on("/img.png", Reply(503), Reply(502, body="<html>bad gateway</html>"), Reply(200, body=image))
    downloader = ImageDownloader(retry=FAST, policy=LOOPBACK_OK)
    try:
        assert await downloader.fetch(scripted.base_url + "/img.png") == image
    finally:
        await downloader.aclose()
    assert len(scripted.requests_to("/img.png")) == 3


async def test_image_host_5xx_gives_up_after_its_attempts(scripted):
    scripted.on("/img.png", Reply(500))
    downloader = ImageDownloader(retry=FAST, policy=LOOPBACK_OK)
    try:
        with pytest.raises(ServerError):
            await downloader.fetch(scripted.base_url + "/img.png")
    finally:
        await downloader.aclose()
    assert len(scripted.requests_to("/img.png")) == FAST.max_attempts


async def test_client_retries_the_image_host_not_the_generation(scripted, client_for):
    image = png_bytes(9, 9)
    scripted.on(GEN, lambda app, seen: Reply(200, json=openai_image_body(url=f"{app.base_url}/cdn/x.png")))
    scripted.on("/cdn/x.png", Reply(503), Reply(200, body=image, media_type="image/png"))
    generation = await client_for(scripted.base_url + "/v1").generate(small_request(response_format="url"))
    assert generation.images[0].data == image and generation.attempts == 1
    assert len(scripted.requests_to(GEN)) == 1
    assert len(scripted.requests_to("/cdn/x.png")) == 2


async def test_unreachable_image_host_is_a_download_error():
    from tests.conftest import free_port

    downloader = ImageDownloader(retry=FAST, policy=LOOPBACK_OK)
    url = f"http://127.0.0.1:{free_port()}/img.png?token=QUERY-SECRET"
    try:
        with pytest.raises(ImageDownloadError) as caught:
            await downloader.fetch(url)
    finally:
        await downloader.aclose()
    assert "ConnectError" in str(caught.value)
    assert "QUERY-SECRET" not in str(caught.value)

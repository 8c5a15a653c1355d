"""Every image is decoded completely before it counts: a corrupt or wrong-format image is a retryable malformed
response whose paid response is kept (in ``discarded`` on a later success, in ``paid`` on failure)."""

from __future__ import annotations

from imagegen_provider.transport import RetryPolicy
from imagegen_provider.wire.errors import MalformedResponseError

from ._scripted import Reply, b64, ok_image, openai_image_body, png_bytes
from .conftest import generation_fails, small_request

GEN = "/v1/images/generations"
FAST = RetryPolicy(max_attempts=3, backoff_initial=0.01, backoff_max=0.02)


def _noisy_png() -> bytes:
    import io
    import os

    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (32, 32), os.urandom(32 * 32 * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def truncated_image() -> Reply:
    data = _noisy_png()
    return Reply(200, json=openai_image_body(b64_json=b64(data[: len(data) // 2])))


async def test_corrupt_image_is_retried_and_its_response_kept_as_discarded(scripted, client_for):
    scripted.on(GEN, truncated_image(), ok_image(5, 4))
    generation = await client_for(scripted.base_url + "/v1", retry=FAST).generate(small_request())
    assert generation.attempts == 2 and generation.images[0].info.width == 5
    assert len(generation.discarded) == 1 and generation.discarded[0].images[0].data is not None


async def test_always_corrupt_fails_with_every_paid_response(scripted, client_for):
    scripted.on(GEN, truncated_image())
    with generation_fails(MalformedResponseError) as caught:
        await client_for(scripted.base_url + "/v1", retry=FAST).generate(small_request())
    assert "truncated or corrupt" in str(caught.value)
    assert caught.attempts == 3 and len(caught.paid) == 3


async def test_wrong_format_is_a_malformed_response(scripted, client_for):
    scripted.on(GEN, ok_image())  # always PNG
    request = small_request(model="gpt-image-1", size="1024x1024", response_format=None, output_format="webp")
    with generation_fails(MalformedResponseError) as caught:
        await client_for(scripted.base_url + "/v1", retry=FAST).generate(request)
    assert "asked for webp, got png" in str(caught.value) and len(caught.paid) == 3


async def test_corrupt_download_is_retried_by_asking_again(scripted, client_for):
    data = _noisy_png()
    scripted.on(GEN, lambda app, seen: Reply(200, json=openai_image_body(
        url=f"{app.base_url}/cdn/{len(app.seen)}.png")))
    scripted.on("/cdn/1.png", Reply(200, body=data[:-100], media_type="image/png"))
    scripted.on("/cdn/3.png", Reply(200, body=data, media_type="image/png"))
    generation = await client_for(scripted.base_url + "/v1", retry=FAST).generate(small_request(response_format="url"))
    assert generation.attempts == 2 and generation.images[0].data == data
    assert len(generation.discarded) == 1


async def test_more_images_than_asked_are_all_returned(scripted, client_for):
    body = {"created": 1, "data": [{"b64_json": b64(png_bytes(3, 3))}, {"b64_json": b64(png_bytes(4, 4))}]}
    scripted.on(GEN, Reply(200, json=body))
    generation = await client_for(scripted.base_url + "/v1", retry=FAST).generate(small_request(n=1))
    assert [image.info.width for image in generation.images] == [3, 4]


async def test_data_url_image_is_accepted_and_verified(scripted, client_for):
    good = png_bytes(6, 2)
    scripted.on(GEN, Reply(200, json=openai_image_body(url="data:image/png;base64," + b64(good))))
    generation = await client_for(scripted.base_url + "/v1", retry=FAST).generate(small_request(response_format="url"))
    assert generation.images[0].data == good and generation.images[0].source_url is None
    assert not scripted.requests_to("/cdn")

"""Each dialect end to end over a real loopback socket: the body the gateway received, the normalised result,
verified images, usage and cost, URL downloads, base64 decoding and streaming."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from imagegen_gateway.charges import billed_usage
from imagegen_provider.wire.imageinfo import inspect_image

from ._scripted import Reply, b64, openai_image_body, png_bytes
from .conftest import KEY, small_request, wait_for_stats


def _decoded(data: bytes) -> tuple[str, int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return (image.format or "").lower(), image.width, image.height


def _assert_verified(image, fmt: str, width: int, height: int) -> None:
    """The client's ImageInfo agrees with an independent full decode of the bytes it kept."""
    assert image.info.sha256 == hashlib.sha256(image.data).hexdigest()
    assert image.info.num_bytes == len(image.data)
    assert (image.info.format, image.info.width, image.info.height) == (fmt, width, height)
    assert _decoded(image.data) == (fmt, width, height)


async def test_openai_dialect_url_response_is_downloaded(keyed_gateway, client_for):
    gw = keyed_gateway
    client = client_for(gw, "openai")
    request = small_request(
        model="dall-e-3", size="1024x1792", quality="hd", style="natural", response_format="url", seed=7
    )
    generation = await client.generate(request)

    stats = wait_for_stats(gw, lambda s: s["file_requests"] == 1)
    assert stats["last_request_paths"] == ["/v1/images/generations"]
    # OpenAI rejects unknown parameters: the seed is not sent, and the client says so.
    assert stats["last_request_bodies"] == [
        {
            "prompt": request.prompt, "model": "dall-e-3", "n": 1, "size": "1024x1792", "quality": "hd",
            "style": "natural", "response_format": "url",
        }
    ]
    assert generation.dropped_fields == ("seed",)
    assert generation.attempts == 1
    [image] = generation.images
    assert image.source_url is not None and image.source_url.startswith(gw.base_url + "/files/")
    _assert_verified(image, "png", 1024, 1792)
    assert image.revised_prompt and request.prompt in image.revised_prompt
    # The OpenAI-compatible usage of a non-GPT model is zeroed, and carries no cost.
    usage = generation.result.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (0, 0, 0)
    assert generation.result.reported_cost_usd is None
    assert stats["spent_usd"] == pytest.approx(billed_usage("dall-e-3", request.prompt, 1024, 1792, "hd", 1).cost_usd)


async def test_openai_dialect_gpt_image_b64_with_token_usage(keyed_gateway, client_for):
    gw = keyed_gateway
    client = client_for(gw, "openai")
    request = small_request(
        model="gpt-image-1", size="1024x1536", quality="high", output_format="jpeg", output_compression=80,
        background="opaque", response_format=None,
    )
    generation = await client.generate(request)

    body = gw.stats()["last_request_bodies"][-1]
    assert body == {
        "prompt": request.prompt, "model": "gpt-image-1", "n": 1, "size": "1024x1536", "quality": "high",
        "output_format": "jpeg", "output_compression": 80, "background": "opaque",
    }
    [image] = generation.images
    assert image.source_url is None  # b64_json: decoded, nothing downloaded
    assert gw.stats()["file_requests"] == 0
    _assert_verified(image, "jpeg", 1024, 1536)
    expected = billed_usage("gpt-image-1", request.prompt, 1024, 1536, "high", 1)
    usage = generation.result.usage
    assert (usage.input_tokens, usage.output_tokens) == (expected.input_tokens, expected.output_tokens)
    assert usage.total_tokens == expected.input_tokens + expected.output_tokens
    assert usage.output_image_tokens == expected.output_tokens
    assert usage.input_text_tokens == expected.input_tokens
    result = generation.result
    assert (result.size, result.quality, result.output_format, result.background) == (
        "1024x1536", "high", "jpeg", "opaque",
    )


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
async def test_indoxhub_dialect_nests_provider_params_and_reports_cost(keyed_gateway, client_for, response_format):
    gw = keyed_gateway
    client = client_for(gw, "indoxhub")
    request = small_request(
        model="google/imagen-4", aspect_ratio="16:9", negative_prompt="blurry", seed=11,
        response_format=response_format, size=None,
    )
    generation = await client.generate(request)

    stats = wait_for_stats(gw, lambda s: s["file_requests"] == (1 if response_format == "url" else 0))
    assert stats["last_request_paths"] == ["/api/v1/images/generations"]
    assert stats["last_request_bodies"] == [
        {
            "prompt": request.prompt, "model": "google/imagen-4", "n": 1, "response_format": response_format,
            "additional_params": {"aspect_ratio": "16:9", "negative_prompt": "blurry", "seed": 11},
        }
    ]
    assert generation.dropped_fields == ()
    [image] = generation.images
    assert (image.source_url is not None) == (response_format == "url")
    assert image.info.format == "png"
    assert image.info.width / image.info.height == pytest.approx(16 / 9, rel=0.01)
    _assert_verified(image, "png", image.info.width, image.info.height)
    result = generation.result
    # IndoxHub's envelope: cost, provider and model, and its own request id.
    assert result.reported_cost_usd is not None and result.reported_cost_usd > 0
    assert result.reported_cost_usd == pytest.approx(stats["spent_usd"])
    assert (result.provider, result.model) == ("google", "imagen-4")
    assert result.request_id and len(result.request_id) == 32


async def test_same_seed_same_image_across_dialects(keyed_gateway, client_for):
    """The seed reaches the gateway in both the nested (IndoxHub) and top-level (router) layouts."""
    gw = keyed_gateway
    request = small_request(model="black-forest-labs/flux-schnell", size="512x512", seed=1234)
    nested = await client_for(gw, "indoxhub").generate(request)
    top_level = await client_for(gw, "router").generate(request)
    other_seed = await client_for(gw, "router").generate(request.model_copy(update={"seed": 1235}))
    assert nested.images[0].info.sha256 == top_level.images[0].info.sha256
    assert other_seed.images[0].info.sha256 != top_level.images[0].info.sha256


async def test_router_dialect_passes_provider_object_and_reports_cost(keyed_gateway, client_for):
    gw = keyed_gateway
    client = client_for(gw, "router")
    request = small_request(
        model="gpt-image-1", size="1536x1024", quality="low", output_format="webp", background="opaque", seed=3,
        provider={"order": ["openai"], "allow_fallbacks": False}, response_format=None,
    )
    generation = await client.generate(request)

    stats = gw.stats()
    assert stats["last_request_paths"] == ["/router/v1/images/generations"]
    assert stats["last_request_bodies"] == [
        {
            "prompt": request.prompt, "model": "gpt-image-1", "n": 1, "size": "1536x1024", "quality": "low",
            "background": "opaque", "output_format": "webp", "seed": 3,
            "provider": {"order": ["openai"], "allow_fallbacks": False},
        }
    ]
    [image] = generation.images
    _assert_verified(image, "webp", 1536, 1024)
    expected = billed_usage("gpt-image-1", request.prompt, 1536, 1024, "low", 1)
    result = generation.result
    assert (result.usage.input_tokens, result.usage.output_tokens) == (expected.input_tokens, expected.output_tokens)
    assert result.reported_cost_usd == pytest.approx(expected.cost_usd)
    assert result.reported_cost_usd == pytest.approx(stats["spent_usd"])
    assert result.model == "gpt-image-1"


async def test_several_images_per_request_are_all_downloaded(keyed_gateway, client_for):
    gw = keyed_gateway
    generation = await client_for(gw, "openai").generate(small_request(n=3, response_format="url"))
    stats = wait_for_stats(gw, lambda s: s["file_requests"] == 3)
    assert len(generation.images) == 3
    assert len({image.info.sha256 for image in generation.images}) == 3
    assert len({image.source_url for image in generation.images}) == 3
    for image in generation.images:
        _assert_verified(image, "png", 256, 256)
    assert stats["images_generated"] == 3 and stats["file_requests"] == 3


@pytest.mark.parametrize("dialect", ["openai", "router"])
async def test_streaming_gives_final_image_and_usage(keyed_gateway, client_for, dialect):
    gw = keyed_gateway
    # A seed, so that both requests ask for the same picture (unseeded requests get a nonce from the gateway).
    request = small_request(
        model="gpt-image-1", size="1024x1024", quality="low", stream=True, partial_images=2, response_format=None,
        seed=21,
    )
    streamed = await client_for(gw, dialect, keep_partial_images=True, accepts_seed=True).generate(request)
    plain = request.model_copy(update={"stream": None, "partial_images": None})
    buffered = await client_for(gw, dialect, accepts_seed=True).generate(plain)

    sent = gw.stats()["last_request_bodies"][0]
    assert sent["stream"] is True
    [image] = streamed.images
    _assert_verified(image, "png", 1024, 1024)
    # The final streamed image is the picture a buffered request gets.
    assert image.info.sha256 == buffered.images[0].info.sha256
    partials = streamed.result.partial_images
    if dialect == "openai":
        assert sent["partial_images"] == 2
        assert len(partials) == 2
        sizes = [inspect_image(p).width for p in partials]
        assert sizes == sorted(sizes) and sizes[-1] < 1024  # partials grow towards the final size
    else:
        # The router documents no partial_images (seed 004): dropped, and said so.
        assert "partial_images" not in sent and "partial_images" in streamed.dropped_fields
        assert partials == []
    expected = billed_usage("gpt-image-1", request.prompt, 1024, 1024, "low", 1)
    usage = streamed.result.usage
    assert (usage.input_tokens, usage.output_tokens) == (expected.input_tokens, expected.output_tokens)
    if dialect == "router":
        assert streamed.result.reported_cost_usd == pytest.approx(expected.cost_usd)


async def test_streaming_without_keep_partials_drops_them(keyed_gateway, client_for):
    gw = keyed_gateway
    request = small_request(
        model="gpt-image-1", size="1024x1024", quality="low", stream=True, partial_images=3, response_format=None
    )
    generation = await client_for(gw, "openai").generate(request)
    assert len(generation.images) == 1 and generation.result.partial_images == []


async def test_stream_request_answered_with_buffered_json(scripted, client_for):
    """Providers without native streaming ignore the flag (seed 004): the buffered body still works."""
    data = png_bytes(10, 4)
    scripted.on("/v1/images/generations", Reply(200, json=openai_image_body(b64_json=b64(data))))
    request = small_request(model="gpt-image-1", size="1024x1024", stream=True, response_format=None)
    generation = await client_for(scripted.base_url + "/v1", "openai").generate(request)
    assert generation.images[0].data == data
    assert (generation.images[0].info.width, generation.images[0].info.height) == (10, 4)
    [seen] = scripted.requests_to("/v1/images/generations")
    assert seen.json()["stream"] is True
    assert seen.headers["authorization"] == f"Bearer {KEY}"

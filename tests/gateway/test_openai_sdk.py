"""The official ``openai`` SDK against the gateway served on a loopback socket: generations, edits and
variations work, and what OpenAI documents as invalid is a ``BadRequestError`` (HTTP 400)."""

from __future__ import annotations

import base64
import io
from typing import Any

import openai
import pytest
from PIL import Image

from imagegen_gateway import GatewayConfig

from .rule_cases import INVALID, Case, ids


@pytest.fixture
def sdk(gateway_factory: Any) -> tuple[openai.OpenAI, Any]:
    handle = gateway_factory(GatewayConfig())
    client = openai.OpenAI(base_url=handle.url("/v1"), api_key="sk-sdk-test", max_retries=0, timeout=60)
    return client, handle


def _png(size: tuple[int, int] = (256, 256), *, alpha: bool = True, fmt: str = "PNG") -> bytes:
    image = Image.new("RGBA" if alpha else "RGB", size, (40, 90, 200, 255) if alpha else (40, 90, 200))
    if alpha:
        for x in range(size[0] // 4, size[0] // 2):  # a transparent square: the area to edit
            for y in range(size[1] // 4, size[1] // 2):
                image.putpixel((x, y), (0, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _decoded(b64: str | None) -> Image.Image:
    assert b64 is not None
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_generate(sdk: tuple[openai.OpenAI, Any]) -> None:
    client, handle = sdk
    result = client.images.generate(model="gpt-image-1", prompt="a red kite", size="1024x1536", quality="low", n=2)
    assert [_decoded(item.b64_json).size for item in result.data or []] == [(1024, 1536)] * 2
    assert result.usage is not None and result.usage.output_tokens == 2 * 408
    dall_e = client.images.generate(model="dall-e-3", prompt="a red kite", size="1792x1024", style="natural")
    assert dall_e.data and dall_e.data[0].url and dall_e.data[0].url.startswith(handle.base_url)
    assert handle.stats()["charged_images"] == 3


def test_edit_dall_e_2_with_mask_and_without(sdk: tuple[openai.OpenAI, Any]) -> None:
    client, handle = sdk
    masked = client.images.edit(
        model="dall-e-2", image=("in.png", _png(alpha=False)), mask=("mask.png", _png()), prompt="add a moon",
        size="512x512", n=2, response_format="b64_json",
    )
    first, second = (_decoded(item.b64_json) for item in masked.data or [])
    assert first.size == second.size == (512, 512) and first.tobytes() != second.tobytes()
    unmasked = client.images.edit(model="dall-e-2", image=("in.png", _png()), prompt="add a moon",
                                  size="256x256", response_format="b64_json")
    assert unmasked.data and _decoded(unmasked.data[0].b64_json).size == (256, 256)
    assert handle.stats()["by_route"]["/v1/images/edits"] == 2


def test_edit_gpt_image_several_images(sdk: tuple[openai.OpenAI, Any]) -> None:
    client, _ = sdk
    images = [("a.png", _png((300, 200))), ("b.webp", _png((64, 64), fmt="WEBP"))]
    result = client.images.edit(model="gpt-image-1", image=images, prompt="combine them", quality="low",
                                size="1536x1024", output_format="jpeg")
    assert result.data and (_decoded(result.data[0].b64_json).format, _decoded(result.data[0].b64_json).size) == (
        "JPEG", (1536, 1024),
    )


def test_edits_of_different_images_differ(sdk: tuple[openai.OpenAI, Any]) -> None:
    client, _ = sdk

    def edit(image: bytes) -> bytes:
        result = client.images.edit(model="dall-e-2", image=("in.png", image), prompt="same words", size="256x256",
                                    response_format="b64_json", extra_body={"seed": 4})
        assert result.data and result.data[0].b64_json
        return base64.b64decode(result.data[0].b64_json)

    assert edit(_png((256, 256))) != edit(_png((512, 512)))


def test_create_variation(sdk: tuple[openai.OpenAI, Any]) -> None:
    client, _ = sdk
    result = client.images.create_variation(image=("in.png", _png(alpha=False)), n=3, size="256x256",
                                            response_format="b64_json")
    decoded = [_decoded(item.b64_json) for item in result.data or []]
    assert [image.size for image in decoded] == [(256, 256)] * 3
    assert len({image.tobytes() for image in decoded}) == 3


@pytest.mark.parametrize("case", INVALID, ids=ids(INVALID))
def test_generate_invalid_is_bad_request(sdk: tuple[openai.OpenAI, Any], case: Case) -> None:
    client, handle = sdk
    params = dict(case.params)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**params)
    assert caught.value.status_code == 400 and caught.value.param == case.refused_param
    assert handle.stats()["spent_usd"] == 0


_BAD_EDITS: list[tuple[str, dict[str, Any], str]] = [
    ("dall-e-3 has no edits", {"model": "dall-e-3"}, "model"),
    ("dall-e-2 takes a square png", {"model": "dall-e-2", "image": ("in.png", _png((300, 200)))}, "image"),
    ("dall-e-2 takes a png", {"model": "dall-e-2", "image": ("in.jpg", _png(alpha=False, fmt="JPEG"))}, "image"),
    ("dall-e-2 without mask needs alpha", {"model": "dall-e-2", "image": ("in.png", _png(alpha=False))}, "image"),
    ("mask of another size", {"model": "dall-e-2", "mask": ("m.png", _png((512, 512)))}, "mask"),
    ("mask without alpha", {"model": "gpt-image-1", "mask": ("m.png", _png(alpha=False))}, "mask"),
    ("dall-e-2 prompt over 1000", {"model": "dall-e-2", "prompt": "p" * 1001}, "prompt"),
    ("gpt-image-1 size 256", {"model": "gpt-image-1", "size": "256x256"}, "size"),
    ("gpt-image-1 response_format", {"model": "gpt-image-1", "response_format": "url"}, "response_format"),
    ("not an image", {"model": "gpt-image-1", "image": ("in.png", b"not an image at all")}, "image"),
]


@pytest.mark.parametrize(("name", "params", "param"), _BAD_EDITS, ids=[name for name, _, _ in _BAD_EDITS])
def test_edit_invalid_is_bad_request(sdk: tuple[openai.OpenAI, Any], name: str, params: dict[str, Any],
                                     param: str) -> None:
    client, handle = sdk
    request = {"image": ("in.png", _png()), "prompt": "edit it", **params}
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(**request)
    assert caught.value.param == param and handle.stats()["charged_images"] == 0


@pytest.mark.parametrize(
    ("params", "param"),
    [({"model": "dall-e-3"}, "model"), ({"model": "gpt-image-1"}, "model"), ({"size": "1024x1536"}, "size"),
     ({"n": 11}, "n"), ({"image": ("in.png", _png((256, 128), alpha=False))}, "image")],
)
def test_variation_invalid_is_bad_request(sdk: tuple[openai.OpenAI, Any], params: dict[str, Any], param: str) -> None:
    client, _ = sdk
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.create_variation(**{"image": ("in.png", _png(alpha=False)), **params})
    assert caught.value.param == param


async def test_oversized_upload_is_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import httpx

    from imagegen_gateway import app as app_module

    monkeypatch.setattr(app_module, "MAX_UPLOAD_BYTES", 4000)
    noisy = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(noisy, "PNG")
    app = app_module.create_app(GatewayConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g",
                                 headers={"Authorization": "Bearer sk-x"}) as client:
        files = {"image": ("in.png", noisy.getvalue(), "image/png")}
        response = await client.post("/v1/images/variations", files=files, data={"model": "dall-e-2"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "upload_too_large"
        small = await client.post("/v1/images/variations", files={"image": ("in.png", _png((32, 32)), "image/png")})
        assert small.status_code == 200, small.text
        assert (await client.get("/_gateway/stats")).json()["charged_images"] == 1

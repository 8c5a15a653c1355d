"""The gateway refuses what OpenAI refuses, in OpenAI's error shape, without billing; and the client's own
validation (``imagegen_provider.wire``) reaches the same verdicts on the same cases."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from imagegen_gateway import GatewayConfig, create_app
from imagegen_gateway.rules import DALL_E_2, DALL_E_3, GPT_IMAGE, GPT_IMAGE_2, rules_for
from imagegen_provider.wire.errors import RequestValidationError
from imagegen_provider.wire.request import ImageRequest

from .rule_cases import CASES, INVALID, VALID, Case, ids

OPENAI = "/v1/images/generations"
AUTH = {"Authorization": "Bearer sk-rules"}


async def _post(body: dict[str, Any]) -> tuple[httpx.Response, dict[str, Any]]:
    app = create_app(GatewayConfig(default_response_format="b64_json"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test", headers=AUTH) as client:
        response = await client.post(OPENAI, json=body)
        stats = (await client.get("/_gateway/stats")).json()
    return response, stats


@pytest.mark.parametrize("case", INVALID, ids=ids(INVALID))
async def test_gateway_refuses_with_openais_error_shape_and_bills_nothing(case: Case) -> None:
    response, stats = await _post(case.params)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == case.refused_param
    assert isinstance(error["message"], str) and error["message"]
    assert (stats["spent_usd"], stats["charged_images"], stats["images_generated"]) == (0, 0, 0)


@pytest.mark.parametrize("case", VALID, ids=ids(VALID))
async def test_gateway_serves_what_openai_accepts(case: Case) -> None:
    response, stats = await _post(case.params)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == case.params.get("n", 1)
    assert stats["charged_images"] == case.params.get("n", 1) and stats["spent_usd"] > 0


async def test_gpt_quality_is_billed_as_asked_never_as_a_neighbour() -> None:
    high, _ = await _post({"model": "gpt-image-1", "prompt": "x", "quality": "high"})
    hd, hd_stats = await _post({"model": "gpt-image-1", "prompt": "x", "quality": "hd"})
    assert high.json()["quality"] == "high" and hd.status_code == 400 and hd_stats["spent_usd"] == 0


def _client_verdict(params: dict[str, Any]) -> bool:
    try:
        ImageRequest.build(**params)
    except RequestValidationError:
        return False
    return True


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
async def test_client_and_gateway_agree(case: Case) -> None:
    """The client checks before paying, the gateway checks as OpenAI would: each is the other's test."""
    response, _ = await _post(case.params)
    gateway_accepts = response.status_code == 200
    assert response.status_code in (200, 400), response.text
    assert (gateway_accepts, _client_verdict(case.params)) == (case.valid, case.valid)


@pytest.mark.parametrize(
    ("model", "rules"),
    [("dall-e-2", DALL_E_2), ("openai/dall-e-3", DALL_E_3), ("gpt-image-1", GPT_IMAGE), ("gpt-image-1-mini", GPT_IMAGE),
     ("gpt-image-1.5", GPT_IMAGE), ("gpt-image-2", GPT_IMAGE_2), ("imagen-3", None), ("flux-schnell", None)],
)
def test_rules_for_models(model: str, rules: object) -> None:
    assert rules_for(model) is rules


@pytest.mark.parametrize(
    ("size", "ok"), [("2048x1152", True), ("3840x2160", True), ("1000x1000", False), ("4096x1024", False),
                     ("3856x2160", False), ("auto", True)],
)
async def test_gpt_image_2_flexible_sizes(size: str, ok: bool) -> None:
    response, _ = await _post({"model": "gpt-image-2", "prompt": "x", "size": size, "quality": "low"})
    assert response.status_code == (200 if ok else 400), response.text


async def test_other_models_and_dialects_stay_loose() -> None:
    """OpenAI-compatible gateways host other models with their own sizes; the router and IndoxHub dialects
    keep their documented looser behaviour."""
    response, _ = await _post({"model": "imagen-3", "prompt": "x", "size": "640x480", "style": "anything"})
    assert response.status_code == 200
    app = create_app(GatewayConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g", headers=AUTH) as client:
        router = await client.post("/router/v1/images/generations",
                                   json={"model": "openai/gpt-image-1", "prompt": "x", "quality": "hd"})
        assert router.status_code == 200 and router.json()["quality"] == "high"


def test_the_gateway_runs_none_of_the_clients_code() -> None:
    """The gateway's rules are its own: serving requests (which also reads the engine's prices.json, as data)
    loads no module of ``imagegen_provider`` beyond the bare package that holds the price file."""
    import subprocess
    import sys

    code = (
        "import sys, httpx, asyncio\n"
        "from imagegen_gateway import create_app\n"
        "async def main():\n"
        "    transport = httpx.ASGITransport(app=create_app())\n"
        "    async with httpx.AsyncClient(transport=transport, base_url='http://g') as client:\n"
        "        r = await client.post('/v1/images/generations', headers={'Authorization': 'Bearer k'},\n"
        "                              json={'model': 'gpt-image-1', 'prompt': 'x', 'quality': 'low'})\n"
        "        assert r.status_code == 200, r.text\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith('imagegen_provider')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['imagegen_provider']"

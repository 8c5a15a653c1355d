"""ImageGenerationHook with connections from ``AIRFLOW_CONN_*`` environment variables (JSON form): no
metadata database is needed for those in Airflow 3.3."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from imagegen_gateway import GatewayConfig
from imagegen_provider.hooks.image_generation import ImageGenerationHook
from imagegen_provider.wire.request import ImageRequest

KEY = "hook-test-key-5d41402abc"


@pytest.fixture
def connection(monkeypatch):
    """``connection(host=..., password=..., extra={...})`` → a fresh connection id served from the environment."""

    def make(**fields: Any) -> str:
        conn_id = f"imagegen_test_{uuid.uuid4().hex[:8]}"
        payload = {"conn_type": "imagegen", **fields}
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(payload))
        return conn_id

    return make


def _request(**overrides: Any) -> ImageRequest:
    params = {"prompt": "a lighthouse at dusk", "model": "dall-e-2", "size": "256x256", "response_format": "b64_json"}
    params.update(overrides)
    return ImageRequest.build(**params)


def test_settings_come_from_the_env_connection(connection):
    conn_id = connection(
        host="api.indoxhub.com", schema="api/v1", password=KEY,
        extra={"dialect": "indoxhub", "rpm": 90, "max_attempts": 3, "model": "openai/dall-e-3", "junk": "x"},
    )
    hook = ImageGenerationHook(imagegen_conn_id=conn_id)
    settings = hook.settings
    assert settings.base_url == "https://api.indoxhub.com/api/v1"
    assert settings.api_key == KEY
    assert settings.dialect == "indoxhub" and settings.model == "openai/dall-e-3"
    assert settings.limits.requests_per_minute == 90 and settings.max_attempts == 3
    # The connection id names the shared rate-limit budget.
    assert settings.limits.namespace == conn_id
    assert KEY not in repr(settings)


@pytest.mark.parametrize(("dialect", "path"), [("openai", "/v1"), ("indoxhub", "/api/v1"), ("router", "/router/v1")])
async def test_get_client_against_the_in_process_gateway(connection, dialect, path):
    conn_id = connection(host="local", password=KEY, extra={"dialect": dialect, "local_gateway": {"api_key": KEY}})
    hook = ImageGenerationHook(imagegen_conn_id=conn_id)
    async with hook.get_client() as client:
        assert client.endpoint == f"http://imagegen.local{path}/images/generations"
        generation = await client.generate(_request(response_format="url"))
    [image] = generation.images
    assert (image.info.format, image.info.width, image.info.height) == ("png", 256, 256)
    if dialect == "router":
        # The router documents no response_format: always base64.
        assert image.source_url is None
    else:
        # URL images are downloaded from the same in-process gateway.
        assert image.source_url and image.source_url.startswith("http://imagegen.local/files/")


async def test_get_client_against_a_loopback_gateway(connection, gateway_factory):
    gw = gateway_factory(GatewayConfig(api_key=KEY))
    conn_id = connection(host=gw.host, port=gw.port, schema="api/v1", password=KEY, extra={"dialect": "indoxhub"})
    hook = ImageGenerationHook(imagegen_conn_id=conn_id)
    async with hook.get_client() as client:
        assert client.base_url == f"http://127.0.0.1:{gw.port}/api/v1"  # loopback: plain http
        generation = await client.generate(_request(seed=5))
    assert generation.images[0].info.width == 256
    stats = gw.stats()
    assert stats["last_request_paths"] == ["/api/v1/images/generations"]
    assert stats["last_request_bodies"][0]["additional_params"] == {"seed": 5}


async def test_get_client_overrides_win(connection):
    conn_id = connection(host="local", password=KEY, extra={"rpm": 600, "max_attempts": 5})
    hook = ImageGenerationHook(imagegen_conn_id=conn_id)
    async with hook.get_client(requests_per_minute=30, max_in_flight=2, max_attempts=2) as client:
        assert client.limiter.requests_per_minute == 30
        assert client.limiter.limits.max_in_flight == 2
        assert client.retry.max_attempts == 2
    assert hook.settings.limits.requests_per_minute == 600  # the connection's settings are untouched


def test_test_connection_ok_over_loopback(connection, gateway_factory):
    gw = gateway_factory(GatewayConfig(api_key=KEY))
    conn_id = connection(host=gw.base_url + "/router/v1", password=KEY, extra={"dialect": "router"})
    ok, message = ImageGenerationHook(imagegen_conn_id=conn_id).test_connection()
    assert ok is True
    assert f"{len(GatewayConfig().models)} models" in message and gw.base_url in message
    assert gw.stats()["by_route"] == {"/router/v1/models": 1}


def test_test_connection_ok_in_process(connection):
    conn_id = connection(host="local", password=KEY)
    ok, message = ImageGenerationHook(imagegen_conn_id=conn_id).test_connection()
    assert ok is True and "bundled local gateway" in message


def test_test_connection_wrong_key(connection, gateway_factory):
    gw = gateway_factory(GatewayConfig(api_key="the-right-key-0000"))
    conn_id = connection(host=gw.base_url + "/v1", password=KEY)
    ok, message = ImageGenerationHook(imagegen_conn_id=conn_id).test_connection()
    assert ok is False
    assert "401" in message
    assert KEY not in message and "the-right-key-0000" not in message


def test_test_connection_unreachable_port(connection):
    from tests.conftest import free_port

    conn_id = connection(host="127.0.0.1", port=free_port(), password=KEY, extra={"connect_timeout": 2})
    ok, message = ImageGenerationHook(imagegen_conn_id=conn_id).test_connection()
    assert ok is False
    assert "cannot reach" in message and KEY not in message


def test_test_connection_bad_extra_is_reported_not_raised(connection):
    conn_id = connection(host="local", password=KEY, extra={"rpm": "lots"})
    ok, message = ImageGenerationHook(imagegen_conn_id=conn_id).test_connection()
    assert ok is False
    assert "rpm" in message and KEY not in message


def test_hook_identity():
    assert ImageGenerationHook.conn_type == "imagegen"
    assert ImageGenerationHook.conn_name_attr == "imagegen_conn_id"
    assert ImageGenerationHook().imagegen_conn_id == ImageGenerationHook.default_conn_name == "imagegen_default"

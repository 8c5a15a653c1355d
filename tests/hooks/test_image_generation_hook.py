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
    assert "401 Unauthorized: the gateway refused the API key" in message
    assert KEY not in message and "the-right-key-0000" not in message


def test_test_connection_unreachable_port(connection):
    from tests.conftest import free_port

    conn_id = connection(host="127.0.0.1", port=free_port(), password=KEY, extra={"connect_timeout": 2})
    ok, message = ImageGenerationHook(imagegen_conn_id=conn_id).test_connection()
    assert ok is False
    assert "cannot reach" in message and KEY not in message
    assert "connection refused by 127.0.0.1:" in message


def test_test_connection_bad_extra_is_reported_not_raised(connection):
    conn_id = connection(host="local", password=KEY, extra={"rpm": "lots"})
    ok, message = ImageGenerationHook(imagegen_conn_id=conn_id).test_connection()
    assert ok is False
    assert "rpm" in message and KEY not in message


def test_hook_identity():
    assert ImageGenerationHook.conn_type == "imagegen"
    assert ImageGenerationHook.conn_name_attr == "imagegen_conn_id"
    assert ImageGenerationHook().imagegen_conn_id == ImageGenerationHook.default_conn_name == "imagegen_default"


def test_test_connection_unknown_host_names_dns(connection, monkeypatch):
    """The resolver is stubbed: no lookup leaves the machine, and no connection is ever opened."""
    import socket

    looked_up: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def resolver(host, *args, **kwargs):
        if host == "images.gateway.invalid":
            looked_up.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)

    def no_connection(*args, **kwargs):
        raise AssertionError("a connection was opened to an unresolvable host")

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    monkeypatch.setattr(socket.socket, "connect", no_connection)
    monkeypatch.setattr(socket.socket, "connect_ex", no_connection)
    conn_id = connection(host="images.gateway.invalid", password=KEY, extra={"connect_timeout": 2})
    ok, message = ImageGenerationHook(imagegen_conn_id=conn_id).test_connection()
    assert ok is False
    assert "unknown host 'images.gateway.invalid': DNS lookup failed" in message, message
    assert looked_up and KEY not in message


@pytest.fixture
def silent_server():
    """A loopback TCP server that accepts connections and never answers."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    for sock in accepted:
        sock.close()
    server.close()


def test_test_connection_read_timeout(connection, silent_server):
    conn_id = connection(host="127.0.0.1", port=silent_server, password=KEY, extra={"timeout": 1})
    ok, message = ImageGenerationHook(imagegen_conn_id=conn_id).test_connection()
    assert ok is False
    assert "accepts connections, but no answer (timed out)" in message, message
    assert KEY not in message


@pytest.fixture
def untrusted_tls_server(tmp_path):
    """A loopback TLS server with a self-signed certificate (which no client trusts)."""
    import datetime
    import socket
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                sock, _ = server.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(sock, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refuses the certificate: expected
            finally:
                sock.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    server.close()


def test_test_connection_untrusted_tls(connection, untrusted_tls_server):
    conn_id = connection(host=f"https://localhost:{untrusted_tls_server}/v1", password=KEY)
    ok, message = ImageGenerationHook(imagegen_conn_id=conn_id).test_connection()
    assert ok is False
    assert f"TLS certificate of localhost:{untrusted_tls_server} not trusted" in message, message
    assert KEY not in message


def test_get_conn_is_a_configured_client(connection):
    from imagegen_provider.transport.client import ImageGenClient

    conn_id = connection(host="local", password=KEY, extra={"dialect": "indoxhub", "max_attempts": 2})
    client = ImageGenerationHook(imagegen_conn_id=conn_id).get_conn()
    assert isinstance(client, ImageGenClient)
    assert client.endpoint == "http://imagegen.local/api/v1/images/generations"
    assert client.retry.max_attempts == 2


def test_generate_image_synchronously(connection, gateway_factory):
    gw = gateway_factory()
    conn_id = connection(host=gw.base_url + "/v1", password=KEY, extra={"model": "dall-e-2"})
    hook = ImageGenerationHook(imagegen_conn_id=conn_id)
    generation = hook.generate_image("a lighthouse at dusk", size="256x256", response_format="b64_json", n=2)
    assert [(i.info.width, i.info.height) for i in generation.images] == [(256, 256), (256, 256)]
    assert generation.images[0].data[:8] == b"\x89PNG\r\n\x1a\n"
    [body] = gw.stats()["last_request_bodies"]
    assert body["model"] == "dall-e-2" and body["n"] == 2  # the connection's default model was sent


async def test_generate_image_from_inside_a_running_loop(connection):
    """A caller that already runs a loop (a notebook, an async task) gets the images too: the call runs in a
    loop of its own on a worker thread."""
    conn_id = connection(host="local", password=KEY)
    hook = ImageGenerationHook(imagegen_conn_id=conn_id)
    generation = hook.generate_image("a kite", model="dall-e-2", size="256x256", response_format="b64_json")
    assert len(generation.images) == 1


def test_generate_image_rejects_a_bad_request_before_sending(connection):
    from imagegen_provider.wire.errors import RequestValidationError

    conn_id = connection(host="local", password=KEY)
    with pytest.raises(RequestValidationError, match="size"):
        ImageGenerationHook(imagegen_conn_id=conn_id).generate_image("x", model="dall-e-2", size="7x7")


def test_local_gateway_is_announced_once(connection, caplog):
    import logging

    conn_id = connection(host="local", password=KEY)
    hook = ImageGenerationHook(imagegen_conn_id=conn_id)
    with caplog.at_level(logging.INFO):
        hook.get_client()
        hook.get_client()
        hook.generate_image("a kite", model="dall-e-2", size="256x256", response_format="b64_json")
    notes = [r for r in caplog.records if "images are generated placeholders" in r.getMessage()]
    assert len(notes) == 1 and conn_id in notes[0].getMessage()


def test_a_real_gateway_is_not_announced_as_placeholders(connection, caplog, gateway_factory):
    import logging

    gw = gateway_factory()
    conn_id = connection(host=gw.base_url + "/v1", password=KEY)
    with caplog.at_level(logging.INFO):
        ImageGenerationHook(imagegen_conn_id=conn_id).get_client()
    assert not any("placeholders" in r.getMessage() for r in caplog.records)


PLAIN_TASK_DAG = '''
import pendulum
from airflow.sdk import DAG, task

from imagegen_provider.hooks.image_generation import ImageGenerationHook

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):

    @task
    def one_image() -> dict:
        generation = ImageGenerationHook(imagegen_conn_id={conn_id!r}).generate_image(
            "a lighthouse at dusk", model="dall-e-2", size="256x256", response_format="b64_json", seed=11
        )
        image = generation.images[0]
        with open({out!r}, "wb") as handle:
            handle.write(image.data)
        return {{"width": image.info.width, "format": image.info.format}}

    one_image()
'''


def test_generate_image_in_a_plain_task_under_dag_test(airflow_db, connection, tmp_path, monkeypatch):
    from PIL import Image

    from tests.operators.conftest import run_dag_file

    dag_id = "imagegen_test_hook_plain_task"
    conn_id = connection(host="local", password=KEY)
    out = tmp_path / "one.png"
    source = PLAIN_TASK_DAG.format(dag_id=dag_id, conn_id=conn_id, out=str(out))
    run = run_dag_file(source, dag_id, tmp_path / "dags", monkeypatch)
    assert run.state == "success", {ti.task_id: ti.state for ti in run.get_task_instances()}
    with Image.open(out) as image:
        image.load()
        assert image.size == (256, 256) and image.format == "PNG"

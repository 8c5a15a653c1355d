"""Shared fixtures: real servers on loopback (the bundled gateway, an S3-compatible server, an Azure Blob emulator,
Redis)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Airflow reads its home at import time: tests get their own, never the user's ~/airflow or the demo's.
os.environ.setdefault("AIRFLOW_HOME", str(REPO / ".airflow-test"))
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from imagegen_gateway import GatewayConfig, run_gateway_in_thread  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture
def gateway_factory():
    """Start bundled gateways on loopback: ``handle = gateway_factory(GatewayConfig(...))``."""
    stack = []

    def start(config: GatewayConfig | None = None):
        context = run_gateway_in_thread(config or GatewayConfig())
        handle = context.__enter__()
        stack.append(context)
        return handle

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


@pytest.fixture
def gateway(gateway_factory):
    """A well-behaved bundled gateway on a real loopback socket."""
    return gateway_factory()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict]:
    """A real S3-compatible server (moto's standalone server) on loopback, with a bucket ``imagegen-test``."""
    binary = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if binary is None:
        pytest.skip("moto_server is not installed (pip install -e .[test])")
    port = free_port()
    process = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
        import s3fs

        fs = s3fs.S3FileSystem(**options)
        # No LocationConstraint: moto (like AWS) rejects an explicit us-east-1 constraint.
        fs.call_s3("create_bucket", Bucket="imagegen-test")
        fs.invalidate_cache()
        yield {"endpoint": endpoint, "storage_options": options, "bucket": "imagegen-test"}
    finally:
        process.terminate()
        process.wait(timeout=10)


#: The published development account of Azure's storage emulators (documented by Microsoft, not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _azurite_binary() -> str | None:
    local = REPO / ".tools" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    return shutil.which("azurite-blob")


@pytest.fixture(scope="session")
def azurite(tmp_path_factory) -> Iterator[dict]:
    """Azurite's blob service (``scripts/install-azurite.sh``) on a free loopback port, with a container
    ``imagegen-test``, reached through the development account's connection string."""
    binary = _azurite_binary()
    if binary is None or shutil.which("node") is None:
        pytest.skip("Azurite is not installed (scripts/install-azurite.sh; needs Node.js and npm)")
    try:
        import adlfs
    except ImportError:
        pytest.skip("adlfs is not installed (pip install -e .[azure])")
    port = free_port()
    location = tmp_path_factory.mktemp("azurite")
    debug_log = location / "debug.log"
    process = subprocess.Popen(
        [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(location / "data"),
         "--skipApiVersionCheck", "--loose", "--silent", "--disableTelemetry", "--debug", str(debug_log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
        connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={endpoint};"
        )
        options = {"connection_string": connection_string}
        adlfs.AzureBlobFileSystem(**options, skip_instance_cache=True).mkdir("imagegen-test")
        yield {
            "endpoint": endpoint,
            "connection_string": connection_string,
            "storage_options": options,
            "container": "imagegen-test",
            "account": AZURITE_ACCOUNT,
            "key": AZURITE_KEY,
            "debug_log": debug_log,
        }
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real ``redis-server`` on a free loopback port (Debian package ``redis-server``)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """A migrated SQLite metadata DB in the tests' Airflow home (``airflow db migrate``, ~5 s once)."""
    airflow = shutil.which("airflow", path=os.path.dirname(sys.executable)) or "airflow"
    subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True, env=os.environ.copy())
    return os.environ["AIRFLOW_HOME"]


# -- Airflow connections for the object stores (operators and hooks read them from AIRFLOW_CONN_* variables) ------


@pytest.fixture
def no_store_credentials_in_env(monkeypatch):
    """No AWS_*/AZURE_* variables: a test that passes proves the credentials came from the connection."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "AZURE_")):
            monkeypatch.delenv(name)


@pytest.fixture
def aws_conn(s3_server, monkeypatch) -> str:
    """An ``aws`` connection to the moto S3 server."""
    conn_id = f"moto_{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"endpoint_url": s3_server["endpoint"], "region_name": "us-east-1"},
    }))
    return conn_id


@pytest.fixture
def adls_conn(azurite, monkeypatch) -> str:
    """An ``adls`` connection to Azurite (needs the Microsoft Azure provider)."""
    pytest.importorskip("airflow.providers.microsoft.azure")
    conn_id = f"azurite_{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({
        "conn_type": "adls", "extra": {"connection_string": azurite["connection_string"]},
    }))
    return conn_id

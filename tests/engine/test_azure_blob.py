"""Put Blob uploads to Azure Blob Storage (imagegen_provider.engine.azure_blob): signed by the SDK, checked by the
store, retried within bounds, and never carrying a secret into an error."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.server
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import ClassVar

import pytest

from imagegen_provider.engine import azure_blob
from imagegen_provider.engine.azure_blob import BlobUploadError, blob_uploads_for
from imagegen_provider.engine.storage import StorageLocation
from imagegen_provider.wire.errors import _secret_forms
from tests.conftest import free_port

adlfs = pytest.importorskip("adlfs")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


def _no_sdk_uploads(monkeypatch) -> None:
    async def refuse(*args, **kwargs):
        raise AssertionError("the upload went through the SDK")

    monkeypatch.setattr(adlfs.AzureBlobFileSystem, "_pipe_file", refuse)


def _location(options: dict, url: str) -> StorageLocation:
    return StorageLocation.from_url(url, {**options, "skip_instance_cache": True})


async def _refused_write(options: dict, url: str, match: str | None = None, relative: str = "images/a.png"):
    """Write ``relative`` under ``url``, which must fail with a :class:`BlobUploadError` (matching ``match``);
    returns the error."""
    location = _location(options, url)
    try:
        with pytest.raises(BlobUploadError, match=match) as caught:
            await location.write_bytes_async(relative, PNG)
    finally:
        await location.aclose()
    return caught.value


def _container_sas(azurite, **permissions) -> str:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    return generate_container_sas(
        azurite["account"], azurite["container"], account_key=azurite["key"],
        permission=ContainerSasPermissions(**permissions), expiry=datetime.now(UTC) + timedelta(hours=1),
    )


def _assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        leaked = [form for form in _secret_forms(secret) if len(form) >= 8 and form in text]
        assert not leaked, f"{text!r} carries a form of a secret"


async def test_an_account_key_makes_signed_put_blob_requests_the_store_checks(azurite, monkeypatch):
    location = _location(azurite["storage_options"], f"az://{azurite['container']}/key-signed")
    assert location._blob_uploads is not None
    _no_sdk_uploads(monkeypatch)
    try:
        assert await asyncio.to_thread(location.list_files, "images") == []  # a cached, empty listing
        await location.write_bytes_async("images/p1/0-7.png", PNG, atomic=True)
        await location.write_bytes_async("metadata/_journal/w/a.json", b'{"x": 1}\n', atomic=True)
    finally:
        await location.aclose()
    # The cached listing of the folder was dropped: the blob shows at once.
    assert await asyncio.to_thread(location.list_files, "images") == ["images/p1/0-7.png"]
    assert await asyncio.to_thread(location.read_bytes, "images/p1/0-7.png") == PNG
    from azure.storage.blob import BlobServiceClient

    blob = BlobServiceClient.from_connection_string(azurite["connection_string"]).get_blob_client(
        azurite["container"], "key-signed/images/p1/0-7.png"
    )
    properties = blob.get_blob_properties()
    assert properties.content_settings.content_type == "image/png"
    assert bytes(properties.content_settings.content_md5) == hashlib.md5(PNG).digest()
    assert properties.metadata == {"is_directory": "false"}


async def test_names_that_need_quoting_are_stored_under_the_name_given(azurite, monkeypatch):
    location = _location(azurite["storage_options"], f"az://{azurite['container']}/odd root+é")
    _no_sdk_uploads(monkeypatch)
    names = ["images/a b+c%d/0-1.png", "images/é~!$&'()*,;=:@/x.png", "images/percent%2F/y.png"]
    try:
        for name in names:
            await location.write_bytes_async(name, name.encode())
    finally:
        await location.aclose()
    assert await asyncio.to_thread(location.list_files, "images") == sorted(names)
    for name in names:
        assert await asyncio.to_thread(location.read_bytes, name) == name.encode()


async def test_a_redirect_is_refused_not_followed(scripted_store):
    scripted_store.script = [307]
    await _refused_write(_key_options(scripted_store.port), "az://c/run", "HTTP 307")
    assert len(scripted_store.received) == 1


async def test_a_body_changed_on_the_way_is_refused_and_not_stored(azurite):
    location = _location(azurite["storage_options"], f"az://{azurite['container']}/md5")
    uploads = location._blob_uploads
    assert uploads is not None
    path = location.path("images/a.png")
    url = f"{uploads.endpoint}{path}"
    wrong = base64.b64encode(hashlib.md5(b"another body").digest()).decode()
    headers = {"x-ms-blob-type": "BlockBlob", "x-ms-version": uploads.api_version, "Content-MD5": wrong,
               "Content-Type": "image/png", "Content-Length": str(len(PNG))}
    try:
        # Azure answers Md5Mismatch; Azurite, InvalidOperation "Provided contentMD5 doesn't match."
        with pytest.raises(BlobUploadError, match=r"HTTP 400 .*(Md5Mismatch|contentMD5 doesn't match)") as refused:
            await uploads._put_once(path, url, PNG, headers)
    finally:
        await location.aclose()
    assert not refused.value.retryable
    assert not await asyncio.to_thread(location.exists, "images/a.png")


async def test_a_sas_the_user_gave_authorises_uploads_and_never_shows(azurite, monkeypatch):
    sas = _container_sas(azurite, read=True, write=True, create=True, list=True)
    options = {"connection_string": f"BlobEndpoint={azurite['endpoint']};SharedAccessSignature={sas}"}
    location = _location(options, f"az://{azurite['container']}/by-sas")
    _no_sdk_uploads(monkeypatch)
    try:
        await location.write_bytes_async("images/b.png", PNG)
    finally:
        await location.aclose()
    assert await asyncio.to_thread(location.read_bytes, "images/b.png") == PNG

    read_only = _container_sas(azurite, read=True)
    options = {"connection_string": f"BlobEndpoint={azurite['endpoint']};SharedAccessSignature={read_only}"}
    refused = await _refused_write(
        options, f"az://{azurite['container']}/by-sas", r"Put Blob .*by-sas/images/c.png: HTTP 403", "images/c.png"
    )
    _assert_no_secret(str(refused), read_only)


async def test_a_refused_upload_names_the_blob_and_carries_no_key(azurite):
    refused = await _refused_write(azurite["storage_options"], "az://no-such-container/run")
    text = str(refused)
    assert "no-such-container/run/images/a.png" in text and "HTTP 404 ContainerNotFound" in text
    assert not refused.retryable
    _assert_no_secret(text, azurite["key"])


async def test_an_unreachable_store_fails_within_bounds_without_the_sas(monkeypatch):
    monkeypatch.setattr(azure_blob, "ATTEMPTS", 2)
    sas = "sv=2026-10-06&sr=c&sp=cw&sig=c2VjcmV0LXNpZ25hdHVyZS1mb3ItdGVzdHM%3D"
    options = {"connection_string": f"BlobEndpoint=http://127.0.0.1:{free_port()}/acct;SharedAccessSignature={sas}"}
    started = time.monotonic()
    refused = await _refused_write(options, "az://c/run", r"Put Blob c/run/images/a\.png: ClientConnectorError")
    assert time.monotonic() - started < 10
    assert refused.retryable and refused.__cause__ is None and refused.__suppress_context__
    _assert_no_secret(str(refused), sas, "c2VjcmV0LXNpZ25hdHVyZS1mb3ItdGVzdHM=")


class _ScriptedStore(http.server.BaseHTTPRequestHandler):
    """Answers each PUT with the next status of ``script`` (the last one repeats) and records what it got."""

    # Given per test by the fixture (a class of its own each time).
    script: ClassVar[list[int]] = [201]
    received: ClassVar[list[dict]] = []
    silent = False

    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append({"headers": dict(self.headers), "body": body})
        if type(self).silent:
            time.sleep(3)
            return
        script = type(self).script
        status = script.pop(0) if len(script) > 1 else script[0]
        self.send_response(status)
        if 300 <= status < 400:  # a redirect to another blob of this very server: following it would show
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/acct/c/elsewhere.png")
        if status != 201:
            self.send_header("x-ms-error-code", "ServerBusy" if status == 503 else "InvalidHeaderValue")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_store() -> Iterator[type[_ScriptedStore]]:
    handler = type("Store", (_ScriptedStore,), {"script": [201], "received": [], "silent": False})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.port = server.server_address[1]
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def _key_options(port: int) -> dict:
    key = base64.b64encode(b"a test account key, 32 bytes....").decode()
    return {"connection_string": f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={key};"
                                 f"BlobEndpoint=http://127.0.0.1:{port}/acct;"}


async def test_transient_answers_are_retried_and_each_attempt_is_signed_anew(scripted_store):
    scripted_store.script = [503, 500, 201]
    location = _location(_key_options(scripted_store.port), "az://c/run")
    try:
        await location.write_bytes_async("images/a.png", PNG)
    finally:
        await location.aclose()
    assert len(scripted_store.received) == 3
    for request in scripted_store.received:
        assert request["body"] == PNG
        assert request["headers"]["Content-MD5"] == base64.b64encode(hashlib.md5(PNG).digest()).decode()
        assert request["headers"]["Authorization"].startswith("SharedKey acct:")
        assert request["headers"]["x-ms-date"]


async def test_a_store_that_keeps_failing_is_given_up_after_the_attempts_allowed(scripted_store):
    scripted_store.script = [503]
    refused = await _refused_write(_key_options(scripted_store.port), "az://c/run", "HTTP 503 ServerBusy")
    assert refused.retryable and len(scripted_store.received) == azure_blob.ATTEMPTS


async def test_a_request_the_store_calls_bad_is_not_sent_again(scripted_store):
    scripted_store.script = [400]
    await _refused_write(_key_options(scripted_store.port), "az://c/run", "HTTP 400 InvalidHeaderValue")
    assert len(scripted_store.received) == 1


async def test_a_store_that_never_answers_is_waited_for_within_a_bound(scripted_store, monkeypatch):
    scripted_store.silent = True
    monkeypatch.setattr(azure_blob, "READ_TIMEOUT_S", 0.5)
    monkeypatch.setattr(azure_blob, "ATTEMPTS", 2)
    started = time.monotonic()
    await _refused_write(_key_options(scripted_store.port), "az://c/run", "Timeout")
    assert time.monotonic() - started < 2 * 0.5 + 1 + 2  # two read timeouts, one wait, slack
    assert len(scripted_store.received) == 2


async def test_closing_releases_the_session_and_a_later_upload_reopens_one(scripted_store):
    location = _location(_key_options(scripted_store.port), "az://c/run")
    child = location.child("metadata")
    assert child._blob_uploads is location._blob_uploads  # one session for a run's locations
    await child.write_bytes_async("a.json", b"{}")
    session = location._blob_uploads._session
    assert session is not None and not session.closed
    await location.aclose()
    assert session.closed
    await location.write_bytes_async("images/b.png", PNG)
    assert location._blob_uploads._session is not None and not location._blob_uploads._session.closed
    await location.aclose()


def test_credentials_without_a_key_or_a_sas_keep_the_sdk_path(tmp_path):
    anonymous = adlfs.AzureBlobFileSystem(account_name="acct", anon=True, skip_instance_cache=True)
    assert blob_uploads_for(anonymous, trust_env=False) is None

    class TokenCredential:  # what azure-identity's credentials look like to the SDK
        def get_token(self, *scopes, **kwargs):
            raise AssertionError("no token is asked for when the filesystem is made")

    with_token = adlfs.AzureBlobFileSystem(account_name="acct", credential=TokenCredential(), skip_instance_cache=True)
    assert blob_uploads_for(with_token, trust_env=False) is None
    assert StorageLocation.from_url(str(tmp_path))._blob_uploads is None
    assert StorageLocation.from_url("memory://bucket/run")._blob_uploads is None

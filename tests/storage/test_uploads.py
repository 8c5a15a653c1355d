"""How uploads reach an object store: as coroutines on an event loop (no worker thread held per upload), and,
on Azure, without the per-request environment lookups that can find nothing."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import aiohttp.client
import pytest

from imagegen_provider.engine.storage import StorageLocation

from ._stores import make_store

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.mark.parametrize("kind", ["s3", "az"])
async def test_uploads_to_an_object_store_need_no_worker_thread(request, tmp_path, kind):
    store = make_store(kind, request, tmp_path)
    location = StorageLocation.from_url(store.url, store.storage_options)
    # Every worker thread of the loop busy: an upload that needed one would wait for it.
    release = threading.Event()
    pool = ThreadPoolExecutor(max_workers=1)
    asyncio.get_running_loop().set_default_executor(pool)
    busy = asyncio.get_running_loop().run_in_executor(None, release.wait)
    try:
        names = [f"images/p{i}/0.png" for i in range(24)]
        await asyncio.wait_for(
            asyncio.gather(*(location.write_bytes_async(n, n.encode(), atomic=True) for n in names)), timeout=60
        )
        assert not busy.done()
        release.set()
        await busy
        assert await asyncio.to_thread(location.list_files, "images") == sorted(names)
        assert await asyncio.to_thread(location.read_bytes, names[3]) == names[3].encode()
    finally:
        release.set()
        pool.shutdown(wait=False)
        await location.aclose()


async def test_an_upload_the_store_refuses_raises_in_the_caller(azurite):
    missing = StorageLocation.from_url("az://no-such-container/run", azurite["storage_options"])
    # The store's own error, as the sync wrapper would raise it (the runner turns it into a storage failure).
    try:
        with pytest.raises(Exception, match="container does not exist"):
            await asyncio.wait_for(missing.write_bytes_async("images/a.png", b"x"), timeout=60)
    finally:
        await missing.aclose()


def _count_env_lookups(monkeypatch) -> list[str]:
    """Every netrc and proxy lookup aiohttp makes for a request (it makes them only with ``trust_env``)."""
    calls: list[str] = []
    netrc_from_env, proxy_for_url = aiohttp.client.netrc_from_env, aiohttp.client.get_env_proxy_for_url

    def netrc_counted():
        calls.append("netrc")
        return netrc_from_env()

    def proxy_counted(url):
        calls.append("proxy")
        return proxy_for_url(url)

    monkeypatch.setattr(aiohttp.client, "netrc_from_env", netrc_counted)
    monkeypatch.setattr(aiohttp.client, "get_env_proxy_for_url", proxy_counted)
    return calls


def _fresh_azure_location(azurite, name: str) -> StorageLocation:
    # A filesystem of its own: fsspec's cached one has its HTTP session open already.
    options = {**azurite["storage_options"], "skip_instance_cache": True}
    return StorageLocation.from_url(f"az://{azurite['container']}/{name}", options)


async def test_azure_uploads_skip_environment_lookups_that_can_find_nothing(azurite, monkeypatch, tmp_path):
    for name in (*PROXY_VARIABLES, "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # names no proxy: nothing to look up either
    calls = _count_env_lookups(monkeypatch)
    location = _fresh_azure_location(azurite, "no-env")
    await asyncio.gather(*(location.write_bytes_async(f"images/{i}.png", b"x") for i in range(5)))
    await location.aclose()
    assert await asyncio.to_thread(location.list_files, "images") == [f"images/{i}.png" for i in range(5)]
    assert calls == []


@pytest.mark.parametrize("configured", ["netrc", "proxy"])
async def test_azure_uploads_still_look_up_what_the_environment_configures(azurite, monkeypatch, tmp_path, configured):
    for name in (*PROXY_VARIABLES, "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    if configured == "netrc":
        netrc = tmp_path / "netrc"
        netrc.write_text("machine example.invalid login someone password nothing\n")
        monkeypatch.setenv("NETRC", str(netrc))
    else:
        # A proxy for everything but the emulator on loopback (port 9: nothing listens, nothing may reach it).
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    calls = _count_env_lookups(monkeypatch)
    location = _fresh_azure_location(azurite, f"with-{configured}")
    await asyncio.gather(*(location.write_bytes_async(f"images/{i}.png", b"x") for i in range(5)))
    await location.aclose()
    # The SDK's default behaviour, kept: aiohttp looks the environment up for every request.
    assert calls.count(configured) >= 5

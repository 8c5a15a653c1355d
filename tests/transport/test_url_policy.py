"""Image URLs come from an untrusted gateway: link-local and metadata addresses are refused always, private and
loopback ones unless the gateway itself is on one (or allow_private_image_urls). The check runs on the resolved
address, inside the connection, again on every redirect — and before any connection is opened.

No test here sends traffic beyond loopback: the resolver is stubbed, and refused addresses are never dialled
(a patched network backend counts every connection attempt).
"""

from __future__ import annotations

import httpcore
import pytest

from imagegen_provider.transport import ImageDownloader, RetryPolicy
from imagegen_provider.transport import addresses as addresses_module
from imagegen_provider.transport.addresses import AddressKind, AddressPolicy, kind_of
from imagegen_provider.transport.download import display_url, without_credentials
from imagegen_provider.wire.errors import ImageDownloadError, ImageExpiredError

from ._scripted import Reply, openai_image_body, png_bytes
from .conftest import generation_fails, small_request

FAST = RetryPolicy(max_attempts=2, backoff_initial=0.01, backoff_max=0.02)


@pytest.fixture
def dialled(monkeypatch) -> list[str]:
    """Every address a download connection was opened to."""
    seen: list[str] = []
    original = httpcore.AnyIOBackend.connect_tcp

    async def counting(self, host, port, *args, **kwargs):
        seen.append(host)
        return await original(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", counting)
    return seen


@pytest.fixture
def resolver(monkeypatch) -> dict[str, list[str]]:
    """A stubbed resolver: host name -> addresses (unknown names do not resolve)."""
    table: dict[str, list[str]] = {}

    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"no such host {host}")
        return table[host]

    monkeypatch.setattr(addresses_module, "resolve_host", resolve)
    return table


async def _fetch(url: str, policy: AddressPolicy) -> bytes:
    downloader = ImageDownloader(retry=FAST, policy=policy)
    try:
        return await downloader.fetch(url)
    finally:
        await downloader.aclose()


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("169.254.169.254", AddressKind.FORBIDDEN), ("169.254.0.1", AddressKind.FORBIDDEN),
        ("fd00:ec2::254", AddressKind.FORBIDDEN), ("100.100.100.200", AddressKind.FORBIDDEN),
        ("::ffff:169.254.169.254", AddressKind.FORBIDDEN), ("fe80::1", AddressKind.FORBIDDEN),
        ("0.0.0.0", AddressKind.FORBIDDEN), ("224.0.0.1", AddressKind.FORBIDDEN),
        ("10.0.0.1", AddressKind.PRIVATE), ("192.168.1.5", AddressKind.PRIVATE), ("172.16.0.9", AddressKind.PRIVATE),
        ("100.64.0.1", AddressKind.PRIVATE), ("fd12::1", AddressKind.PRIVATE),
        ("127.0.0.1", AddressKind.LOOPBACK), ("::1", AddressKind.LOOPBACK), ("::ffff:127.0.0.1", AddressKind.LOOPBACK),
        ("8.8.8.8", AddressKind.PUBLIC), ("2001:4860:4860::8888", AddressKind.PUBLIC),
    ],
)
def test_kind_of(address, kind):
    import ipaddress

    assert kind_of(ipaddress.ip_address(address)) is kind


@pytest.mark.parametrize("answer", [["169.254.169.254"], ["10.0.0.1"], ["93.184.216.34", "169.254.169.254"],
                                    ["127.0.0.1"], ["fd00:ec2::254"]])
async def test_refused_before_any_connection(resolver, dialled, answer):
    resolver["images.example.com"] = answer
    resolver["api.gateway.example"] = ["93.184.216.34"]
    policy = AddressPolicy(gateway_host="api.gateway.example")
    with pytest.raises(ImageDownloadError, match="refusing"):
        await _fetch("http://images.example.com/x.png", policy)
    assert dialled == []


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/latest/", "http://100.100.100.200/x",
     "http://[::ffff:169.254.169.254]/x", "http://169.254.169.254:80/x"],
)
async def test_metadata_literals_are_refused_even_when_private_is_allowed(dialled, url):
    with pytest.raises(ImageDownloadError, match="refusing"):
        await _fetch(url, AddressPolicy(allow_private=True))
    assert dialled == []


async def test_redirect_to_metadata_is_refused_at_the_second_hop(scripted, dialled):
    scripted.on("/img.png", Reply(302, headers={"location": "http://169.254.169.254/latest/meta-data/iam"}))
    with pytest.raises(ImageDownloadError, match="refusing"):
        await _fetch(scripted.base_url + "/img.png", AddressPolicy(allow_private=True))
    assert dialled == ["127.0.0.1"]  # the first hop only


async def test_loopback_images_follow_a_loopback_gateway(scripted, resolver, dialled):
    image = png_bytes(3, 2)
    scripted.on("/img.png", Reply(200, body=image, media_type="image/png"))
    url = scripted.base_url + "/img.png"
    assert await _fetch(url, AddressPolicy(gateway_host="127.0.0.1")) == image
    assert await _fetch(url, AddressPolicy(gateway_host="localhost")) == image
    # A gateway on the internet may not send the client to loopback...
    resolver["api.gateway.example"] = ["93.184.216.34"]
    with pytest.raises(ImageDownloadError, match="loopback"):
        await _fetch(url, AddressPolicy(gateway_host="api.gateway.example"))
    # ...unless the user said so.
    assert await _fetch(url, AddressPolicy(gateway_host="api.gateway.example", allow_private=True)) == image
    assert dialled == ["127.0.0.1"] * 3


async def test_a_name_is_connected_to_at_its_checked_address(scripted, resolver, dialled):
    """The connection goes to the address that was checked, not to a second lookup of the name."""
    image = png_bytes(2, 2)
    scripted.on("/img.png", Reply(200, body=image, media_type="image/png"))
    port = scripted.base_url.rsplit(":", 1)[1]
    resolver["cdn.internal"] = ["127.0.0.1"]
    assert await _fetch(f"http://cdn.internal:{port}/img.png", AddressPolicy(allow_private=True)) == image
    assert dialled == ["127.0.0.1"]
    [seen] = scripted.requests_to("/img.png")
    assert seen.headers["host"] == f"cdn.internal:{port}"


async def test_client_refuses_a_metadata_url_from_the_gateway(scripted, client_for, dialled):
    scripted.on("/v1/images/generations", Reply(200, json=openai_image_body(url="http://169.254.169.254/latest/x")))
    with generation_fails(ImageDownloadError) as caught:
        await client_for(scripted.base_url + "/v1").generate(small_request(response_format="url"))
    assert "refusing" in str(caught.value) and len(caught.paid) == 1
    assert dialled == []


# --- credentials in URLs -------------------------------------------------------------------------------------


def test_credentials_are_stripped_for_the_record():
    url = "https://user:s3cret@cdn.example.com:8443/a/b.png?sig=xyz"
    assert without_credentials(url) == "https://cdn.example.com:8443/a/b.png?sig=xyz"
    assert display_url(url) == "https://cdn.example.com:8443/a/b.png"
    assert without_credentials("https://cdn.example.com/x.png") == "https://cdn.example.com/x.png"


async def test_credentials_never_reach_errors_or_metadata(scripted, client_for):
    image = png_bytes(4, 4)
    scripted.on("/v1/images/generations",
                lambda app, seen: Reply(200, json=openai_image_body(
                    url=app.base_url.replace("http://", "http://user:pa55word@") + "/cdn/ok.png?sig=1")))
    scripted.on("/cdn/ok.png", Reply(200, body=image, media_type="image/png"))
    generation = await client_for(scripted.base_url + "/v1").generate(small_request(response_format="url"))
    assert generation.images[0].data == image
    assert "pa55word" not in generation.images[0].source_url and "user:" not in generation.images[0].source_url

    scripted.on("/v1/images/generations",
                lambda app, seen: Reply(200, json=openai_image_body(
                    url=app.base_url.replace("http://", "http://user:pa55word@") + "/cdn/gone.png")))
    scripted.on("/cdn/gone.png", Reply(404))
    with generation_fails(ImageExpiredError) as caught:
        await client_for(scripted.base_url + "/v1").generate(small_request(response_format="url"))
    assert "pa55word" not in str(caught.value) and "/cdn/gone.png" in str(caught.value)


async def test_credentials_in_the_base_url_never_reach_errors(caplog):
    import logging

    from imagegen_provider.transport import ImageGenClient
    from imagegen_provider.transport.settings import ClientSettings
    from tests.conftest import free_port

    caplog.set_level(logging.DEBUG)
    base = f"http://admin:hunter2pass@127.0.0.1:{free_port()}/v1"
    client = ImageGenClient(base_url=base, retry=RetryPolicy(max_attempts=1))
    try:
        with generation_fails() as caught:
            await client.generate(small_request())
    finally:
        await client.aclose()
    assert "hunter2pass" not in str(caught.value) and "127.0.0.1" in str(caught.value)
    assert "hunter2pass" not in caplog.text
    assert "hunter2pass" not in ClientSettings(base_url=base).describe()

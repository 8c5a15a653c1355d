"""Which addresses an image URL may lead to, checked on the address actually connected to.

An image URL comes from the gateway, which is untrusted input: ``http://169.254.169.254/latest/meta-data/`` would
make the client fetch cloud credentials, and store them as an "image" if they decoded. The check runs inside the
connection itself (:class:`GuardedBackend`): the host is resolved here, every address checked, and the connection
opened to a checked address, so neither DNS rebinding nor a redirect can slip past it.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpcore

from imagegen_provider.wire.errors import ImageDownloadError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressKind(enum.Enum):
    PUBLIC = "public"
    PRIVATE = "private"
    LOOPBACK = "loopback"
    #: Link-local, cloud metadata, unspecified, multicast, reserved: never fetched.
    FORBIDDEN = "forbidden"


#: Cloud metadata services outside the link-local range (AWS IPv6, Alibaba, Azure wire server, Oracle).
_METADATA = tuple(
    ipaddress.ip_network(net)
    for net in ("fd00:ec2::254/128", "100.100.100.200/32", "168.63.129.16/32", "192.0.0.192/32")
)


def kind_of(address: IPAddress) -> AddressKind:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in net for net in _METADATA):
        return AddressKind.FORBIDDEN
    if address.is_loopback:  # before is_reserved: ::1 lies in IPv6's reserved ::/8
        return AddressKind.LOOPBACK
    if address.is_link_local or address.is_unspecified or address.is_multicast or address.is_reserved:
        return AddressKind.FORBIDDEN
    # Carrier-grade NAT (100.64.0.0/10) is not "private" to the ipaddress module, but is not the internet either.
    if address.is_private or address in ipaddress.ip_network("100.64.0.0/10") or not address.is_global:
        return AddressKind.PRIVATE
    return AddressKind.PUBLIC


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (tests replace this to stub the resolver)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


async def addresses_of(host: str, port: int) -> list[IPAddress]:
    literal = _literal(host)
    if literal is not None:
        return [literal]
    try:
        found = await resolve_host(host, port)
    except OSError:
        raise ImageDownloadError(f"cannot resolve image host {host}") from None
    addresses = [a for a in (_literal(text) for text in found) if a is not None]
    if not addresses:
        raise ImageDownloadError(f"image host {host} resolves to no address")
    return addresses


@dataclass
class AddressPolicy:
    """:param allow_private: fetch from private and loopback addresses whatever the gateway's own address.
    :param gateway_host: the gateway's host: private or loopback image hosts are allowed when the gateway's
        own address is of the same kind (a gateway on loopback may serve images from another loopback port)."""

    allow_private: bool = False
    gateway_host: str | None = None
    _gateway_kinds: set[AddressKind] | None = field(default=None, repr=False)

    async def gateway_kinds(self) -> set[AddressKind]:
        if self._gateway_kinds is None:
            kinds: set[AddressKind] = set()
            if self.gateway_host:
                if self.gateway_host.lower() == "localhost":
                    kinds.add(AddressKind.LOOPBACK)
                else:
                    try:
                        kinds = {kind_of(a) for a in await addresses_of(self.gateway_host, 443)}
                    except ImageDownloadError:
                        kinds = set()
            self._gateway_kinds = kinds
        return self._gateway_kinds

    async def refusal(self, address: IPAddress) -> str | None:
        """Why ``address`` may not be fetched from, or ``None`` when it may."""
        kind = kind_of(address)
        if kind is AddressKind.FORBIDDEN:
            return f"{address} is a link-local, metadata or reserved address"
        if kind is AddressKind.PUBLIC or self.allow_private or kind in await self.gateway_kinds():
            return None
        return (
            f"{address} is a {kind.value} address and the gateway is not "
            "(set allow_private_image_urls to allow it)"
        )

    async def checked_address(self, host: str, port: int) -> str:
        """The address to connect to for ``host``: resolved, every address checked (one bad answer refuses the
        host: a resolver mixing public and metadata addresses is an attack, not a fallback)."""
        addresses = await addresses_of(host, port)
        for address in addresses:
            reason = await self.refusal(address)
            if reason is not None:
                raise ImageDownloadError(f"refusing to download image from {host}: {reason}")
        return str(addresses[0])


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses the policy accepts. TLS still verifies the
    certificate against the host name (httpcore passes the URL's host as the server name)."""

    def __init__(self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.policy = policy
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]]
        | None = None,
    ) -> httpcore.AsyncNetworkStream:
        address = await self.policy.checked_address(host, port)
        return await self._inner.connect_tcp(
            address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]]
        | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise ImageDownloadError("image downloads never use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)

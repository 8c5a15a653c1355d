"""Say what failed when a gateway cannot be reached: unknown host, refused connection, TLS, timeout.

The client reports a failed connection as one error class whatever the cause (under the aiohttp transport
even a refused port arrives as ``ConnectTimeout``), which is right for retrying and useless for someone fixing
a connection form. ``Test connection`` is rare and cheap, so after a failure the hook retraces the steps one at
a time — resolve, connect, TLS handshake — and names the first one that fails.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from imagegen_provider.transport.download import default_ssl_context


@dataclass(frozen=True)
class Endpoint:
    """Where a base URL points: host, port, whether TLS is spoken."""

    host: str
    port: int
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        return cls(host=parts.hostname or "", port=parts.port or (443 if tls else 80), tls=tls)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


async def _resolve(endpoint: Endpoint) -> str | None:
    try:
        await asyncio.get_running_loop().getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"unknown host {endpoint.host!r}: DNS lookup failed ({exc.strerror or exc})"
    return None


async def _connect(endpoint: Endpoint, seconds: float) -> str | None:
    context = default_ssl_context() if endpoint.tls else None
    try:
        async with asyncio.timeout(seconds):
            _, writer = await asyncio.open_connection(
                endpoint.host, endpoint.port, ssl=context, server_hostname=endpoint.host if context else None
            )
    except ConnectionRefusedError:
        return f"connection refused by {endpoint} (nothing listening on that port?)"
    except TimeoutError:
        return f"connecting to {endpoint} timed out after {seconds:g} s (firewall, wrong port or host down?)"
    except ssl.SSLCertVerificationError as exc:
        return f"TLS certificate of {endpoint} not trusted: {exc.verify_message or exc.reason}"
    except ssl.SSLError as exc:
        return f"TLS handshake with {endpoint} failed: {exc.reason or type(exc).__name__}"
    except OSError as exc:
        return f"cannot connect to {endpoint}: {exc.strerror or type(exc).__name__}"
    writer.close()
    return None


async def diagnose_unreachable(base_url: str, *, connect_timeout: float) -> str | None:
    """The first step to ``base_url`` that fails, in words; ``None`` when resolve, connect and TLS all work
    (the failure came later: a read timeout or a dropped connection).

    :param base_url: the gateway's base URL.
    :param connect_timeout: seconds allowed for the TCP connect and the TLS handshake.
    """
    endpoint = Endpoint.from_url(base_url)
    return await _resolve(endpoint) or await _connect(endpoint, connect_timeout)

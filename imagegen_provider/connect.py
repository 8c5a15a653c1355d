"""Open a client for :class:`ClientSettings`, serving the bundled gateway in-process when the settings say
``local``. The one place that knows both the transport and the gateway, shared by the hook and the CLI."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import httpx

from imagegen_provider.gateway.app import create_app
from imagegen_provider.gateway.config import GatewayConfig
from imagegen_provider.transport.client import ImageGenClient
from imagegen_provider.transport.settings import ClientSettings, build_client

#: Host name of the in-process gateway; never resolved, requests go through ``httpx.ASGITransport``.
LOCAL_BASE = "http://imagegen.local"

_GATEWAY_FIELDS = {f.name for f in fields(GatewayConfig)}


def local_gateway_config(options: Mapping[str, Any]) -> GatewayConfig:
    """A gateway config from the ``local_gateway`` connection extra (allow-listed to its own fields)."""
    unknown = sorted(set(options) - _GATEWAY_FIELDS)
    if unknown:
        raise ValueError(f"unknown local_gateway option(s): {', '.join(unknown)}")
    values = dict(options)
    if isinstance(values.get("latency"), list):
        values["latency"] = tuple(values["latency"])
    return GatewayConfig(**values)


def open_client(settings: ClientSettings) -> ImageGenClient:
    """A new client (bind it to the event loop that uses it: one per ``asyncio.run``)."""
    if not settings.is_local:
        return build_client(settings)
    app = create_app(local_gateway_config(settings.local_gateway))
    transport = httpx.ASGITransport(app=app)
    return build_client(
        settings,
        base_url=LOCAL_BASE + settings.local_path(),
        transport=transport,
        download_transport=httpx.ASGITransport(app=app),
    )

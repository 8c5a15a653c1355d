"""Open a client for :class:`ClientSettings`, serving the bundled gateway in-process when the settings say
``local``. The one place that knows both the transport and the gateway, shared by the hook and the CLI.

The gateway (``imagegen_gateway``: Starlette, Pillow) is imported only when a local client is opened, so a
hook talking to a real gateway never loads the server side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx

from imagegen_provider.transport.client import ImageGenClient
from imagegen_provider.transport.settings import ClientSettings, build_client

if TYPE_CHECKING:
    from imagegen_gateway.config import GatewayConfig

#: Host name of the in-process gateway; never resolved, requests go through ``httpx.ASGITransport``.
LOCAL_BASE = "http://imagegen.local"


def local_gateway_config(options: Mapping[str, Any]) -> GatewayConfig:
    """A gateway config from the ``local_gateway`` connection extra (allow-listed to its own fields)."""
    from imagegen_gateway.config import config_from_mapping

    return config_from_mapping(options)


def open_client(settings: ClientSettings) -> ImageGenClient:
    """A new client (bind it to the event loop that uses it: one per ``asyncio.run``)."""
    if not settings.is_local:
        remote: ImageGenClient = build_client(settings)
        return remote
    from imagegen_gateway.app import create_app

    app = create_app(local_gateway_config(settings.local_gateway))
    transport = httpx.ASGITransport(app=app)
    local: ImageGenClient = build_client(
        settings,
        base_url=LOCAL_BASE + settings.local_path(),
        transport=transport,
        download_transport=httpx.ASGITransport(app=app),
    )
    return local

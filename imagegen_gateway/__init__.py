"""The bundled local image gateway: the product's zero-setup default and the fixture of every test and
benchmark.

It speaks the three wire dialects of the documented gateways (OpenAI-style ``/v1`` with generations, edits and
variations under OpenAI's documented rules, IndoxHub ``/api/v1``, router ``/router/v1``), returns real images
that show their request, and can rate-limit, charge and misbehave on demand (see :class:`GatewayConfig` or
``imagegen gateway --help``).

Names are imported on first use, so that ``imagegen_gateway.config`` (the CLI's options) can be read without
loading Starlette, uvicorn or Pillow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imagegen_gateway.app import create_app
    from imagegen_gateway.config import GatewayConfig, add_gateway_arguments, config_from_args
    from imagegen_gateway.server import GatewayHandle, run_gateway, run_gateway_in_thread

_HOMES = {
    "create_app": "app",
    "GatewayConfig": "config",
    "add_gateway_arguments": "config",
    "config_from_args": "config",
    "GatewayHandle": "server",
    "run_gateway": "server",
    "run_gateway_in_thread": "server",
}

__all__ = [
    "GatewayConfig",
    "GatewayHandle",
    "add_gateway_arguments",
    "config_from_args",
    "create_app",
    "run_gateway",
    "run_gateway_in_thread",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)

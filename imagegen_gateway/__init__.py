"""The bundled local image gateway: the product's zero-setup default and the fixture of every test and
benchmark.

It speaks the three wire dialects of the documented gateways (OpenAI-style ``/v1``, IndoxHub ``/api/v1``,
router ``/router/v1``), returns real deterministic images, and can rate-limit, charge and misbehave on demand
(see :class:`GatewayConfig` or ``imagegen gateway --help``).
"""

from imagegen_gateway.app import create_app
from imagegen_gateway.config import GatewayConfig, add_gateway_arguments, config_from_args
from imagegen_gateway.server import GatewayHandle, run_gateway, run_gateway_in_thread

__all__ = [
    "GatewayConfig",
    "GatewayHandle",
    "add_gateway_arguments",
    "config_from_args",
    "create_app",
    "run_gateway",
    "run_gateway_in_thread",
]

"""airflow-provider-imagegen: image datasets from Parquet prompt tables on Apache Airflow."""

from __future__ import annotations

import copy
from typing import Any

__version__ = "0.1.0"


#: Provider metadata: data only, so that reading it imports nothing (see :func:`get_provider_info`).
_PROVIDER_INFO: dict[str, Any] = {
    "package-name": "airflow-provider-imagegen",
    "name": "Image Generation",
    "description": "Generate image datasets from Parquet prompt tables through OpenAI-compatible "
    "image-generation gateways (OpenAI, IndoxHub, routers, the bundled local gateway).",
    "versions": [__version__],
    "integrations": [
        {
            "integration-name": "Image Generation",
            "external-doc-url": "https://platform.openai.com/docs/api-reference/images",
            "tags": ["ai"],
        }
    ],
    "hooks": [
        {
            "integration-name": "Image Generation",
            "python-modules": ["imagegen_provider.hooks.image_generation"],
        }
    ],
    "operators": [
        {
            "integration-name": "Image Generation",
            "python-modules": ["imagegen_provider.operators.image_generation"],
        }
    ],
    "extra-links": [
        "imagegen_provider.operators.links.ImageOutputLink",
        "imagegen_provider.operators.links.RunSummaryLink",
    ],
    "connection-types": [
        {
            "connection-type": "imagegen",
            "hook-class-name": "imagegen_provider.hooks.image_generation.ImageGenerationHook",
            "hook-name": "Image Generation",
            "conn-fields": {
                "dialect": {
                    "label": "Dialect",
                    "description": "Wire dialect of the gateway: openai (OpenAI and compatible gateways), "
                    "indoxhub, router.",
                    "schema": {"type": ["string", "null"], "default": "openai",
                               "enum": ["openai", "indoxhub", "router"]},
                },
                "base_url": {
                    "label": "Base URL",
                    "description": "Full base URL including the version prefix, e.g. https://api.openai.com/v1. "
                    "Overrides Host/Port/Schema.",
                    "schema": {"type": ["string", "null"], "format": "url"},
                },
                "model": {
                    "label": "Default model",
                    "description": "Model used when the task does not name one.",
                    "schema": {"type": ["string", "null"]},
                },
                "rpm": {
                    "label": "Requests per minute",
                    "description": "Rate limit shared by every request made through this connection.",
                    "schema": {"type": ["number", "null"], "minimum": 0},
                },
                "images_per_minute": {
                    "label": "Images per minute",
                    "schema": {"type": ["number", "null"], "minimum": 0},
                },
                "max_in_flight": {
                    "label": "Max requests in flight",
                    "schema": {"type": ["integer", "null"], "default": 16, "minimum": 1},
                },
                "rate_limit_backend": {
                    "label": "Shared rate-limit backend",
                    "description": "redis://host:6379/0 to share the limits across processes and workers.",
                    "schema": {"type": ["string", "null"]},
                },
                "timeout": {
                    "label": "Read timeout (s)",
                    "schema": {"type": ["number", "null"], "default": 300},
                },
                "max_attempts": {
                    "label": "Max attempts per image",
                    "schema": {"type": ["integer", "null"], "default": 5, "minimum": 1},
                },
                "accepts_seed": {
                    "label": "Gateway accepts seed",
                    "description": "Send the per-image seed even in the openai dialect.",
                    "schema": {"type": ["boolean", "null"]},
                },
            },
            "ui-field-behaviour": {
                "hidden-fields": ["login"],
                "relabeling": {"password": "API key", "schema": "Path prefix"},
                "placeholders": {
                    "host": "api.openai.com, a full base URL, or 'local' for the bundled gateway",
                    "schema": "v1",
                    "password": "sk-...",
                },
            },
        }
    ],
}


def get_provider_info() -> dict[str, Any]:
    """Provider metadata read by Airflow's ProvidersManager (entry point ``apache_airflow_provider``).

    Keep this import-free and in sync with ``pyproject.toml``: a broken provider info breaks every
    ``airflow`` command. A fresh copy each call: callers may change what they get.
    """
    return copy.deepcopy(_PROVIDER_INFO)

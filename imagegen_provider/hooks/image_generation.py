"""Airflow hook: an ``imagegen`` connection → an async image-generation client."""

from __future__ import annotations

import asyncio
from functools import cached_property
from typing import Any

from airflow.sdk.bases.hook import BaseHook

from imagegen_provider.connect import open_client
from imagegen_provider.transport.client import ImageGenClient
from imagegen_provider.transport.settings import ClientSettings
from imagegen_provider.wire.errors import ImageGenError, redact


class ImageGenerationHook(BaseHook):
    """Reads an ``imagegen`` connection and builds clients for it.

    Connection fields: Host (``local`` for the bundled gateway, a host name, or a full base URL), Port,
    Schema (path prefix, default ``v1``), Password (API key). Extras are read through an allow-list:
    ``dialect``, ``base_url``, ``model``, ``provider``, ``rpm``, ``images_per_minute``, ``max_in_flight``,
    ``rate_limit_backend``, ``timeout``, ``connect_timeout``, ``max_attempts``, ``accepts_seed``,
    ``max_image_bytes``, ``prices``, ``local_gateway``.

    :param imagegen_conn_id: the connection id.
    """

    conn_name_attr = "imagegen_conn_id"
    default_conn_name = "imagegen_default"
    conn_type = "imagegen"
    hook_name = "Image Generation"

    def __init__(self, imagegen_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.imagegen_conn_id = imagegen_conn_id

    @cached_property
    def settings(self) -> ClientSettings:
        conn = self.get_connection(self.imagegen_conn_id)
        return ClientSettings.from_connection(
            host=conn.host,
            port=conn.port,
            schema=conn.schema,
            password=conn.password,
            extra=conn.extra_dejson,
            namespace=self.imagegen_conn_id,
        )

    def get_client(self, **overrides: Any) -> ImageGenClient:
        """A new async client; use it inside one event loop (``async with hook.get_client() as client``).

        :param overrides: ``ClientSettings`` fields or rate limits (``requests_per_minute``,
            ``images_per_minute``, ``max_in_flight``, ``backend``) that win over the connection.
        """
        settings = self.settings.with_overrides(**overrides) if overrides else self.settings
        return open_client(settings)

    async def _list_models(self) -> list[str]:
        async with self.get_client() as client:
            return await client.list_models()

    def test_connection(self) -> tuple[bool, str]:
        """List the gateway's models: proves the URL, the dialect's prefix and the key, at no cost."""
        try:
            models = asyncio.run(self._list_models())
        except ImageGenError as exc:
            return False, redact(str(exc), self._secrets())
        except Exception as exc:
            return False, redact(f"{type(exc).__name__}: {exc}", self._secrets())
        return True, f"Connected to {self.settings.describe()}: {len(models)} models"

    def _secrets(self) -> list[str | None]:
        """What to scrub from messages; works even when the connection's extras do not parse (the error
        being reported may be exactly that)."""
        try:
            return [self.settings.api_key]
        except Exception:
            try:
                return [self.get_connection(self.imagegen_conn_id).password]
            except Exception:
                return []

"""Airflow hook: an ``imagegen`` connection → an image-generation client (async, or one synchronous call)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Coroutine
from functools import cached_property
from typing import Any, TypeVar

from imagegen_provider.connect import open_client
from imagegen_provider.hooks._airflow import BaseHook
from imagegen_provider.hooks.diagnose import diagnose_unreachable
from imagegen_provider.hooks.form import connection_form_widgets, ui_field_behaviour
from imagegen_provider.transport.client import Generation, ImageGenClient
from imagegen_provider.transport.settings import ClientSettings
from imagegen_provider.wire.errors import (
    AuthenticationError,
    GatewayConnectionError,
    ImageGenError,
    InsufficientBalanceError,
    PermissionDeniedError,
    redact,
)
from imagegen_provider.wire.request import ImageRequest

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: ``test_connection`` waits at most this long for the model list, whatever the connection's read timeout
#: (which is sized for image generation: minutes).
TEST_READ_TIMEOUT = 30.0

_REFUSED_KEY = {
    AuthenticationError: "401 Unauthorized: the gateway refused the API key",
    PermissionDeniedError: "403 Forbidden: the API key may not use this gateway or model",
    InsufficientBalanceError: "402 Payment Required: the account behind the API key has no balance",
}


def run_sync(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coroutine`` in an event loop of its own and return its result, from synchronous code.

    Called where a loop is already running (a notebook, an async task), it runs in a worker thread: the
    client's connections belong to the loop that opened them.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


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
        self._told_local = False

    # Airflow 3.0 and 3.1 build the connection form from these; 3.2+ read ``conn-fields`` from the provider
    # info instead. Both come from that one declaration.
    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """The extra fields of the connection form (wtforms fields; Airflow < 3.2)."""
        return connection_form_widgets()

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Hidden, relabelled and placeholder fields of the connection form (Airflow < 3.2)."""
        return ui_field_behaviour()

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
        if settings.is_local and not self._told_local:
            self._told_local = True
            log.info(
                "Connection %r uses the bundled local gateway: images are generated placeholders and costs are "
                "simulated; point the connection at a real gateway for real images",
                self.imagegen_conn_id,
            )
        return open_client(settings)

    def get_conn(self) -> ImageGenClient:
        """Airflow's hook interface: a configured client, as :meth:`get_client` with no overrides."""
        return self.get_client()

    def generate_image(self, prompt: str, **params: Any) -> Generation:
        """Generate one request's images, synchronously: for a plain ``@task`` or a script.

        Each call opens a client in an event loop of its own; for many images use
        :class:`~imagegen_provider.operators.image_generation.ImageGenerationOperator` (or ``get_client()``
        in one loop), which share connections and the rate limit.

        :param prompt: the prompt.
        :param params: request parameters (``model``, ``size``, ``quality``, ``n``, ``seed``, ...); ``model``
            defaults to the connection's.
        :return: the verified images (``.images[i].data`` are the bytes) and the gateway's response.
        :raises ImageGenError: the request is invalid or the gateway refused it after the retries.
        """
        if "model" not in params and self.settings.model:
            params["model"] = self.settings.model
        request = ImageRequest.build(context="generate_image", prompt=prompt, **params)
        return run_sync(self._generate(request))

    async def _generate(self, request: ImageRequest) -> Generation:
        async with self.get_client() as client:
            return await client.generate(request)

    async def _list_models(self) -> list[str]:
        read_timeout = min(self.settings.read_timeout, TEST_READ_TIMEOUT)
        async with self.get_client(read_timeout=read_timeout, max_attempts=1) as client:
            return await client.list_models()

    def test_connection(self) -> tuple[bool, str]:
        """List the gateway's models: proves the URL, the dialect's prefix and the key, at no cost. A failure
        says which step failed: unknown host, refused connection, TLS, timeout, or the key (401/402/403)."""
        try:
            models = run_sync(self._list_models())
        except Exception as exc:
            return False, redact(self._explain(exc), self._secrets())
        return True, f"Connected to {self.settings.describe()}: {len(models)} models"

    def _explain(self, exc: Exception) -> str:
        for error_class, meaning in _REFUSED_KEY.items():
            if isinstance(exc, error_class):
                return f"{meaning} ({exc})"
        if isinstance(exc, GatewayConnectionError) and self.settings.base_url:
            cause = run_sync(
                diagnose_unreachable(self.settings.base_url, connect_timeout=self.settings.connect_timeout)
            )
            if cause is None:
                # Resolve, connect and TLS work: the request itself failed (a read timeout, a dropped answer).
                # The client's message names the httpx class only (its own messages can quote the request).
                what = "no answer (timed out)" if "timeout" in str(exc).lower() else "the request failed"
                return f"{self.settings.base_url} accepts connections, but {what}: {exc}"
            return f"cannot reach {self.settings.base_url}: {cause}"
        if isinstance(exc, ImageGenError):
            return str(exc)
        return f"{type(exc).__name__}: {exc}"

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

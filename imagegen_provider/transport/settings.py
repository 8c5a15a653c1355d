"""Client settings from connection-like fields (host, port, path, API key, extras), read through an allow-list.

Shared by the Airflow hook and the CLI, so that a connection and a command line mean the same thing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from imagegen_provider.transport.ratelimit import RateLimits
from imagegen_provider.transport.retry import RetryPolicy
from imagegen_provider.wire.dialects import get_dialect

LOCAL_HOST = "local"

#: Extras a connection may set, and how to read each. Anything else is ignored (and never echoed back:
#: an unknown extra could be a secret).
_EXTRA_READERS: dict[str, Any] = {
    "dialect": str,
    "base_url": str,
    "model": str,
    "provider": str,
    "rpm": float,
    "images_per_minute": float,
    "max_in_flight": int,
    "rate_limit_backend": str,
    "timeout": float,
    "connect_timeout": float,
    "max_attempts": int,
    "accepts_seed": bool,
    "max_image_bytes": int,
    "prices": dict,
    "local_gateway": dict,
}

_LOCAL_PATHS = {"openai": "/v1", "indoxhub": "/api/v1", "router": "/router/v1"}


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

#: Numeric extras that must not be negative (0 keeps meaning "not set", as before).
_NON_NEGATIVE = frozenset(
    {"rpm", "images_per_minute", "max_in_flight", "timeout", "connect_timeout", "max_attempts", "max_image_bytes"}
)


def _read_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("not a boolean")


def _read_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a boolean is not an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("not a whole number")
        return int(value)
    if isinstance(value, (int, str)):
        return int(value)
    raise TypeError(type(value).__name__)


def _read_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(type(value).__name__)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


def _read_str(value: Any) -> str:
    if isinstance(value, (Mapping, list, tuple, bool)):
        raise TypeError(type(value).__name__)
    return str(value)


_READER_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_READERS = {bool: _read_bool, int: _read_int, float: _read_float, str: _read_str}


def _read_extra(name: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    reader = _EXTRA_READERS[name]
    if reader is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError(f"connection extra {name!r} must be a JSON object (it is not valid JSON)") from None
        if not isinstance(value, Mapping):
            raise ValueError(f"connection extra {name!r} must be a JSON object")
        return dict(value)
    try:
        parsed = _READERS[reader](value)
    except (TypeError, ValueError):
        # The value is not echoed: an extra in the wrong field could be a secret.
        raise ValueError(
            f"connection extra {name!r} must be {_READER_NAMES[reader]}, got a {type(value).__name__}"
        ) from None
    if name in _NON_NEGATIVE and parsed < 0:
        raise ValueError(f"connection extra {name!r} must not be negative")
    return parsed


@dataclass(frozen=True)
class ClientSettings:
    """Everything needed to build an :class:`~imagegen_provider.transport.client.ImageGenClient`.

    ``base_url`` is ``None`` for the bundled in-process gateway.
    """

    base_url: str | None
    api_key: str | None = field(default=None, repr=False)
    dialect: str = "openai"
    model: str | None = None
    provider: str | None = None
    limits: RateLimits = field(default_factory=RateLimits)
    read_timeout: float = 300.0
    connect_timeout: float = 10.0
    max_attempts: int = 5
    accepts_seed: bool | None = None
    max_image_bytes: int | None = None
    prices: Mapping[str, Any] | None = None
    #: Options of the bundled gateway; not in the repr (``api_key`` is the key the gateway expects).
    local_gateway: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_local(self) -> bool:
        return self.base_url is None

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=self.max_attempts)

    def local_path(self) -> str:
        return _LOCAL_PATHS[self.dialect]

    def describe(self) -> str:
        """For logs: never the key."""
        where = "bundled local gateway (in-process)" if self.is_local else self.base_url
        return f"{where} [{self.dialect}]"

    def with_overrides(self, **changes: Any) -> ClientSettings:
        limit_changes = {k: changes.pop(k) for k in list(changes) if k in RateLimits.__dataclass_fields__}
        limit_changes = {k: v for k, v in limit_changes.items() if v is not None}
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, limits=replace(self.limits, **limit_changes), **changes)

    @classmethod
    def from_connection(
        cls,
        *,
        host: str | None,
        port: int | None = None,
        schema: str | None = None,
        password: str | None = None,
        extra: Mapping[str, Any] | None = None,
        namespace: str = "default",
    ) -> ClientSettings:
        """Settings from an Airflow connection's fields.

        :param host: ``local`` for the bundled gateway; a full base URL; or a host name (https, path from
            ``schema``, default ``v1``; plain http for localhost/127.0.0.1).
        :param namespace: names the shared rate-limit budget (the connection id).
        """
        raw = dict(extra or {})
        extras = {name: _read_extra(name, raw.get(name)) for name in _EXTRA_READERS}
        dialect = get_dialect(extras["dialect"] or "openai").name
        if extras["base_url"] is not None and not extras["base_url"].startswith(("http://", "https://")):
            raise ValueError("connection extra 'base_url' must be an http:// or https:// URL")
        base_url = extras["base_url"].rstrip("/") if extras["base_url"] else _base_url(host, port, schema)
        limits = RateLimits(
            requests_per_minute=extras["rpm"],
            images_per_minute=extras["images_per_minute"],
            max_in_flight=extras["max_in_flight"] or RateLimits.max_in_flight,
            backend=extras["rate_limit_backend"],
            namespace=namespace,
        )
        return cls(
            base_url=base_url,
            api_key=password or None,
            dialect=dialect,
            model=extras["model"],
            provider=extras["provider"],
            limits=limits,
            read_timeout=extras["timeout"] or 300.0,
            connect_timeout=extras["connect_timeout"] or 10.0,
            max_attempts=extras["max_attempts"] or 5,
            accepts_seed=extras["accepts_seed"],
            max_image_bytes=extras["max_image_bytes"],
            prices=extras["prices"],
            local_gateway=extras["local_gateway"] or {},
        )


def _base_url(host: str | None, port: int | None, schema: str | None) -> str | None:
    host = (host or "").strip()
    if not host or host.lower() == LOCAL_HOST:
        return None
    if host.startswith(("http://", "https://")):
        return host.rstrip("/")
    if "://" in host:
        raise ValueError("connection host must be 'local', a host name, or an http:// or https:// URL")
    bare = host.strip("[]")
    scheme = "http" if bare.lower() in ("localhost", "127.0.0.1", "::1") else "https"
    shown = f"[{bare}]" if ":" in bare else host
    netloc = f"{shown}:{port}" if port else shown
    path = (schema or "v1").strip("/")
    return f"{scheme}://{netloc}/{path}" if path else f"{scheme}://{netloc}"


def build_client(
    settings: ClientSettings,
    *,
    base_url: str | None = None,
    transport: Any = None,
    download_transport: Any = None,
) -> Any:
    """An :class:`ImageGenClient` for ``settings`` (``base_url``/transports given for the in-process gateway)."""
    from imagegen_provider.transport.client import ImageGenClient, Timeouts
    from imagegen_provider.transport.download import DEFAULT_MAX_IMAGE_BYTES

    url = base_url or settings.base_url
    if url is None:
        raise ValueError("settings point at the bundled local gateway: use imagegen_provider.connect.open_client")
    return ImageGenClient(
        base_url=url,
        api_key=settings.api_key,
        dialect=settings.dialect,
        accepts_seed=settings.accepts_seed,
        timeouts=Timeouts(connect=settings.connect_timeout, read=settings.read_timeout),
        retry=settings.retry,
        limits=settings.limits,
        transport=transport,
        download_transport=download_transport,
        max_image_bytes=settings.max_image_bytes or DEFAULT_MAX_IMAGE_BYTES,
    )

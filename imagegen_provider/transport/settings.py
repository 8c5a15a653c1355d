"""Client settings, declared once (:class:`ClientSettings` and its :class:`RateLimits`, field by field) and read
from a connection (host, port, path, password, extras through the allow-list the declarations make) or from a
command line (the options the declarations make).

Shared by the Airflow hook and the CLI, so that a connection and a command line mean the same thing.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from imagegen_provider.transport.client import (
    DEFAULT_ATTEMPT_TIMEOUT,
    DEFAULT_BREAKER_SECONDS,
    ImageGenClient,
    Timeouts,
)
from imagegen_provider.transport.download import DEFAULT_MAX_RESPONSE_BYTES, without_credentials
from imagegen_provider.transport.options import (
    Option,
    option,
    option_of,
    read_aliases,
    read_bool,
    read_float,
    read_int,
    read_json_object,
    read_json_object_or_file,
    read_url,
)
from imagegen_provider.transport.ratelimit import RateLimits
from imagegen_provider.transport.retry import MAX_RETRY_AFTER_SECONDS, RetryPolicy
from imagegen_provider.wire.dialects import DIALECTS, get_dialect

LOCAL_HOST = "local"


def _read_dialect(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in DIALECTS:
        raise ValueError(f"must be one of {', '.join(DIALECTS)}")
    return get_dialect(value).name


@dataclass(frozen=True)
class ClientSettings:
    """Everything needed to build an :class:`~imagegen_provider.transport.client.ImageGenClient`.

    ``base_url`` is ``None`` for the bundled in-process gateway.
    """

    base_url: str | None = option(
        Option("base_url", "--base-url", "Gateway base URL including the version prefix (https://api.openai.com/v1). "
               "Default: the bundled local gateway, in-process.", read_url),
        default=None,
    )
    api_key: str | None = option(
        Option(None, "--api-key", "API key: the connection's password; on the command line, default $IMAGEGEN_API_KEY. "
               "Never printed.", secret=True),
        default=None, repr=False,
    )
    dialect: str = option(
        Option("dialect", "--dialect", "Request/response dialect.", _read_dialect, choices=tuple(DIALECTS)),
        default="openai",
    )
    model: str | None = option(Option("model", "--model", "Default model of every request."), default=None)
    provider: str | None = option(
        Option("provider", "--provider", "Default provider of every request (gateways that route)."), default=None
    )
    limits: RateLimits = field(default_factory=RateLimits)
    read_timeout: float = option(
        Option("timeout", "--timeout", "Read timeout in seconds.", read_float, zero_is_default=True), default=300.0
    )
    connect_timeout: float = option(
        Option("connect_timeout", "--connect-timeout", "Connect timeout in seconds.", read_float,
               zero_is_default=True),
        default=10.0,
    )
    attempt_timeout: float = option(
        Option("attempt_timeout", "--attempt-timeout",
               "Total deadline of one attempt (connect, headers and body), in seconds.", read_float,
               zero_is_default=True),
        default=DEFAULT_ATTEMPT_TIMEOUT,
    )
    max_attempts: int = option(
        Option("max_attempts", "--max-attempts", "Attempts per image.", read_int, zero_is_default=True), default=5
    )
    max_retry_after: float = option(
        Option("max_retry_after", "--max-retry-after", "Longest Retry-After honoured, in seconds.", read_float,
               zero_is_default=True),
        default=MAX_RETRY_AFTER_SECONDS,
    )
    breaker_seconds: float = option(
        Option("breaker_seconds", "--breaker-seconds",
               "Stop the run when nothing succeeded for this long while every answer was a 429, a 5xx or a "
               "transport error (0: never).", read_float),
        default=DEFAULT_BREAKER_SECONDS,
    )
    accepts_seed: bool | None = option(
        Option("accepts_seed", "--accepts-seed", "Send seeds in the openai dialect.", read_bool), default=None
    )
    max_response_bytes: int = option(
        Option("max_response_bytes", "--max-response-bytes",
               "Cap on every response body and image download, decoded, in bytes.", read_int,
               aliases=("max_image_bytes",), zero_is_default=True),
        default=DEFAULT_MAX_RESPONSE_BYTES,
    )
    allow_private_image_urls: bool = option(
        Option("allow_private_image_urls", "--allow-private-image-urls",
               "Download images from private and loopback addresses even when the gateway is not on one.",
               read_bool),
        default=False,
    )
    prices: Mapping[str, Any] | None = option(
        Option("prices", "--prices", "Price overrides shaped like the packaged prices.json (entries merge into "
               "it): a JSON object, or on the command line a JSON file.", read_json_object_or_file,
               metavar="FILE|JSON"),
        default=None,
    )
    price_as: Mapping[str, str] | None = option(
        Option("price_as", "--price-as", "Price a gateway's model names as listed models (aliases such as "
               "LiteLLM's model_name): a JSON object, or ALIAS=MODEL[,ALIAS=MODEL] on the command line.",
               read_aliases, metavar="ALIAS=MODEL"),
        default=None,
    )
    #: Options of the bundled gateway; not in the repr (``api_key`` is the key the gateway expects).
    local_gateway: Mapping[str, Any] = option(
        Option("local_gateway", "--local-gateway", "Options of the bundled gateway, a JSON object.",
               read_json_object, metavar="JSON"),
        default_factory=dict, repr=False,
    )

    @property
    def is_local(self) -> bool:
        return self.base_url is None

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=self.max_attempts, max_retry_after=self.max_retry_after)

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(connect=self.connect_timeout, read=self.read_timeout, attempt=self.attempt_timeout)

    def local_path(self) -> str:
        return get_dialect(self.dialect).prefix

    def describe(self) -> str:
        """For logs: never the key."""
        where = "bundled local gateway (in-process)" if self.base_url is None else without_credentials(self.base_url)
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
        """Settings from an Airflow connection's fields. Extras outside the declared ones are ignored (and never
        echoed back: an unknown extra could be a secret).

        :param host: ``local`` for the bundled gateway; a full base URL; or a host name (https, path from
            ``schema``, default ``v1``; plain http for localhost/127.0.0.1).
        :param namespace: names the shared rate-limit budget (the connection id).
        :raises ValueError: an extra of the wrong type, naming the extra (never its value).
        """
        raw = dict(extra or {})
        values: dict[str, Any] = {}
        for name, opt in declared_options():
            if opt.extra is None:
                continue
            key = next((k for k in (opt.extra, *opt.aliases) if raw.get(k) not in (None, "")), opt.extra)
            try:
                values[name] = opt.read(raw.get(key))
            except ValueError as exc:
                raise ValueError(f"connection extra {key!r} {exc}") from None
        if values.get("base_url") is None:
            values["base_url"] = _base_url(host, port, schema)
        return _build(values, api_key=password or None, namespace=namespace)

    @classmethod
    def from_cli_args(
        cls, args: argparse.Namespace, *, api_key: str | None = None, namespace: str = "cli"
    ) -> ClientSettings:
        """Settings from the options :func:`add_client_arguments` added.

        :param api_key: used when ``--api-key`` was not given (e.g. from an environment variable).
        """
        values = {name: getattr(args, opt.dest, None) for name, opt in declared_options() if opt.dest}
        return _build(values, api_key=values.pop("api_key", None) or api_key, namespace=namespace)


def declared_options() -> Iterator[tuple[str, Option]]:
    """``(name, option)`` of every declared setting; rate limits are named ``limits.<field>``."""
    for f in dataclasses.fields(ClientSettings):
        found = option_of(f)
        if found is not None:
            yield f.name, found
    for f in dataclasses.fields(RateLimits):
        found = option_of(f)
        if found is not None:
            yield f"limits.{f.name}", found


def _build(values: Mapping[str, Any], *, api_key: str | None, namespace: str) -> ClientSettings:
    """Settings from parsed values; ``None`` keeps the declared default."""
    given = {k: v for k, v in values.items() if v is not None}
    limit_values = {k.removeprefix("limits."): v for k, v in given.items() if k.startswith("limits.")}
    top = {k: v for k, v in given.items() if not k.startswith("limits.") and k != "api_key"}
    return ClientSettings(
        api_key=api_key or None, limits=RateLimits(namespace=namespace, **limit_values), **top
    )


def _cli_type(opt: Option) -> Any:
    # The reader, not ``opt.read``: on a command line 0 is a number to check (preflight refuses a zero
    # timeout), not the legacy "not set" of a connection extra.
    def parse(text: str) -> Any:
        try:
            return opt.reader(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{opt.flag} {exc}") from None

    parse.__name__ = opt.flag or "value"
    return parse


def add_client_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """One CLI option per declared setting (defaults left to the settings: an option not given is ``None``)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ClientSettings)}
    defaults.update({f"limits.{f.name}": f.default for f in dataclasses.fields(RateLimits)})
    for name, opt in declared_options():
        if not opt.flag:
            continue
        default = defaults.get(name)
        shown = "" if default in (None, dataclasses.MISSING) or opt.secret else f" (default {default})"
        if opt.is_switch:
            parser.add_argument(opt.flag, dest=opt.dest, action="store_true", default=None, help=opt.help + shown)
        else:
            parser.add_argument(opt.flag, dest=opt.dest, type=_cli_type(opt), default=None, choices=opt.choices,
                                metavar=opt.metavar, help=opt.help + shown)


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
    transport: httpx.AsyncBaseTransport | None = None,
    download_transport: httpx.AsyncBaseTransport | None = None,
) -> ImageGenClient:
    """An :class:`ImageGenClient` for ``settings`` (``base_url``/transports given for the in-process gateway)."""
    url = base_url or settings.base_url
    if url is None:
        raise ValueError("settings point at the bundled local gateway: use imagegen_provider.connect.open_client")
    return ImageGenClient(
        base_url=url,
        api_key=settings.api_key,
        dialect=settings.dialect,
        accepts_seed=settings.accepts_seed,
        timeouts=settings.timeouts,
        retry=settings.retry,
        limits=settings.limits,
        transport=transport,
        download_transport=download_transport,
        max_response_bytes=settings.max_response_bytes,
        breaker_seconds=settings.breaker_seconds,
        allow_private_image_urls=settings.allow_private_image_urls,
    )

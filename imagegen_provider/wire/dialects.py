"""Dialects decide which request fields go on the wire, and where.

Base URLs follow the OpenAI SDK convention: they include the version prefix (``https://api.openai.com/v1``,
``https://api.indoxhub.com/api/v1``) and the client appends :attr:`Dialect.path`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imagegen_provider.wire.errors import RequestValidationError, Violation
from imagegen_provider.wire.request import ImageRequest


@dataclass(frozen=True)
class WireBody:
    """The JSON body to send, and the request fields this dialect cannot carry (so callers can warn)."""

    json: dict[str, Any]
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dialect:
    name: str
    #: Top-level fields sent as they are.
    top_level: frozenset[str]
    #: Fields nested under ``additional_params`` (IndoxHub's provider-specific parameters).
    nested: frozenset[str] = frozenset()
    #: Whether the gateway documents a ``seed`` (OpenAI rejects unknown parameters).
    accepts_seed_by_default: bool = False
    #: ``provider`` may be an object (router passthrough) rather than a name.
    provider_object: bool = False
    path: str = "/images/generations"
    #: The version prefix gateways of this dialect serve under (what ``base_url`` ends with), e.g. ``/api/v1``.
    #: The one copy in the client package; the bundled gateway serves the same prefixes.
    prefix: str = "/v1"

    def build_body(self, request: ImageRequest, *, accepts_seed: bool | None = None) -> WireBody:
        """Lay ``request`` out as this dialect's JSON body.

        :param accepts_seed: override for whether ``seed`` may be sent (connection extra ``accepts_seed``).
        """
        fields = request.wire_fields()
        extra = fields.pop("additional_params", None) or {}
        send_seed = self.accepts_seed_by_default if accepts_seed is None else accepts_seed
        body: dict[str, Any] = {}
        nested: dict[str, Any] = {}
        dropped: list[str] = []
        for key, value in fields.items():
            if key == "seed" and not send_seed:
                dropped.append(key)
            elif key == "provider" and isinstance(value, Mapping) and not self.provider_object:
                raise RequestValidationError(
                    [Violation("provider", f"the {self.name} dialect takes a provider name, not an object")]
                )
            elif key == "provider" and isinstance(value, str) and self.provider_object:
                dropped.append(key)
            elif key in self.top_level:
                body[key] = value
            elif key in self.nested:
                nested[key] = value
            else:
                dropped.append(key)
        if self.nested:
            # The caller's own additional_params win over fields we moved there.
            merged = {**nested, **extra}
            if merged:
                body["additional_params"] = merged
        else:
            # Like the OpenAI SDK's ``extra_body``: gateway-specific fields merged at the top level,
            # without overriding a documented field we already set.
            for key, value in extra.items():
                body.setdefault(key, value)
        return WireBody(json=body, dropped=tuple(dropped))


_OPENAI_FIELDS = frozenset(
    {
        "prompt", "model", "n", "size", "quality", "style", "response_format", "user", "background",
        "output_format", "output_compression", "moderation", "stream", "partial_images", "seed",
    }
)

OPENAI = Dialect(name="openai", top_level=_OPENAI_FIELDS)

INDOXHUB = Dialect(
    name="indoxhub",
    top_level=frozenset(
        {"prompt", "model", "provider", "size", "n", "quality", "style", "response_format", "byok_api_key"}
    ),
    nested=frozenset(
        {
            "negative_prompt", "aspect_ratio", "guidance_scale", "seed", "enhance_prompt", "add_watermark",
            "background", "output_format", "output_compression", "moderation", "user",
        }
    ),
    accepts_seed_by_default=True,
    prefix="/api/v1",
)

ROUTER = Dialect(
    name="router",
    top_level=frozenset(
        {
            "model", "prompt", "aspect_ratio", "background", "input_references", "n", "output_compression",
            "output_format", "provider", "quality", "resolution", "seed", "size", "stream",
        }
    ),
    accepts_seed_by_default=True,
    provider_object=True,
    prefix="/router/v1",
)

DIALECTS: dict[str, Dialect] = {d.name: d for d in (OPENAI, INDOXHUB, ROUTER)}


def get_dialect(name: str | Dialect) -> Dialect:
    if isinstance(name, Dialect):
        return name
    try:
        return DIALECTS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dialect {name!r}; use one of {', '.join(DIALECTS)}") from None

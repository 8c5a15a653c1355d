"""The one request model: every parameter documented by the seed gateways, typed and range-checked.

Per-model rules (prompt length, sizes, which parameters a model family accepts) live in
:mod:`imagegen_provider.wire.validation`; which fields go on the wire, and where, is the dialect's job.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from imagegen_provider.wire.errors import RequestValidationError, Violation
from imagegen_provider.wire.sizes import parse_size, parse_tier

Quality = Literal["standard", "hd", "low", "medium", "high", "auto"]
Style = Literal["vivid", "natural"]
ResponseFormat = Literal["url", "b64_json"]
OutputFormat = Literal["png", "jpeg", "webp"]
Background = Literal["transparent", "opaque", "auto"]
Moderation = Literal["low", "auto"]

# Google's and the router's seeds are 32-bit; staying under 2**31 is accepted everywhere.
MAX_SEED = 2**31 - 1


class ImageRequest(BaseModel):
    """One ``POST …/images/generations`` request, dialect-independent."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    prompt: str = Field(min_length=1, description="Text description of the image.")
    model: str | None = Field(default=None, min_length=1)
    n: int = Field(default=1, ge=1, le=10)
    size: str | None = None
    quality: Quality | None = None
    style: Style | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # OpenAI GPT-image parameters
    background: Background | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    moderation: Moderation | None = None
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    # Google / router parameters
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    negative_prompt: str | None = None
    # Both sides positive: "0:9" is no aspect ratio (parse_ratio() rejects it too).
    aspect_ratio: str | None = Field(default=None, pattern=r"^[1-9]\d{0,2}:[1-9]\d{0,2}$")
    resolution: str | None = Field(default=None, min_length=1)
    guidance_scale: float | None = Field(default=None, ge=0)
    enhance_prompt: bool | None = None
    add_watermark: bool | None = None
    input_references: list[str | dict[str, Any]] | None = None
    # Gateway routing
    provider: str | dict[str, Any] | None = None
    additional_params: dict[str, Any] | None = None
    byok_api_key: SecretStr | None = Field(default=None, repr=False)

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value == "auto" or parse_size(value) is not None or parse_tier(value) is not None:
            return value
        raise ValueError("must be 'auto', WIDTHxHEIGHT (e.g. 1024x1024) or a tier such as '2K'")

    @field_validator("input_references")
    @classmethod
    def _references_are_urls(cls, value: list[str | dict[str, Any]] | None) -> list[str | dict[str, Any]] | None:
        for ref in value or []:
            url = ref if isinstance(ref, str) else ref.get("url") or ref.get("image_url")
            if not isinstance(url, str) or not url.startswith(("http://", "https://", "data:image/")):
                raise ValueError("each reference must be an http(s) URL or a base64 data:image/ URL")
        return value

    @classmethod
    def build(cls, *, context: str | None = None, **params: Any) -> ImageRequest:
        """Build and validate a request; every failure is a :class:`RequestValidationError` naming its field."""
        from imagegen_provider.wire.validation import check_model_rules

        try:
            request = cls(**params)
        except ValidationError as exc:
            raise RequestValidationError(
                [Violation(".".join(str(p) for p in err["loc"]) or "request", err["msg"]) for err in exc.errors()],
                context=context,
            ) from None
        violations = check_model_rules(request)
        if violations:
            raise RequestValidationError(violations, context=context)
        return request

    def wire_fields(self) -> dict[str, Any]:
        """The set fields as plain JSON values (the BYOK key revealed: only dialects call this)."""
        data = self.model_dump(exclude_none=True)
        if self.byok_api_key is not None:
            data["byok_api_key"] = self.byok_api_key.get_secret_value()
        return data

    def public_params(self) -> dict[str, Any]:
        """The set fields without prompt and without secrets, for metadata and logs."""
        return self.model_dump(exclude_none=True, exclude={"prompt", "byok_api_key"})

"""The one result every dialect's response is normalised into."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Usage:
    """Token usage in one canonical form, whichever of the three documented shapes the gateway used."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    input_text_tokens: int | None = None
    input_image_tokens: int | None = None
    output_text_tokens: int | None = None
    output_image_tokens: int | None = None

    @property
    def is_empty(self) -> bool:
        return all(value is None for value in vars(self).values())


@dataclass(frozen=True)
class GeneratedImage:
    """One image of a response: either its bytes (from b64_json) or a URL still to download."""

    data: bytes | None = None
    url: str | None = None
    revised_prompt: str | None = None


@dataclass(frozen=True)
class GenerationResult:
    images: list[GeneratedImage]
    usage: Usage = field(default_factory=Usage)
    #: Cost the gateway itself reported (IndoxHub ``usage.cost``), in USD.
    reported_cost_usd: float | None = None
    request_id: str | None = None
    provider: str | None = None
    model: str | None = None
    created: int | None = None
    output_format: str | None = None
    size: str | None = None
    quality: str | None = None
    background: str | None = None
    #: Partial images from a streamed response, kept only when asked for.
    partial_images: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class ImageInfo:
    """What decoding an image's header tells us."""

    format: str
    width: int
    height: int
    sha256: str
    num_bytes: int

    @property
    def extension(self) -> str:
        return {"jpeg": "jpg"}.get(self.format, self.format)

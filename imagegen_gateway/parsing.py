"""Read a generation request body of any of the three dialects into one :class:`GenParams`.

Only generic checks live here (types, ranges, sizes the renderer can draw, dall-e-3's single image): the
gateway plays a server, and per-model rules are the client's job (``imagegen_provider.wire.validation``).
Unknown fields are accepted, as real gateways do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imagegen_gateway.pricing import gpt_quality, is_gpt_image
from imagegen_gateway.render import seed_from_prompt
from imagegen_provider.wire.sizes import parse_ratio, parse_size, parse_tier, pixel_size
from imagegen_provider.wire.validation import ModelFamily, bare_model_name, model_family

MAX_EDGE = 8192
MAX_PIXELS = 4096 * 4096
MAX_SEED = 2**63 - 1
OUTPUT_FORMATS = ("png", "jpeg", "webp")


class ParseError(ValueError):
    """A 400: the request is not one the gateway can serve."""

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class GenParams:
    """A generation request, dialect-independent, with every default resolved."""

    dialect: str
    prompt: str
    #: The model as named by the client, e.g. ``openai/dall-e-3``.
    model: str
    #: Without provider prefix, lower case: ``dall-e-3``.
    bare_model: str
    provider: str | None
    n: int
    width: int
    height: int
    quality: str
    style: str | None
    response_format: str
    output_format: str
    compression: int | None
    background: str | None
    seed: int
    negative_prompt: str | None
    stream: bool
    partial_images: int

    @property
    def gpt(self) -> bool:
        return is_gpt_image(self.bare_model)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def reported_background(self) -> str:
        """What OpenAI reports back: the background actually used, never ``auto``."""
        return "transparent" if self.background == "transparent" else "opaque"


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ParseError(f"Invalid type for '{key}': expected a string.", key, "invalid_type")
    return value


def _optional_int(body: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParseError(f"Invalid type for '{key}': expected an integer.", key, "invalid_type")
    if not low <= value <= high:
        raise ParseError(f"Invalid '{key}': {value} is not between {low} and {high}.", key)
    return value


def _optional_bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise ParseError(f"Invalid type for '{key}': expected a boolean.", key, "invalid_type")


def _dimensions(size: str | None, aspect_ratio: str | None, resolution: str | None, *, strict: bool) -> tuple[int, int]:
    """Pixels for the request. ``strict`` (router) rejects a ``size`` that contradicts ``resolution`` or
    ``aspect_ratio``, as seed 004 documents."""
    if aspect_ratio is not None and parse_ratio(aspect_ratio) is None:
        raise ParseError(f"Invalid aspect_ratio {aspect_ratio!r}: expected W:H such as 16:9.", "aspect_ratio")
    if resolution is not None and parse_tier(resolution) is None:
        raise ParseError(f"Invalid resolution {resolution!r}: expected a tier such as 1K, 2K or 4K.", "resolution")
    if size is not None and size != "auto":
        dims, tier = parse_size(size), parse_tier(size)
        if dims is None and tier is None:
            raise ParseError(
                f"Invalid size {size!r}: expected 'auto', WIDTHxHEIGHT (e.g. 1024x1024) or a tier such as 2K.",
                "size",
            )
        if strict and resolution is not None and (dims is not None or parse_tier(resolution) != tier):
            raise ParseError(f"size {size!r} conflicts with resolution {resolution!r}; pass one or the other.", "size")
        if strict and aspect_ratio is not None and dims is not None and parse_ratio(aspect_ratio) != parse_ratio(
            f"{dims[0]}:{dims[1]}"
        ):
            raise ParseError(
                f"size {size!r} conflicts with aspect_ratio {aspect_ratio!r}; pass one or the other.", "size"
            )
    width, height = pixel_size(None if size == "auto" else size, aspect_ratio, resolution)
    if max(width, height) > MAX_EDGE or width * height > MAX_PIXELS or min(width, height) < 1:
        raise ParseError(f"Invalid size {width}x{height}: the local gateway draws at most 4096x4096 pixels.", "size")
    return width, height


def _quality(model: str, quality: str | None) -> str:
    if is_gpt_image(model):
        return gpt_quality(quality)
    if model_family(model) is ModelFamily.DALL_E_3:
        return "hd" if quality == "hd" else "standard"
    return quality if quality and quality != "auto" else "standard"


def _output_format(value: str | None) -> str:
    if value is None:
        return "png"
    value = value.lower()
    value = "jpeg" if value == "jpg" else value
    if value not in OUTPUT_FORMATS:
        raise ParseError(f"Invalid output_format {value!r}: use png, jpeg or webp.", "output_format")
    return value


def _split_provider(model: str, provider: Any) -> tuple[str | None, str]:
    """``openai/dall-e-3`` → (``openai``, ``dall-e-3``); a separate ``provider`` name wins if there is no prefix."""
    prefix, sep, rest = model.partition("/")
    if sep:
        return prefix, rest
    if isinstance(provider, str) and provider:
        return provider, model
    return ("openai" if model_family(model) is not ModelFamily.OTHER else None), model


def parse_request(dialect: str, body: Any, *, default_response_format: str = "url") -> GenParams:
    """Resolve ``body`` (already JSON-decoded) sent to ``dialect``'s route.

    :raises ParseError: the request cannot be served (400).
    """
    if not isinstance(body, Mapping):
        raise ParseError("The request body must be a JSON object.", None, "invalid_json")
    # IndoxHub nests provider-specific parameters; a top-level value is accepted as a fallback.
    nested = body.get("additional_params") if dialect == "indoxhub" else None
    if nested is not None and not isinstance(nested, Mapping):
        raise ParseError("additional_params must be an object.", "additional_params", "invalid_type")
    extra: Mapping[str, Any] = {**body, **(nested or {})}

    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ParseError("You must provide a prompt.", "prompt", "missing_required_parameter")

    model = _optional_str(body, "model")
    if model is None or not model.strip():
        if dialect == "router":
            raise ParseError("You must provide a model.", "model", "missing_required_parameter")
        model = "dall-e-3" if dialect == "indoxhub" else "dall-e-2"
    provider_field = body.get("provider")
    provider, name = _split_provider(model, provider_field) if dialect != "router" else (
        model.partition("/")[0] if "/" in model else None,
        model,
    )
    bare = bare_model_name(name)

    n = _optional_int(body, "n", 1, 10)
    n = 1 if n is None else n
    if model_family(bare) is ModelFamily.DALL_E_3 and n != 1:
        raise ParseError("Invalid 'n': dall-e-3 only supports n=1.", "n")

    size = _optional_str(body, "size")
    aspect_ratio = _optional_str(extra, "aspect_ratio")
    resolution = _optional_str(extra, "resolution")
    width, height = _dimensions(size, aspect_ratio, resolution, strict=dialect == "router")

    response_format = _optional_str(extra, "response_format")
    if response_format not in (None, "url", "b64_json"):
        raise ParseError(f"Invalid response_format {response_format!r}: use url or b64_json.", "response_format")
    if is_gpt_image(bare):
        # GPT image models only ever return base64, whatever was asked.
        response_format = "b64_json"
    elif response_format is None:
        response_format = "b64_json" if dialect == "router" else default_response_format

    background = _optional_str(extra, "background")
    if background not in (None, "transparent", "opaque", "auto"):
        raise ParseError(f"Invalid background {background!r}: use transparent, opaque or auto.", "background")

    stream = bool(_optional_bool(body, "stream"))
    if stream and dialect == "openai" and not is_gpt_image(bare):
        raise ParseError("Streaming is only supported for the GPT image models.", "stream")
    if stream and dialect == "indoxhub":
        raise ParseError("Streaming is not supported on this endpoint.", "stream")
    partial_images = _optional_int(extra, "partial_images", 0, 3) or 0

    seed = _optional_int(extra, "seed", 0, MAX_SEED)
    quality = _optional_str(body, "quality")
    return GenParams(
        dialect=dialect,
        prompt=prompt,
        model=model,
        bare_model=bare,
        provider=provider,
        n=n,
        width=width,
        height=height,
        quality=_quality(bare, quality),
        style=_optional_str(body, "style"),
        response_format=response_format,
        output_format=_output_format(_optional_str(extra, "output_format")),
        compression=_optional_int(extra, "output_compression", 0, 100),
        background=background,
        seed=seed if seed is not None else seed_from_prompt(prompt),
        negative_prompt=_optional_str(extra, "negative_prompt"),
        stream=stream,
        partial_images=partial_images,
    )

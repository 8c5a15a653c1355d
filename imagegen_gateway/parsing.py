"""Read a request of any dialect into one :class:`GenParams`, in named stages.

Stages: the fields (IndoxHub nests provider parameters; multipart forms carry text) → the model → what was
asked → the rules (:mod:`imagegen_gateway.rules`: OpenAI's documented rules on ``/v1`` for OpenAI's models;
generic checks otherwise) → the pixels → the delivery (url/base64, stream). Unknown fields are accepted, as
OpenAI-compatible gateways do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imagegen_gateway.charges import gpt_quality
from imagegen_gateway.render import seed_from_prompt
from imagegen_gateway.rules import (
    BACKGROUNDS,
    DALL_E_3,
    OUTPUT_FORMATS,
    RESPONSE_FORMATS,
    Asked,
    InvalidRequest,
    ModelRules,
    Operation,
    bare_model,
    check_openai,
    is_gpt_image,
    rules_for,
)
from imagegen_gateway.sizes import drawn_pixels, read_dimensions, read_ratio, read_tier

MAX_EDGE = 8192
MAX_PIXELS = 4096 * 4096
MAX_SEED = 2**63 - 1
_TRUE, _FALSE = ("true", "1"), ("false", "0")

#: Kept under its old name for callers that catch it.
ParseError = InvalidRequest


@dataclass(frozen=True)
class GenParams:
    """A request, dialect-independent, with every default resolved."""

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
    #: Whether the client sent the seed (otherwise it was chosen by the gateway).
    seed_given: bool
    negative_prompt: str | None
    stream: bool
    partial_images: int
    operation: Operation = Operation.GENERATE
    #: Fingerprint of the uploaded images of an edit or variation.
    source: str | None = None

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


class _Fields:
    """Typed reads of a JSON object or a multipart form (whose values are all text)."""

    def __init__(self, values: Mapping[str, Any], *, form: bool = False) -> None:
        self.values = values
        self.form = form

    def text(self, key: str) -> str | None:
        value = self.values.get(key)
        if value is None or isinstance(value, str):
            return value
        raise InvalidRequest(f"Invalid type for '{key}': expected a string.", key, "invalid_type")

    def integer(self, key: str, low: int, high: int) -> int | None:
        value = self.values.get(key)
        if self.form and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"Invalid type for '{key}': expected an integer.", key, "invalid_type")
        if not low <= value <= high:
            code = "integer_below_min_value" if value < low else "integer_above_max_value"
            raise InvalidRequest(f"Invalid '{key}': {value} is not between {low} and {high}.", key, code)
        return value

    def flag(self, key: str) -> bool | None:
        value = self.values.get(key)
        if self.form and isinstance(value, str) and value.lower() in (*_TRUE, *_FALSE):
            return value.lower() in _TRUE
        if value is None or isinstance(value, bool):
            return value
        raise InvalidRequest(f"Invalid type for '{key}': expected a boolean.", key, "invalid_type")


def _fields_of(dialect: str, body: Any, *, form: bool) -> tuple[_Fields, _Fields]:
    """The top-level fields, and those a provider reads (IndoxHub nests them in ``additional_params``; a
    top-level value is the fallback)."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("The request body must be a JSON object.", None, "invalid_json")
    nested = body.get("additional_params") if dialect == "indoxhub" else None
    if nested is not None and not isinstance(nested, Mapping):
        raise InvalidRequest("additional_params must be an object.", "additional_params", "invalid_type")
    return _Fields(body, form=form), _Fields({**body, **(nested or {})}, form=form)


def _model_of(dialect: str, top: _Fields, operation: Operation) -> tuple[str, str | None]:
    """The model as named (with the dialect's default) and its provider."""
    model = top.text("model")
    if model is None or not model.strip():
        if dialect == "router":
            raise InvalidRequest("You must provide a model.", "model", "missing_required_parameter")
        model = "dall-e-3" if dialect == "indoxhub" and operation is Operation.GENERATE else "dall-e-2"
    prefix, sep, _ = model.partition("/")
    if sep:
        return model, prefix
    provider = top.values.get("provider")
    if dialect != "router" and isinstance(provider, str) and provider:
        return model, provider
    return model, ("openai" if dialect != "router" and rules_for(model) is not None else None)


def _asked(top: _Fields, extra: _Fields, operation: Operation) -> Asked:
    prompt = top.values.get("prompt")
    if operation is Operation.VARIATION and prompt is None:
        prompt = ""
    elif not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("You must provide a prompt.", "prompt", "missing_required_parameter")
    return Asked(
        prompt=prompt,
        n=top.integer("n", 1, 10),
        size=top.text("size"),
        quality=top.text("quality"),
        style=top.text("style"),
        response_format=extra.text("response_format"),
        background=extra.text("background"),
        output_format=extra.text("output_format"),
        output_compression=extra.integer("output_compression", 0, 100),
        moderation=extra.text("moderation"),
        stream=top.flag("stream"),
        partial_images=extra.integer("partial_images", 0, 3),
    )


def _check_loose(dialect: str, model: str, asked: Asked) -> None:
    """The generic checks of OpenAI-compatible gateways for models outside OpenAI's table, and of the looser
    IndoxHub and router dialects."""
    if rules_for(model) is DALL_E_3 and (asked.n or 1) != 1:
        raise InvalidRequest("Invalid 'n': dall-e-3 supports only n=1.", "n", "integer_above_max_value")
    if asked.response_format not in (None, *RESPONSE_FORMATS):
        raise InvalidRequest(f"Invalid response_format {asked.response_format!r}: use url or b64_json.",
                             "response_format")
    if asked.background not in (None, *BACKGROUNDS):
        raise InvalidRequest(f"Invalid background {asked.background!r}: use transparent, opaque or auto.",
                             "background")
    if asked.output_format is not None and asked.output_format.lower() not in (*OUTPUT_FORMATS, "jpg"):
        raise InvalidRequest(f"Invalid output_format {asked.output_format!r}: use png, jpeg or webp.",
                             "output_format")
    if asked.stream and dialect == "openai" and not is_gpt_image(model):
        raise InvalidRequest("Streaming is only supported for the GPT image models.", "stream")
    if asked.stream and dialect == "indoxhub":
        raise InvalidRequest("Streaming is not supported on this endpoint.", "stream")


def _check(dialect: str, model: str, asked: Asked, operation: Operation) -> ModelRules | None:
    rules = rules_for(model)
    if dialect == "openai" and rules is not None:
        check_openai(rules, asked, operation)
    else:
        _check_loose(dialect, model, asked)
    return rules


def _check_size_text(size: str | None, aspect_ratio: str | None, resolution: str | None, *, strict: bool) -> None:
    """Shapes of ``size``, ``aspect_ratio`` and ``resolution``; ``strict`` (router) also rejects a ``size`` that
    contradicts ``resolution`` or ``aspect_ratio``, as seed 004 documents."""
    if aspect_ratio is not None and read_ratio(aspect_ratio) is None:
        raise InvalidRequest(f"Invalid aspect_ratio {aspect_ratio!r}: expected W:H such as 16:9.", "aspect_ratio")
    if resolution is not None and read_tier(resolution) is None:
        raise InvalidRequest(f"Invalid resolution {resolution!r}: expected a tier such as 1K, 2K or 4K.",
                             "resolution")
    if size is None or size == "auto":
        return
    dims, tier = read_dimensions(size), read_tier(size)
    if dims is None and tier is None:
        raise InvalidRequest(
            f"Invalid size {size!r}: expected 'auto', WIDTHxHEIGHT (e.g. 1024x1024) or a tier such as 2K.", "size"
        )
    if strict and resolution is not None and (dims is not None or read_tier(resolution) != tier):
        raise InvalidRequest(f"size {size!r} conflicts with resolution {resolution!r}; pass one or the other.",
                             "size")
    if strict and aspect_ratio is not None and dims is not None and read_ratio(aspect_ratio) != read_ratio(
        f"{dims[0]}:{dims[1]}"
    ):
        raise InvalidRequest(f"size {size!r} conflicts with aspect_ratio {aspect_ratio!r}; pass one or the other.",
                             "size")


def _dimensions(dialect: str, asked: Asked, extra: _Fields) -> tuple[int, int]:
    """The pixels to draw."""
    aspect_ratio, resolution = extra.text("aspect_ratio"), extra.text("resolution")
    _check_size_text(asked.size, aspect_ratio, resolution, strict=dialect == "router")
    width, height = drawn_pixels(None if asked.size == "auto" else asked.size, aspect_ratio, resolution)
    if max(width, height) > MAX_EDGE or width * height > MAX_PIXELS or min(width, height) < 1:
        raise InvalidRequest(f"Invalid size {width}x{height}: the local gateway draws at most 4096x4096 pixels.",
                             "size")
    return width, height


def _rendered_quality(rules: ModelRules | None, model: str, quality: str | None) -> str:
    """The quality the image is drawn (and billed) at. On ``/v1`` the rules have already refused any value the
    model does not take, so only ``auto`` and absent are resolved here."""
    if is_gpt_image(model):
        return gpt_quality(quality)
    if rules is not None and "hd" in rules.qualities:
        return "hd" if quality == "hd" else "standard"
    return quality if quality and quality != "auto" else "standard"


def _delivery(dialect: str, model: str, asked: Asked, default_response_format: str) -> tuple[str, bool, int]:
    """``(response_format, stream, partial_images)``: GPT image models only ever return base64."""
    if is_gpt_image(model):
        response_format = "b64_json"
    elif asked.response_format is not None:
        response_format = asked.response_format
    else:
        response_format = "b64_json" if dialect == "router" else default_response_format
    return response_format, bool(asked.stream), asked.partial_images or 0


def _output_format(value: str | None) -> str:
    value = (value or "png").lower()
    return "jpeg" if value == "jpg" else value


def parse_request(
    dialect: str,
    body: Any,
    *,
    default_response_format: str = "url",
    operation: Operation = Operation.GENERATE,
    form: bool = False,
) -> GenParams:
    """Resolve ``body`` (decoded JSON, or a multipart form's text fields) sent to ``dialect``'s route.

    :param operation: generation, or (``/v1`` multipart routes) edit or variation.
    :param form: the values are multipart text: numbers and booleans are read from strings.
    :raises InvalidRequest: the request cannot be served (400).
    """
    top, extra = _fields_of(dialect, body, form=form)
    model, provider = _model_of(dialect, top, operation)
    bare = bare_model(model)
    asked = _asked(top, extra, operation)
    rules = _check(dialect, model, asked, operation)
    width, height = _dimensions(dialect, asked, extra)
    response_format, stream, partial_images = _delivery(dialect, bare, asked, default_response_format)
    seed = extra.integer("seed", 0, MAX_SEED)
    return GenParams(
        dialect=dialect,
        prompt=asked.prompt,
        model=model,
        bare_model=bare,
        provider=provider,
        n=asked.n or 1,
        width=width,
        height=height,
        quality=_rendered_quality(rules, bare, asked.quality),
        style=asked.style,
        response_format=response_format,
        output_format=_output_format(asked.output_format),
        compression=asked.output_compression,
        background=asked.background,
        seed=seed if seed is not None else seed_from_prompt(asked.prompt),
        seed_given=seed is not None,
        negative_prompt=extra.text("negative_prompt"),
        stream=stream,
        partial_images=partial_images,
        operation=operation,
    )

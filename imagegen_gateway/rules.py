"""The documented per-model rules of OpenAI's image API, as the gateway enforces them on its ``/v1`` routes.

Written from OpenAI's API reference (images: create, create edit, create variation), not from the client's
checks (``imagegen_provider.wire.validation``): the client validates before paying, the gateway refuses what
OpenAI refuses, and tests run both on the same cases so that a mistake in one shows up against the other.
Nothing is re-mapped silently: a value OpenAI would refuse gets a 400 naming the parameter, in OpenAI's error
shape, and is never billed as some neighbouring value.

Models outside the table (``imagen-3``, ``flux-…``: OpenAI-compatible gateways host many) get only the
generic checks, as do the IndoxHub and router dialects, whose gateways are looser.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction

from imagegen_gateway.sizes import read_dimensions

OUTPUT_FORMATS = ("png", "jpeg", "webp")
BACKGROUNDS = ("transparent", "opaque", "auto")
MODERATIONS = ("low", "auto")
RESPONSE_FORMATS = ("url", "b64_json")
#: Formats that carry an alpha channel (a transparent background needs one).
ALPHA_FORMATS = ("png", "webp")
#: Formats whose encoder takes a compression level.
LOSSY_FORMATS = ("jpeg", "webp")
MAX_PARTIAL_IMAGES = 3


class InvalidRequest(ValueError):
    """A request the gateway refuses with 400, described the way OpenAI describes it."""

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class Operation(StrEnum):
    GENERATE = "generate"
    EDIT = "edit"
    VARIATION = "variation"


@dataclass(frozen=True)
class ModelRules:
    """What one OpenAI model accepts."""

    name: str
    max_prompt_chars: int
    max_n: int
    #: Allowed ``size`` values; ``None`` means any size passing :meth:`flexible_size_problem`.
    sizes: tuple[str, ...] | None
    qualities: tuple[str, ...]
    #: Allowed ``style`` values; empty: the parameter is refused.
    styles: tuple[str, ...] = ()
    #: Allowed ``response_format`` values; empty: the parameter is refused (the model always returns base64).
    response_formats: tuple[str, ...] = RESPONSE_FORMATS
    #: Takes ``background``, ``output_format``, ``output_compression``, ``moderation``, ``stream``.
    gpt_options: bool = False
    #: How many input images ``/v1/images/edits`` takes; 0: no edits.
    max_edit_images: int = 0
    variations: bool = False

    def flexible_size_problem(self, size: str) -> str | None:
        """gpt-image-2 draws any size on a 16-pixel grid, aspect 1:3 to 3:1, at most 3840x2160 pixels."""
        dims = read_dimensions(size)
        if dims is None:
            return "must be 'auto' or WIDTHxHEIGHT"
        width, height = dims
        if width % 16 or height % 16:
            return "width and height must be multiples of 16"
        if not Fraction(1, 3) <= Fraction(width, height) <= Fraction(3):
            return "the aspect ratio must be between 1:3 and 3:1"
        if max(width, height) > 3840 or width * height > 3840 * 2160:
            return "at most 3840x2160 pixels"
        return None


DALL_E_2 = ModelRules(
    name="dall-e-2",
    max_prompt_chars=1000,
    max_n=10,
    sizes=("256x256", "512x512", "1024x1024"),
    qualities=("standard", "auto"),
    max_edit_images=1,
    variations=True,
)
DALL_E_3 = ModelRules(
    name="dall-e-3",
    max_prompt_chars=4000,
    max_n=1,
    sizes=("1024x1024", "1792x1024", "1024x1792"),
    qualities=("standard", "hd", "auto"),
    styles=("vivid", "natural"),
)
GPT_IMAGE = ModelRules(
    name="gpt-image",
    max_prompt_chars=32000,
    max_n=10,
    sizes=("1024x1024", "1536x1024", "1024x1536", "auto"),
    qualities=("low", "medium", "high", "auto"),
    response_formats=(),
    gpt_options=True,
    max_edit_images=16,
)
GPT_IMAGE_2 = ModelRules(
    name="gpt-image-2",
    max_prompt_chars=32000,
    max_n=10,
    sizes=None,
    qualities=("low", "medium", "high", "auto"),
    response_formats=(),
    gpt_options=True,
    max_edit_images=16,
)

# Longest prefix first: "gpt-image-2" before "gpt-image-".
_BY_PREFIX: tuple[tuple[str, ModelRules], ...] = (
    ("dall-e-2", DALL_E_2),
    ("dall-e-3", DALL_E_3),
    ("gpt-image-2", GPT_IMAGE_2),
    ("gpt-image-", GPT_IMAGE),
    ("chatgpt-image", GPT_IMAGE),
)


def bare_model(model: str | None) -> str:
    """``"openai/dall-e-3"`` → ``"dall-e-3"``: gateways prefix models with their provider."""
    return (model or "").rsplit("/", 1)[-1].strip().lower()


def rules_for(model: str | None) -> ModelRules | None:
    """The OpenAI rules of ``model`` (with or without provider prefix); ``None`` for other models."""
    name = bare_model(model)
    for prefix, rules in _BY_PREFIX:
        if name.startswith(prefix):
            return rules
    return None


def is_gpt_image(model: str | None) -> bool:
    rules = rules_for(model)
    return rules is not None and rules.gpt_options


@dataclass(frozen=True)
class Asked:
    """The parameters a request named (``None``: not sent), before any default is applied."""

    prompt: str
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    style: str | None = None
    response_format: str | None = None
    background: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    moderation: str | None = None
    stream: bool | None = None
    partial_images: int | None = None


def _one_of(param: str, value: str | None, allowed: tuple[str, ...], model: str) -> None:
    if value is not None and value not in allowed:
        raise InvalidRequest(
            f"Invalid value: {value!r}. Supported values for {model} are: {', '.join(map(repr, allowed))}.", param
        )


def _check_counts(rules: ModelRules, asked: Asked) -> None:
    if len(asked.prompt) > rules.max_prompt_chars:
        raise InvalidRequest(
            f"Invalid 'prompt': string too long. Expected a string with maximum length {rules.max_prompt_chars} "
            f"for {rules.name}, but got a string with length {len(asked.prompt)} instead.",
            "prompt",
            "string_above_max_length",
        )
    if asked.n is not None and asked.n > rules.max_n:
        message = (
            f"Invalid 'n': {rules.name} supports only n=1." if rules.max_n == 1
            else f"Invalid 'n': integer above maximum value. Expected a value <= {rules.max_n}, got {asked.n}."
        )
        raise InvalidRequest(message, "n", "integer_above_max_value")


def _check_size(rules: ModelRules, size: str | None) -> None:
    if size is None:
        return
    if rules.sizes is not None:
        _one_of("size", size, rules.sizes, rules.name)
    elif size != "auto":
        problem = rules.flexible_size_problem(size)
        if problem:
            raise InvalidRequest(f"Invalid size {size!r} for {rules.name}: {problem}.", "size")


def _check_refused(rules: ModelRules, asked: Asked) -> None:
    """Parameters the model does not take at all: OpenAI answers ``unknown_parameter``."""
    refused = []
    if asked.style is not None and not rules.styles:
        refused.append("style")
    if asked.response_format is not None and not rules.response_formats:
        refused.append("response_format")
    if not rules.gpt_options:
        gpt_only = ("background", "output_format", "output_compression", "moderation", "stream", "partial_images")
        refused.extend(name for name in gpt_only if getattr(asked, name) is not None)
    if refused:
        raise InvalidRequest(
            f"Unknown parameter: '{refused[0]}' is not supported by {rules.name}.", refused[0], "unknown_parameter"
        )


def check_encoding(asked: Asked) -> None:
    """Rules that hold whatever the model: compression needs a lossy format, transparency an alpha channel,
    partial images a stream."""
    _one_of("output_format", asked.output_format, OUTPUT_FORMATS, "output_format")
    _one_of("background", asked.background, BACKGROUNDS, "background")
    _one_of("moderation", asked.moderation, MODERATIONS, "moderation")
    _one_of("response_format", asked.response_format, RESPONSE_FORMATS, "response_format")
    output_format = asked.output_format or "png"
    if asked.output_compression is not None and output_format not in LOSSY_FORMATS:
        raise InvalidRequest(
            "output_compression is only supported with output_format 'jpeg' or 'webp'.", "output_compression"
        )
    if asked.background == "transparent" and output_format not in ALPHA_FORMATS:
        raise InvalidRequest(
            "Transparent background is only supported with output_format 'png' or 'webp'.", "background"
        )
    if asked.partial_images and not asked.stream:
        raise InvalidRequest("partial_images is only supported with stream=true.", "partial_images")


def check_openai(rules: ModelRules, asked: Asked, operation: Operation = Operation.GENERATE) -> None:
    """Refuse what OpenAI refuses for ``rules``' model.

    :raises InvalidRequest: the first rule broken.
    """
    if operation is Operation.EDIT and not rules.max_edit_images:
        raise InvalidRequest(f"{rules.name} does not support image edits.", "model")
    if operation is Operation.VARIATION and not rules.variations:
        raise InvalidRequest(f"{rules.name} does not support image variations.", "model")
    _check_counts(rules, asked)
    _check_refused(rules, asked)
    _check_size(rules, asked.size)
    _one_of("quality", asked.quality, rules.qualities, rules.name)
    _one_of("style", asked.style, rules.styles, rules.name)
    _one_of("response_format", asked.response_format, rules.response_formats, rules.name)
    check_encoding(asked)

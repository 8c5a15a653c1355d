"""Per-model-family rules, checked before any money is spent.

The rules are those of OpenAI's image API (seed 003) and the OpenAI-compatible gateway of seed 002, plus the
router's size/resolution conflict (seed 004). Models we do not know (gateways host many) get only the generic
checks of :class:`~imagegen_provider.wire.request.ImageRequest`.
"""

from __future__ import annotations

from enum import StrEnum
from fractions import Fraction
from typing import TYPE_CHECKING

from imagegen_provider.wire.errors import Violation
from imagegen_provider.wire.sizes import parse_ratio, parse_size, parse_tier

if TYPE_CHECKING:
    from imagegen_provider.wire.request import ImageRequest


class ModelFamily(StrEnum):
    DALL_E_2 = "dall-e-2"
    DALL_E_3 = "dall-e-3"
    GPT_IMAGE = "gpt-image"
    GPT_IMAGE_2 = "gpt-image-2"
    OTHER = "other"


def bare_model_name(model: str | None) -> str:
    """``"openai/dall-e-3"`` → ``"dall-e-3"``: gateways prefix models with their provider."""
    return (model or "").rsplit("/", 1)[-1].strip().lower()


def model_family(model: str | None) -> ModelFamily:
    name = bare_model_name(model)
    if name.startswith("dall-e-2"):
        return ModelFamily.DALL_E_2
    if name.startswith("dall-e-3"):
        return ModelFamily.DALL_E_3
    if name.startswith("gpt-image-2"):
        return ModelFamily.GPT_IMAGE_2
    if name.startswith(("gpt-image-", "chatgpt-image")):
        return ModelFamily.GPT_IMAGE
    return ModelFamily.OTHER


GPT_FAMILIES = frozenset({ModelFamily.GPT_IMAGE, ModelFamily.GPT_IMAGE_2})

MAX_PROMPT_CHARS = {
    ModelFamily.DALL_E_2: 1000,
    ModelFamily.DALL_E_3: 4000,
    ModelFamily.GPT_IMAGE: 32000,
    ModelFamily.GPT_IMAGE_2: 32000,
}

ALLOWED_SIZES = {
    ModelFamily.DALL_E_2: ("256x256", "512x512", "1024x1024"),
    ModelFamily.DALL_E_3: ("1024x1024", "1792x1024", "1024x1792"),
    ModelFamily.GPT_IMAGE: ("1024x1024", "1536x1024", "1024x1536", "auto"),
}

ALLOWED_QUALITY = {
    ModelFamily.DALL_E_2: ("standard", "auto"),
    ModelFamily.DALL_E_3: ("standard", "hd", "auto"),
    ModelFamily.GPT_IMAGE: ("low", "medium", "high", "auto"),
    ModelFamily.GPT_IMAGE_2: ("low", "medium", "high", "auto"),
}

GPT_IMAGE_2_MAX_PIXELS = 3840 * 2160
GPT_IMAGE_2_MAX_EDGE = 3840

# Parameters that only the GPT image models accept (seed 003).
_GPT_ONLY = ("background", "output_format", "output_compression", "moderation", "stream", "partial_images")


def _check_gpt_image_2_size(size: str) -> str | None:
    if size == "auto":
        return None
    dims = parse_size(size)
    if dims is None:
        return "must be 'auto' or WIDTHxHEIGHT for gpt-image-2"
    width, height = dims
    if width % 16 or height % 16:
        return "width and height must both be divisible by 16 for gpt-image-2"
    if not Fraction(1, 3) <= Fraction(width, height) <= Fraction(3, 1):
        return "aspect ratio must be between 1:3 and 3:1 for gpt-image-2"
    if max(width, height) > GPT_IMAGE_2_MAX_EDGE or width * height > GPT_IMAGE_2_MAX_PIXELS:
        return "maximum size for gpt-image-2 is 3840x2160"
    return None


def _check_size_conflicts(req: ImageRequest) -> list[Violation]:
    """Router rule (seed 004): ``size`` is a shorthand for ``resolution`` + ``aspect_ratio``; conflicting
    values are rejected. A tier ``size`` with an ``aspect_ratio`` is consistent, so is a repeated tier."""
    if req.size is None or req.size == "auto":
        return []
    violations = []
    dims = parse_size(req.size)
    tier = parse_tier(req.size)
    if req.resolution is not None and (dims is not None or parse_tier(req.resolution) != tier):
        violations.append(Violation("size", f"conflicts with resolution={req.resolution!r}; pass one or the other"))
    if req.aspect_ratio is not None and dims is not None and parse_ratio(req.aspect_ratio) != Fraction(*dims):
        violations.append(
            Violation("size", f"conflicts with aspect_ratio={req.aspect_ratio!r}; pass one or the other")
        )
    return violations


def _check_family(req: ImageRequest, family: ModelFamily, name: str) -> list[Violation]:
    """Prompt length, n, size and quality: what each documented family accepts."""
    violations: list[Violation] = []
    max_chars = MAX_PROMPT_CHARS.get(family)
    if max_chars is not None and len(req.prompt) > max_chars:
        violations.append(Violation("prompt", f"{len(req.prompt)} characters; {name} accepts at most {max_chars}"))
    if family is ModelFamily.DALL_E_3 and req.n != 1:
        violations.append(Violation("n", "dall-e-3 supports only n=1"))
    if req.size is not None:
        if family is ModelFamily.GPT_IMAGE_2:
            problem = _check_gpt_image_2_size(req.size)
            if problem:
                violations.append(Violation("size", f"{req.size!r}: {problem}"))
        elif family in ALLOWED_SIZES and req.size not in ALLOWED_SIZES[family]:
            allowed = ", ".join(ALLOWED_SIZES[family])
            violations.append(Violation("size", f"{req.size!r} is not supported by {name}; use one of {allowed}"))
    if req.quality is not None and family in ALLOWED_QUALITY and req.quality not in ALLOWED_QUALITY[family]:
        allowed = ", ".join(ALLOWED_QUALITY[family])
        violations.append(Violation("quality", f"{req.quality!r} is not supported by {name}; use one of {allowed}"))
    return violations


def _check_parameters(req: ImageRequest, family: ModelFamily, name: str) -> list[Violation]:
    """Which parameters the family takes at all."""
    violations: list[Violation] = []
    if req.style is not None and family in (ModelFamily.DALL_E_2, *GPT_FAMILIES):
        violations.append(Violation("style", "only dall-e-3 accepts style"))
    if family in GPT_FAMILIES and req.response_format is not None:
        # OpenAI answers 400 "Unknown parameter" for any value: these models always return b64_json.
        violations.append(
            Violation("response_format", f"{name} does not take response_format (it always returns b64_json)")
        )
    if family in (ModelFamily.DALL_E_2, ModelFamily.DALL_E_3):
        violations.extend(
            Violation(field, f"only the GPT image models accept {field}, not {name}")
            for field in _GPT_ONLY
            if getattr(req, field) is not None
        )
    return violations


def _check_generic(req: ImageRequest) -> list[Violation]:
    """Rules whatever the model."""
    violations: list[Violation] = []
    if req.output_compression is not None and req.output_format not in ("jpeg", "webp"):
        violations.append(Violation("output_compression", "only allowed with output_format 'jpeg' or 'webp'"))
    if req.background == "transparent" and req.output_format not in (None, "png", "webp"):
        violations.append(Violation("background", "'transparent' needs output_format 'png' or 'webp'"))
    if req.partial_images and not req.stream:
        violations.append(Violation("partial_images", "only allowed with stream=true"))
    violations.extend(_check_size_conflicts(req))
    return violations


def check_model_rules(req: ImageRequest) -> list[Violation]:
    """Return every rule ``req`` breaks for its model family (empty when valid)."""
    family = model_family(req.model)
    name = bare_model_name(req.model) or "the model"
    return [*_check_family(req, family, name), *_check_parameters(req, family, name), *_check_generic(req)]

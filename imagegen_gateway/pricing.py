"""Token usage and cost of a request, in the three usage shapes the documented gateways return.

The numbers follow OpenAI's published image-token table so that clients' cost estimates can be checked
against what the gateway reports; the price table is deliberately small and fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from imagegen_provider.wire.validation import GPT_FAMILIES, ModelFamily, model_family

# Output image tokens per quality for the sizes OpenAI documents; other sizes scale by pixel count.
_GPT_OUTPUT_TOKENS: dict[tuple[int, int], dict[str, int]] = {
    (1024, 1024): {"low": 272, "medium": 1056, "high": 4160},
    (1024, 1536): {"low": 408, "medium": 1584, "high": 6240},
    (1536, 1024): {"low": 408, "medium": 1584, "high": 6240},
}
_GPT_INPUT_USD_PER_TOKEN = 5 / 1_000_000
_GPT_OUTPUT_USD_PER_TOKEN = 40 / 1_000_000
_DALL_E_2_USD = 0.02
_OTHER_USD = 0.01


def is_gpt_image(model: str | None) -> bool:
    return model_family(model) in GPT_FAMILIES


def gpt_quality(quality: str | None) -> str:
    """The quality a GPT image model actually renders at (``auto`` and unknown values → ``medium``)."""
    if quality in ("low", "medium", "high"):
        return quality
    return "high" if quality == "hd" else "medium"


def gpt_output_tokens(width: int, height: int, quality: str | None) -> int:
    level = gpt_quality(quality)
    table = _GPT_OUTPUT_TOKENS.get((width, height))
    if table is not None:
        return table[level]
    base = _GPT_OUTPUT_TOKENS[(1024, 1024)][level]
    return max(1, round(base * width * height / (1024 * 1024)))


def prompt_tokens(prompt: str) -> int:
    """Roughly four characters a token, as OpenAI's rule of thumb."""
    return math.ceil(len(prompt) / 4)


@dataclass(frozen=True)
class Usage:
    """What one request consumed: tokens (GPT image models only, else 0) and USD."""

    input_tokens: int
    output_tokens: int
    cost_usd: float

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def openai_gpt(self) -> dict[str, Any]:
        """OpenAI's GPT-image shape (seed 003)."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "input_tokens_details": {"text_tokens": self.input_tokens, "image_tokens": 0},
            "output_tokens_details": {"image_tokens": self.output_tokens, "text_tokens": 0},
        }

    def openai_compatible(self) -> dict[str, Any]:
        """The zeroed chat-style shape OpenAI-compatible gateways send for other models (seed 001)."""
        return {"prompt_tokens": self.input_tokens, "completion_tokens": self.output_tokens,
                "total_tokens": self.total_tokens}

    def indoxhub(self, latency_ms: float) -> dict[str, Any]:
        return {
            "tokens_prompt": self.input_tokens,
            "tokens_completion": self.output_tokens,
            "tokens_total": self.total_tokens,
            "cost": self.cost_usd,
            "latency": latency_ms,
        }

    def router(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "cost": self.cost_usd,
        }


def _per_image_usd(family: ModelFamily, width: int, height: int, quality: str | None) -> float:
    if family is ModelFamily.DALL_E_2:
        return _DALL_E_2_USD
    if family is ModelFamily.DALL_E_3:
        hd = quality == "hd"
        if max(width, height) >= 1792:
            return 0.12 if hd else 0.08
        return 0.08 if hd else 0.04
    return _OTHER_USD


def compute_usage(model: str, prompt: str, width: int, height: int, quality: str | None, n: int) -> Usage:
    """Usage of ``n`` images. For GPT image models the prompt is paid once per request."""
    family = model_family(model)
    if family in GPT_FAMILIES:
        input_tokens = prompt_tokens(prompt)
        output_tokens = n * gpt_output_tokens(width, height, quality)
        cost = input_tokens * _GPT_INPUT_USD_PER_TOKEN + output_tokens * _GPT_OUTPUT_USD_PER_TOKEN
        return Usage(input_tokens, output_tokens, round(cost, 6))
    return Usage(0, 0, round(n * _per_image_usd(family, width, height, quality), 6))

"""What the simulated account is charged, in the usage shapes the documented gateways report.

Prices come from the engine's price file ``imagegen_provider/data/prices.json``, read as data (no code of the
client is imported): one price table, so the gateway's simulated charges and the engine's estimates can only
differ where the gateway is told to charge differently. GPT image models are billed by tokens (OpenAI's
published image-token table, also in that file); other models per image.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

from imagegen_gateway.rules import bare_model, is_gpt_image

#: Per-image price of a model the price file does not list (gateways host many).
UNLISTED_MODEL_USD = 0.01
#: GPT image model whose token prices stand in for a GPT image model the file does not list.
_GPT_FALLBACK = "gpt-image-1"
_GPT_LEVELS = ("low", "medium", "high")


@functools.cache
def price_table() -> dict[str, Any]:
    """The engine's price file, parsed once."""
    text = resources.files("imagegen_provider").joinpath("data/prices.json").read_text(encoding="utf-8")
    table: dict[str, Any] = json.loads(text)
    return table


def gpt_quality(quality: str | None) -> str:
    """The level a GPT image model renders at: ``auto`` (and, on the looser dialects, anything unknown) is
    ``medium``; the looser dialects read dall-e's ``hd`` as ``high``."""
    if quality in _GPT_LEVELS:
        return quality
    return "high" if quality == "hd" else "medium"


def gpt_output_tokens(width: int, height: int, quality: str | None) -> int:
    """Image tokens of one output image: OpenAI's table for its sizes, scaled by pixel count otherwise."""
    level = gpt_quality(quality)
    table: dict[str, dict[str, int]] = price_table()["output_tokens"]
    sized = table.get(f"{width}x{height}")
    if sized is not None:
        return sized[level]
    return max(1, round(table["1024x1024"][level] * width * height / (1024 * 1024)))


def prompt_tokens(prompt: str) -> int:
    """Roughly four characters a token, as OpenAI's rule of thumb."""
    return math.ceil(len(prompt) / 4)


@dataclass(frozen=True)
class BilledUsage:
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


def _closest_size(by_size: dict[str, Any], width: int, height: int) -> Any:
    """The entry of the listed size nearest in pixel count (the looser dialects draw sizes OpenAI does not)."""
    exact = by_size.get(f"{width}x{height}", by_size.get("*"))
    if exact is not None:
        return exact

    def distance(key: str) -> int:
        w, _, h = key.partition("x")
        return abs(int(w) * int(h) - width * height)

    return by_size[min(by_size, key=distance)]


def per_image_usd(model: str, width: int, height: int, quality: str | None) -> float:
    """List price of one image of a per-image model; :data:`UNLISTED_MODEL_USD` for unlisted models."""
    by_size = price_table()["per_image"].get(bare_model(model))
    if not by_size:
        return UNLISTED_MODEL_USD
    by_quality: dict[str, float] = _closest_size(by_size, width, height)
    price = by_quality.get(quality or "standard", by_quality.get("*", by_quality.get("standard")))
    return float(price) if price is not None else max(by_quality.values())


def batch_fraction(model: str) -> float:
    """The batch price of ``model`` as a fraction of its sync price: the price file's ``batch`` entry for it,
    else its ``"*"``, else 0.5."""
    table: dict[str, Any] = price_table().get("batch", {})
    value = table.get(model, table.get(bare_model(model), table.get("*", 0.5)))
    return float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else 0.5


def billed_usage(model: str, prompt: str, width: int, height: int, quality: str | None, n: int) -> BilledUsage:
    """Usage of ``n`` images. For GPT image models the prompt is paid once per request."""
    if is_gpt_image(model):
        tokens = price_table()["per_million_tokens"]
        rates = tokens.get(bare_model(model), tokens[_GPT_FALLBACK])
        input_tokens = prompt_tokens(prompt)
        output_tokens = n * gpt_output_tokens(width, height, quality)
        cost = (input_tokens * rates["input_text"] + output_tokens * rates["output_image"]) / 1_000_000
        return BilledUsage(input_tokens, output_tokens, round(cost, 6))
    return BilledUsage(0, 0, round(n * per_image_usd(model, width, height, quality), 6))

"""Cost per image: the gateway's reported cost, else token pricing from usage, else a per-image list price.

An unknown model with no reported cost has no cost (``None``), never a made-up number.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from imagegen_provider.engine.schema import COST_ESTIMATED, COST_REPORTED
from imagegen_provider.wire.result import Usage
from imagegen_provider.wire.validation import bare_model_name

_DEFAULT_SIZE = "1024x1024"


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


@dataclass(frozen=True)
class Cost:
    usd: float | None
    source: str | None  # "reported" | "estimated" | None


NO_COST = Cost(None, None)


class PriceTable:
    """List prices from ``imagegen_provider/data/prices.json``, optionally overridden (same shape)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._per_image: dict[str, Any] = dict(data.get("per_image", {}))
        self._per_token: dict[str, Any] = dict(data.get("per_million_tokens", {}))
        self._output_tokens: dict[str, Any] = dict(data.get("output_tokens", {}))

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None) -> PriceTable:
        text = resources.files("imagegen_provider").joinpath("data/prices.json").read_text()
        data = json.loads(text)
        if overrides:
            if not isinstance(overrides, Mapping):
                raise ValueError("price overrides must be a mapping shaped like prices.json")
            _merge(data, overrides)
        return cls(data)

    def _model_key(self, model: str | None, table: Mapping[str, Any]) -> str | None:
        if not model:
            return None
        for candidate in (model, bare_model_name(model)):
            if candidate in table:
                return candidate
        return None

    def _per_image_price(self, model: str | None, size: str | None, quality: str | None) -> float | None:
        key = self._model_key(model, self._per_image)
        if key is None:
            return None
        sizes = self._per_image[key]
        by_quality = sizes.get(size or _DEFAULT_SIZE) or sizes.get("*")
        if not by_quality:
            return None
        price = by_quality.get(quality or "standard") or by_quality.get("*")
        return float(price) if price is not None else None

    def _token_cost(self, model: str | None, usage: Usage) -> float | None:
        key = self._model_key(model, self._per_token)
        if key is None or usage.is_empty:
            return None
        rates = self._per_token[key]
        if usage.input_text_tokens is not None or usage.input_image_tokens is not None:
            inputs = (usage.input_text_tokens or 0) * rates["input_text"] + (usage.input_image_tokens or 0) * rates[
                "input_image"
            ]
        else:
            inputs = (usage.input_tokens or 0) * rates["input_text"]
        if usage.output_image_tokens is not None or usage.output_text_tokens is not None:
            outputs = (usage.output_image_tokens or 0) * rates["output_image"] + (
                usage.output_text_tokens or 0
            ) * rates.get("output_text", rates["output_image"])
        else:
            outputs = (usage.output_tokens or 0) * rates["output_image"]
        return (inputs + outputs) / 1_000_000

    def cost(
        self,
        *,
        model: str | None,
        size: str | None,
        quality: str | None,
        usage: Usage | None = None,
        reported_usd: float | None = None,
        images: int = 1,
    ) -> Cost:
        """Cost of one image of a response that carried ``images`` images."""
        if reported_usd is not None:
            return Cost(reported_usd / max(1, images), COST_REPORTED)
        if usage is not None:
            tokens = self._token_cost(model, usage)
            if tokens is not None:
                return Cost(tokens / max(1, images), COST_ESTIMATED)
        price = self._per_image_price(model, size, quality)
        if price is not None:
            return Cost(price, COST_ESTIMATED)
        return NO_COST

    def estimate(self, *, model: str | None, size: str | None, quality: str | None, prompt_chars: int = 0) -> float | None:
        """Expected cost of one image before sending it, for budgets and dry runs.

        Token-priced models with ``auto`` (or no) quality are estimated at ``high``: a budget must not be
        overrun because an estimate was optimistic.
        """
        key = self._model_key(model, self._per_token)
        if key is not None:
            by_quality = self._output_tokens.get(size or _DEFAULT_SIZE) or self._output_tokens[_DEFAULT_SIZE]
            tokens = by_quality.get(quality if quality in by_quality else "high")
            rates = self._per_token[key]
            return (math.ceil(prompt_chars / 4) * rates["input_text"] + tokens * rates["output_image"]) / 1_000_000
        return self._per_image_price(model, size, quality)

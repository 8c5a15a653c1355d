"""Cost per image: the gateway's reported cost, else token pricing from usage, else a per-image list price.

An unknown model with no reported cost has no cost (``None``), never a made-up number. A reported cost is
untrusted input: anything but a finite, non-negative number is ignored (and the list price used instead).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from imagegen_provider.engine.schema import COST_ESTIMATED, COST_ESTIMATED_BATCH, COST_REPORTED
from imagegen_provider.wire.result import Usage
from imagegen_provider.wire.validation import bare_model_name

log = logging.getLogger(__name__)

_DEFAULT_SIZE = "1024x1024"
#: Batch price as a fraction of the sync price when the price table's ``batch`` section does not say (OpenAI).
DEFAULT_BATCH_FRACTION = 0.5


def usable_usd(value: object) -> float | None:
    """``value`` as a cost in USD if it is a finite, non-negative number; ``None`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


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


def packaged_prices() -> dict[str, Any]:
    """The packaged price table (``imagegen_provider/data/prices.json``), the one every component reads."""
    data: dict[str, Any] = json.loads(resources.files("imagegen_provider").joinpath("data/prices.json").read_text())
    return data


class PriceTable:
    """List prices from ``imagegen_provider/data/prices.json``, optionally overridden (same shape).

    :param price_as: model names priced as another model (``{"my-alias": "dall-e-3"}``): gateways route
        under names of their own, and an alias without a price would make a budget unenforceable.
    """

    def __init__(self, data: Mapping[str, Any], *, price_as: Mapping[str, str] | None = None) -> None:
        self._per_image: dict[str, Any] = dict(data.get("per_image", {}))
        self._per_token: dict[str, Any] = dict(data.get("per_million_tokens", {}))
        self._output_tokens: dict[str, Any] = dict(data.get("output_tokens", {}))
        self._batch: dict[str, Any] = dict(data.get("batch", {}))
        self._aliases = dict(price_as or {})
        self._warned_reported: set[str] = set()

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, *, price_as: Mapping[str, str] | None = None
    ) -> PriceTable:
        data = packaged_prices()
        if overrides:
            if not isinstance(overrides, Mapping):
                raise ValueError("price overrides must be a mapping shaped like prices.json")
            _merge(data, overrides)
        table = cls(data, price_as=price_as)
        table.check_aliases()
        return table

    def batch_fraction(self, model: str | None) -> float:
        """The batch price of ``model`` as a fraction of its sync price: its entry in the ``batch`` section, else
        that section's ``"*"``, else :data:`DEFAULT_BATCH_FRACTION`. A value that is not a fraction in [0, 1] is
        refused (a budget must not be computed from it)."""
        key = self._model_key(model, self._batch) if model else None
        value = self._batch.get(key) if key is not None else self._batch.get("*", DEFAULT_BATCH_FRACTION)
        fraction = usable_usd(value)
        if fraction is None or fraction > 1:
            raise ValueError(f"prices.json batch fraction for {model or '*'!r} must be between 0 and 1, got {value!r}")
        return fraction

    def batch_cost(self, cost: Cost, model: str | None) -> Cost:
        """``cost`` (a sync list/token price) at the batch price."""
        if cost.usd is None:
            return cost
        return Cost(cost.usd * self.batch_fraction(model), COST_ESTIMATED_BATCH)

    def check_aliases(self) -> None:
        """Every ``price_as`` target must have a price: an alias to nothing would budget at nothing."""
        for alias, target in self._aliases.items():
            if not isinstance(target, str) or (
                self._model_key(target, self._per_image, aliased=False) is None
                and self._model_key(target, self._per_token, aliased=False) is None
            ):
                raise ValueError(f"price_as maps {alias!r} to {target!r}, which has no price in the price table")

    def _model_key(self, model: str | None, table: Mapping[str, Any], *, aliased: bool = True) -> str | None:
        if not model:
            return None
        candidates = [model, bare_model_name(model)]
        if aliased:
            targets = [self._aliases[c] for c in candidates if c in self._aliases]
            candidates = targets + candidates
        for candidate in candidates:
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
        # Token counts come from the gateway: negative ones make no cost, not a refund.
        return usable_usd((inputs + outputs) / 1_000_000)

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
        total = self.response_cost(
            model=model, size=size, quality=quality, usage=usage, reported_usd=reported_usd, images=images
        )
        if total.usd is None:
            return total
        return Cost(total.usd / max(1, images), total.source)

    def response_cost(
        self,
        *,
        model: str | None,
        size: str | None,
        quality: str | None,
        usage: Usage | None = None,
        reported_usd: float | None = None,
        images: int = 1,
    ) -> Cost:
        """What a whole response cost, every image it carried included (a gateway returning four images for
        ``n=1`` charged for four)."""
        reported = usable_usd(reported_usd)
        if reported is not None:
            return Cost(reported, COST_REPORTED)
        if reported_usd is not None:
            self._warn_reported(model, reported_usd)
        if usage is not None:
            tokens = self._token_cost(model, usage)
            if tokens is not None:
                return Cost(tokens, COST_ESTIMATED)
        price = self._per_image_price(model, size, quality)
        if price is not None:
            return Cost(price * max(1, images), COST_ESTIMATED)
        return NO_COST

    def _warn_reported(self, model: str | None, value: object) -> None:
        key = str(model)
        if key not in self._warned_reported:
            self._warned_reported.add(key)
            log.warning(
                "The gateway reported an unusable cost (%.40r) for model %r: ignored, priced from the list",
                value, model,
            )

    def estimate(
        self, *, model: str | None, size: str | None, quality: str | None, prompt_chars: int = 0
    ) -> float | None:
        """Expected cost of one image before sending it, for budgets and dry runs.

        Token-priced models with ``auto`` (or no) quality are estimated at ``high``: a budget must not be
        overrun because an estimate was optimistic.
        """
        key = self._model_key(model, self._per_token)
        if key is not None:
            by_quality = self._output_tokens.get(size or _DEFAULT_SIZE) or self._output_tokens[_DEFAULT_SIZE]
            tokens = by_quality.get(quality if quality in by_quality else "high")
            rates = self._per_token[key]
            return float(math.ceil(prompt_chars / 4) * rates["input_text"] + tokens * rates["output_image"]) / 1_000_000
        return self._per_image_price(model, size, quality)

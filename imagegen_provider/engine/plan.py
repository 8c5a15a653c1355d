"""Units of work: one image of one prompt row, with its seed and its validated request.

Per-row values are used as given or the row fails, naming the field: a seed outside ``[0, MAX_SEED]`` is never
wrapped, an ``n`` below 1 or above the model's maximum never falls back to ``images_per_prompt``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from imagegen_provider.engine.keys import derive_seed, row_seed
from imagegen_provider.engine.prompts import PromptRow
from imagegen_provider.wire.errors import RequestValidationError
from imagegen_provider.wire.request import MAX_SEED, ImageRequest

_INT64_MAX = 2**63 - 1
#: The most images any model family takes per request (the wire rules lower it per family).
_MAX_N = 10


@dataclass(frozen=True)
class ImageJob:
    """One image to generate. ``request`` is ``None`` when the row is invalid; ``invalid`` says why."""

    row: PromptRow
    image_index: int
    seed: int
    params: dict[str, Any]
    request: ImageRequest | None
    invalid: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.row.prompt_id, self.image_index)


def _row_n(row: PromptRow) -> int | None:
    n = row.overrides.get("n")
    return int(n) if n is not None else None


def images_of(row: PromptRow, images_per_prompt: int) -> int:
    """Images (jobs) of a row: its ``n`` column overrides ``images_per_prompt``.

    An ``n`` no model takes (below 1, above 10) makes one failed job, so the row is reported rather than skipped
    (and a huge ``n`` plans no huge number of failures); an ``n`` above its own model's maximum (dall-e-3: 1)
    fails each of its images in :func:`jobs_for_row`."""
    n = _row_n(row)
    if n is None:
        return images_per_prompt
    return n if 1 <= n <= _MAX_N else 1


def _context(row: PromptRow) -> str:
    return f"row {row.position} (id {row.prompt_id!r})"


def _invalid_prompt(prompt: str | None) -> str | None:
    if prompt is None:
        return "prompt is null"
    if not prompt.strip():
        return "prompt is empty"
    return None


def _invalid_values(row: PromptRow, params: Mapping[str, Any]) -> str | None:
    """Row-level problems that request validation would not catch or would describe per image."""
    n = _row_n(row)
    if n is not None:
        try:
            # The model family's own limit on n (dall-e-3: 1, others: 10), from the wire rules.
            ImageRequest.build(context=_context(row), **params, prompt=row.prompt or "x", n=n)
        except RequestValidationError as exc:
            problems = [v for v in exc.violations if v.field == "n"]
            if problems:
                detail = "; ".join(str(v) for v in problems)
                return f"{_context(row)}: n={n} is not a usable image count ({detail})"
    for name, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"{_context(row)}: {name}: {value} is not a finite number"
    return None


def _seed_of(row: PromptRow, base_seed: int, index: int) -> tuple[int, str | None]:
    """The seed of image ``index`` and, when it is out of range, why (the value is never wrapped)."""
    if "seed" not in row.overrides:
        return derive_seed(base_seed, row.prompt_id, index), None
    given = int(row.overrides["seed"])
    seed = row_seed(given, index)
    if 0 <= seed <= MAX_SEED:
        return seed, None
    value = f"{given}" if index == 0 else f"{given} + image index {index} = {seed}"
    problem = f"{_context(row)}: seed: {value} is outside 0..{MAX_SEED} (image i of a row uses seed + i)"
    # Recorded as computed; a value the metadata's int64 column cannot hold is recorded as given.
    return (seed if seed <= _INT64_MAX else given), problem


def _build(row: PromptRow, params: Mapping[str, Any], seed: int) -> tuple[ImageRequest | None, str | None]:
    try:
        return ImageRequest.build(context=_context(row), **params, prompt=row.prompt, seed=seed, n=1), None
    except RequestValidationError as exc:
        return None, str(exc)


def jobs_for_row(
    row: PromptRow,
    *,
    images_per_prompt: int,
    base_seed: int,
    defaults: Mapping[str, Any],
) -> Iterator[ImageJob]:
    """The image jobs of one row: seeds derived from (base seed, prompt id, image index), or from the row's
    own ``seed`` column when it has one (image ``i`` uses ``seed + i``)."""
    overrides = {k: v for k, v in row.overrides.items() if k not in ("n", "seed")}
    params = {**defaults, **overrides}
    prompt_problem = _invalid_prompt(row.prompt)
    row_problem = f"{_context(row)}: {prompt_problem}" if prompt_problem else _invalid_values(row, params)
    for index in range(images_of(row, images_per_prompt)):
        seed, problem = _seed_of(row, base_seed, index)
        problem = row_problem or problem
        request = None
        if problem is None:
            request, problem = _build(row, params, seed)
        yield ImageJob(row=row, image_index=index, seed=seed, params=params, request=request, invalid=problem)


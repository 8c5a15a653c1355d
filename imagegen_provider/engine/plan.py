"""Units of work: one image of one prompt row, with its seed and its validated request."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from imagegen_provider.engine.keys import derive_seed, row_seed
from imagegen_provider.engine.prompts import PromptRow
from imagegen_provider.wire.errors import RequestValidationError
from imagegen_provider.wire.request import ImageRequest


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


def images_of(row: PromptRow, images_per_prompt: int) -> int:
    """A row's ``n`` column overrides ``images_per_prompt`` for that row."""
    n = row.overrides.get("n")
    return int(n) if isinstance(n, int) and n >= 0 else images_per_prompt


def _invalid_prompt(prompt: str | None) -> str | None:
    if prompt is None:
        return "prompt is null"
    if not prompt.strip():
        return "prompt is empty"
    return None


def jobs_for_row(
    row: PromptRow,
    *,
    images_per_prompt: int,
    base_seed: int,
    defaults: Mapping[str, Any],
) -> Iterator[ImageJob]:
    """The image jobs of one row: seeds derived from (base seed, prompt id, image index), or from the row's
    own ``seed`` column when it has one."""
    overrides = {k: v for k, v in row.overrides.items() if k not in ("n", "seed")}
    params = {**defaults, **overrides}
    context = f"row {row.position} (id {row.prompt_id!r})"
    for index in range(images_of(row, images_per_prompt)):
        if "seed" in row.overrides:
            seed = row_seed(int(row.overrides["seed"]), index)
        else:
            seed = derive_seed(base_seed, row.prompt_id, index)
        problem = _invalid_prompt(row.prompt)
        request = None
        if problem is None:
            try:
                request = ImageRequest.build(context=context, **params, prompt=row.prompt, seed=seed, n=1)
            except RequestValidationError as exc:
                problem = str(exc)
        else:
            problem = f"{context}: {problem}"
        yield ImageJob(row=row, image_index=index, seed=seed, params=params, request=request, invalid=problem)

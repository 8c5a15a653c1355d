"""Prompt tables for the cases: an ``id`` and a ``prompt`` column, like a user's table."""

from __future__ import annotations

import itertools
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_SUBJECTS = ("a red fox", "an old lighthouse", "a bowl of ramen", "a vintage bicycle", "a snow leopard",
             "a glass teapot", "a desert canyon", "a paper crane", "a mountain village", "a koi pond",
             "a steam locomotive", "a sunflower field", "a city street at night", "a wooden sailboat",
             "a honeybee on lavender", "a stack of books")
_STYLES = ("watercolour", "studio photograph", "isometric 3D render", "oil painting", "pencil sketch",
           "product shot on white", "cinematic still", "flat vector illustration")
_LIGHT = ("soft morning light", "golden hour", "overcast", "neon glow", "candlelight", "harsh noon sun")


def prompt_texts() -> list[str]:
    """768 distinct, realistic-length prompts."""
    return [
        f"{subject}, {style}, {light}, highly detailed, 35mm, shallow depth of field"
        for subject, style, light in itertools.product(_SUBJECTS, _STYLES, _LIGHT)
    ]


def make_table(path: Path, n: int, *, prefix: str = "p", distinct: int | None = None) -> Path:
    """``n`` rows with unique ids. Prompts are unique (text + row number) unless ``distinct`` is given: then
    the texts cycle through ``distinct`` prompts, so that the gateway can serve repeated renders from its cache
    (ids stay unique, so the engine still makes ``n`` separate images)."""
    texts = prompt_texts()
    if distinct is None:
        prompts = [f"{texts[i % len(texts)]} #{i}" for i in range(n)]
    else:
        prompts = [texts[i % distinct] for i in range(n)]
    ids = [f"{prefix}{i:07d}" for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), path, row_group_size=64 * 1024)
    return path

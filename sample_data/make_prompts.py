"""Build sample_data/prompts.parquet: 60 varied prompts with ids and a few per-row overrides.

Run: python sample_data/make_prompts.py  (deterministic: the same file every time)
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUBJECTS = [
    "a red fox curled up in fresh snow",
    "a lighthouse on a basalt cliff during a storm",
    "a bowl of ramen with a soft-boiled egg",
    "an astronaut tending a greenhouse on Mars",
    "a vintage bicycle leaning against a yellow wall",
    "a koi pond under cherry blossoms",
    "a steam locomotive crossing a stone viaduct",
    "a hummingbird drinking from a trumpet flower",
    "a cozy reading nook with rain on the window",
    "a desert canyon at golden hour",
    "a robot barista pouring latte art",
    "a field of lavender with bee hives",
]
STYLES = [
    "photorealistic, 50mm lens",
    "watercolor illustration",
    "isometric 3D render",
    "oil painting in the style of the Dutch masters",
    "flat vector poster",
]

# A few rows override the request: a wide image, a higher quality, a pinned seed.
OVERRIDES = {
    3: {"size": "1536x1024"},
    7: {"size": "1024x1536"},
    11: {"quality": "medium"},
    19: {"seed": 42},
    23: {"size": "1536x1024", "quality": "medium"},
    37: {"seed": 7},
}


def build() -> pa.Table:
    rows = []
    for index, (subject, style) in enumerate(itertools.islice(itertools.product(SUBJECTS, STYLES), 60)):
        override = OVERRIDES.get(index, {})
        rows.append(
            {
                "id": f"sample-{index:03d}",
                "prompt": f"{subject}, {style}",
                "size": override.get("size"),
                "quality": override.get("quality"),
                "seed": override.get("seed"),
            }
        )
    schema = pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("size", pa.string()), ("quality", pa.string()),
         ("seed", pa.int64())]
    )
    return pa.Table.from_pylist(rows, schema=schema)


if __name__ == "__main__":
    target = Path(__file__).with_name("prompts.parquet")
    pq.write_table(build(), target, row_group_size=20)
    print(f"wrote {target} ({build().num_rows} prompts)")

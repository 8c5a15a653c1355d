"""The verify case: CPU per 1024x1024 image of the engine's full image verification (decode to the last pixel,
pixel ceiling, trailer checks, format check, sha256), as a ratio to the bare decode it is built on (Pillow's
``Image.open(...).load()``). Measured in this process: no gateway, no I/O."""

from __future__ import annotations

import functools
import io
import random
import statistics
import time
from typing import Any

SIDE = 1024
#: Images of each format verified per repetition, and repetitions (the median is reported).
PER_REPEAT = 12
REPEATS = 5


def _photo_like(fmt: str) -> bytes:
    """A 1024x1024 image with gradients and noise: compresses like a photo, not like a flat test pattern."""
    from PIL import Image, ImageFilter

    rng = random.Random(2026)
    noise = Image.frombytes("RGB", (SIDE // 4, SIDE // 4), rng.randbytes((SIDE // 4) ** 2 * 3))
    image = noise.resize((SIDE, SIDE), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buffer.getvalue()


def _cpu_ms_per_image(work: Any, data: bytes) -> float:
    runs = []
    for _ in range(REPEATS):
        started = time.process_time()
        for _ in range(PER_REPEAT):
            work(data)
        runs.append((time.process_time() - started) * 1000.0 / PER_REPEAT)
    return round(statistics.median(runs), 3)


def _bare_decode(data: bytes) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()


def case_verify(ctx: Any) -> dict[str, Any]:
    from imagegen_provider.wire.imageinfo import inspect_image

    formats: dict[str, dict[str, Any]] = {}
    for fmt in ("PNG", "JPEG", "WEBP"):
        data = _photo_like(fmt)
        asked = fmt.lower()
        inspect_image(data, expected_format=asked)  # the image itself must pass
        decode = _cpu_ms_per_image(_bare_decode, data)
        verify = _cpu_ms_per_image(functools.partial(inspect_image, expected_format=asked), data)
        formats[fmt.lower()] = {"bytes": len(data), "decode_ms": decode, "verify_ms": verify,
                                "ratio": round(verify / decode, 3) if decode else None}
        ctx.log(f"  [verify] {fmt}: decode {decode} ms, full verification {verify} ms per {SIDE}² image")
    return {
        "description": f"CPU per {SIDE}x{SIDE} image (gradients + noise) of the engine's full verification "
                       "(`wire.imageinfo.inspect_image`: pixel ceiling, decode to the last pixel, trailer and format "
                       "checks, sha256) against the bare decode it builds on (`Image.open(...).load()`), "
                       f"median of {REPEATS} × {PER_REPEAT} images, in the benchmark process.",
        "formats": formats,
    }


def markdown(case: dict[str, Any]) -> list[str]:
    rows = [f"| {fmt} | {r['bytes']:,} | {r['decode_ms']} | {r['verify_ms']} | {r['ratio']}× |"
            for fmt, r in case["formats"].items()]
    return ["| format | bytes | bare decode, CPU ms | full verification, CPU ms | ratio |",
            "|---|---|---|---|---|", *rows]

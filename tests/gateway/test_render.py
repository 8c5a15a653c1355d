"""The gateway's images are real, deterministic, and cheap to make again."""

from __future__ import annotations

import io
from dataclasses import replace
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageFont

from imagegen_gateway.render import Renderer, RenderSpec, caption_lines, render, seed_from_prompt

BASE = RenderSpec(prompt="a red fox in snow", seed=42, model="dall-e-3", width=64, height=48)


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_real_image_of_requested_size_and_format(fmt: str, pil_format: str) -> None:
    image = _open(render(replace(BASE, output_format=fmt, width=320, height=200)))
    assert image.format == pil_format
    assert image.size == (320, 200)


def test_same_spec_same_bytes() -> None:
    assert render(BASE) == render(replace(BASE))


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 43},
        {"prompt": "a blue fox in snow"},
        {"model": "gpt-image-1"},
        {"quality": "hd"},
        {"style": "natural"},
        {"negative_prompt": "blur"},
        {"index": 1},
    ],
)
def test_any_picture_parameter_changes_the_image(change: dict[str, Any]) -> None:
    assert render(replace(BASE, **change)) != render(BASE)


def test_pattern_is_not_flat() -> None:
    image = _open(render(replace(BASE, width=256, height=256))).convert("RGB")
    assert len(set(image.getdata())) > 50


def test_transparent_background_has_an_alpha_channel() -> None:
    image = _open(render(replace(BASE, background="transparent")))
    assert image.mode == "RGBA"
    alphas = {pixel[3] for pixel in image.getdata()}  # type: ignore[attr-defined]
    assert alphas == {0, 255}
    # JPEG cannot carry alpha: the request is served opaque rather than failing.
    assert _open(render(replace(BASE, background="transparent", output_format="jpeg"))).mode == "RGB"


def test_jpeg_compression_changes_size() -> None:
    big = replace(BASE, width=512, height=512, output_format="jpeg")
    assert len(render(replace(big, compression=10))) < len(render(replace(big, compression=95)))


def test_seed_from_prompt_is_stable_and_31_bit() -> None:
    seed = seed_from_prompt("hello")
    assert seed == seed_from_prompt("hello")
    assert seed != seed_from_prompt("hello!")
    assert 0 <= seed < 2**31


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError):
        render(replace(BASE, output_format="gif"))


def test_renderer_caches_and_evicts() -> None:
    renderer = Renderer(cache_size=2)
    first = renderer(BASE)
    assert renderer(BASE) is first
    assert renderer.cached(BASE) is first
    assert (renderer.hits, renderer.misses) == (2, 1)
    renderer(replace(BASE, seed=1))
    renderer(replace(BASE, seed=2))
    assert renderer.cached(BASE) is None  # least recently used went first


def test_renderer_without_cache() -> None:
    renderer = Renderer(cache_size=0)
    assert renderer(BASE) == renderer(BASE)
    assert renderer.cached(BASE) is None


def test_large_images_render_quickly() -> None:
    import time

    start = time.perf_counter()
    data = render(replace(BASE, width=1024, height=1024))
    assert time.perf_counter() - start < 1.0
    assert _open(data).size == (1024, 1024)


def test_photo_detail_has_the_size_of_real_model_output_and_stays_deterministic() -> None:
    spec = RenderSpec(prompt="a lighthouse", seed=7, model="gpt-image-1", width=1024, height=1024)
    photo = render(spec, "photo")
    assert 1_000_000 < len(photo) < 4_000_000  # real gpt-image-1 1024x1024 PNGs are 1-3 MB
    assert len(render(spec)) < 100_000  # flat stays small for fast tests
    assert render(spec, "photo") == photo
    other_seed = RenderSpec(prompt="a lighthouse", seed=8, model="gpt-image-1", width=1024, height=1024)
    assert render(other_seed, "photo") != photo
    with Image.open(io.BytesIO(photo)) as image:
        assert image.format == "PNG" and image.size == (1024, 1024)


def _ink(image: Image.Image, x: int, y: int) -> bool:
    pixel = image.getpixel((x, y))
    assert isinstance(pixel, tuple)
    return pixel[:3] == (255, 255, 255)


@pytest.mark.parametrize(("size", "scale"), [(1024, 5), (512, 2), (256, 1)])
def test_prompt_and_seed_are_written_legibly(size: int, scale: int) -> None:
    """Sampling the caption box once per font pixel gives back exactly the font's rendering of the prompt and
    the seed: the text is there, whole, and drawn at ``scale`` image pixels per font pixel."""
    spec = replace(BASE, width=size, height=size)
    image = _open(render(spec)).convert("RGB")
    expected_lines = ["a red fox in snow", "seed 42"]
    assert caption_lines(spec, 30) == expected_lines
    font = ImageFont.load_default_imagefont()
    width, height = max(map(len, expected_lines)) * 6 + 4, len(expected_lines) * 11 + 4
    expected = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(expected)
    for row, line in enumerate(expected_lines):
        draw.text((2, 2 + row * 11), line, fill=255, font=font)
    origin = size // 20
    drawn = [
        [_ink(image, origin + x * scale + scale // 2, origin + y * scale + scale // 2) for x in range(width)]
        for y in range(height)
    ]
    wanted = [[expected.getpixel((x, y)) == 255 for x in range(width)] for y in range(height)]
    assert drawn == wanted and sum(map(sum, wanted)) > 100


def test_caption_wraps_and_cuts_long_prompts_and_survives_any_script() -> None:
    spec = replace(BASE, prompt="word " * 200, seed=7)
    lines = caption_lines(spec, 20)
    assert len(lines) == 9 and lines[-1] == "seed 7" and lines[-2].endswith("...")
    assert all(len(line) <= 20 for line in lines)
    assert caption_lines(replace(BASE, prompt="東京 at night"), 30)[0] == "?? at night"
    assert _open(render(replace(BASE, prompt="東京 🎉", width=512, height=512))).size == (512, 512)


@pytest.mark.parametrize("size", [(1024, 1024), (1536, 1024), (40, 30), (16, 16)])
def test_caption_never_covers_the_transparent_frame(size: tuple[int, int]) -> None:
    spec = replace(BASE, prompt="w" * 500, background="transparent", width=size[0], height=size[1])
    image = _open(render(spec))
    alpha = image.getchannel("A")
    width, height = image.size
    frame = max(1, width // 32)
    assert {alpha.getpixel((width - 1 - dx, y)) for dx in range(frame) for y in range(height)} == {0}
    assert {alpha.getpixel((x, height - 1)) for x in range(width)} == {0}

"""Issue 13: the contact sheet: a grid of thumbnails captioned with prompt id, image index and seed, failed
images as marked tiles, pages for large runs, images read one at a time."""

from __future__ import annotations

import pytest
from PIL import Image

from imagegen_provider.engine import contact_sheet as sheet_module
from imagegen_provider.engine import finalize_output
from imagegen_provider.engine.contact_sheet import SheetLayout, write_contact_sheet

from ._support import current, numbered, run_batch, write_prompts

_RED = (200, 30, 30)


@pytest.fixture
async def output(tmp_path, gateway):
    """Eleven images, the fourth refused by the gateway's content policy."""
    ids, texts = numbered(11)
    texts[3] = "a forbidden-content lighthouse"
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    out = tmp_path / "out"
    summary = await run_batch(gateway, prompts=prompts, output=str(out), base_seed=5)
    assert (summary.succeeded, summary.failed) == (10, 1)
    return prompts, out


def _tile_pixels(page: Image.Image, layout: SheetLayout, slot: int) -> list[tuple[int, int, int]]:
    x, y = layout.origin(slot)
    return list(page.crop((x, y, x + layout.tile, y + layout.tile)).convert("RGB").getdata())


def _red_share(pixels: list[tuple[int, int, int]]) -> float:
    return sum(1 for p in pixels if p == _RED) / len(pixels)


async def test_finalize_writes_one_sheet_with_a_marked_tile_for_the_failed_image(output):
    prompts, out = output
    report = finalize_output(str(out), prompts=prompts)
    assert report.contact_sheets == [f"file://{out}/contact_sheet.png"]
    layout = SheetLayout()
    with Image.open(out / "contact_sheet.png") as page:
        # 11 tiles, 8 a row: two rows.
        assert page.size == layout.page_size(11) == (8 * 200 + 8, 2 * (192 + 34 + 8) + 8)
        failed_slot = 3  # tiles in (prompt id, image index) order; p003 is the refused one
        assert _red_share(_tile_pixels(page, layout, failed_slot)) > 0.03  # the red frame and cross
        for slot in (0, 1, 2, 4, 10):
            assert _red_share(_tile_pixels(page, layout, slot)) < 0.01
            # A real thumbnail, not the background.
            assert len(set(_tile_pixels(page, layout, slot))) > 50
    rows = current(out)
    assert int(rows.loc[("p003", 0), "seed"]) >= 0  # what the caption shows


async def test_large_runs_are_paged_and_stale_pages_removed(output):
    _prompts, out = output
    write_contact_sheet(str(out))
    assert (out / "contact_sheet.png").is_file()
    layout = SheetLayout(columns=4, rows=1, tile=96)
    pages = write_contact_sheet(str(out), layout=layout)
    assert [p.rsplit("/", 1)[1] for p in pages] == [f"contact_sheet-{n:03d}.png" for n in range(1, 4)]
    assert not (out / "contact_sheet.png").exists()
    with Image.open(out / "contact_sheet-003.png") as last:
        assert last.size == layout.page_size(3)
    capped = write_contact_sheet(str(out), layout=layout, max_pages=2)
    assert len(capped) == 2 and not (out / "contact_sheet-003.png").exists()


async def test_images_are_read_one_at_a_time(output, monkeypatch):
    _prompts, out = output
    opened: list[Image.Image] = []
    real_open = Image.open

    def spy(*args, **kwargs):
        assert all(image.fp is None for image in opened), "an earlier image is still open"
        image = real_open(*args, **kwargs)
        opened.append(image)
        return image

    monkeypatch.setattr(sheet_module.Image, "open", spy)
    write_contact_sheet(str(out))
    assert len(opened) == 10


async def test_a_missing_file_is_a_marked_tile_and_the_sheet_can_be_disabled(output):
    prompts, out = output
    (out / current(out).loc[("p000", 0), "file_name"]).unlink()
    report = finalize_output(str(out), prompts=prompts, contact_sheet=False)
    assert report.contact_sheets == [] and not (out / "contact_sheet.png").exists()
    write_contact_sheet(str(out))  # from metadata_current.parquet: p000 is now ImageFileMissing
    with Image.open(out / "contact_sheet.png") as page:
        assert _red_share(_tile_pixels(page, SheetLayout(), 0)) > 0.03


def test_an_output_with_nothing_on_record_has_no_sheet(tmp_path):
    assert write_contact_sheet(str(tmp_path / "empty")) == []

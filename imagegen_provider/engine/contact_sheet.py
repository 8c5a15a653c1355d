"""A contact sheet of an output: every image's thumbnail in a grid, captioned with prompt id, image index and
seed; failed images (and files that cannot be read) as marked tiles.

``<output>/contact_sheet.png``, or pages ``contact_sheet-001.png``, ``contact_sheet-002.png``… when the images
do not fit one page. Memory stays bounded by one page and one image: images are read one at a time and
thumbnailed at once (JPEGs are decoded at reduced scale).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from imagegen_provider.engine.metadata import current_rows, read_metadata
from imagegen_provider.engine.schema import STATUS_SUCCEEDED
from imagegen_provider.engine.storage import StorageLocation

log = logging.getLogger(__name__)

SHEET_NAME = "contact_sheet"
_CURRENT_TABLE = "metadata_current.parquet"
_BACKGROUND = (250, 250, 250)
_FAILED = (253, 226, 226)
_MARK = (200, 30, 30)
_TEXT = (30, 30, 30)


@dataclass(frozen=True)
class SheetLayout:
    """Grid geometry: ``columns`` x ``rows`` tiles a page, thumbnails fit in ``tile`` x ``tile`` pixels."""

    columns: int = 8
    rows: int = 8
    tile: int = 192
    caption: int = 34
    gap: int = 8

    @property
    def per_page(self) -> int:
        return self.columns * self.rows

    def page_size(self, tiles: int) -> tuple[int, int]:
        """Pixels of a page holding ``tiles`` tiles (the last page is only as tall as its rows)."""
        used_rows = -(-tiles // self.columns)
        width = self.columns * (self.tile + self.gap) + self.gap
        return width, used_rows * (self.tile + self.caption + self.gap) + self.gap

    def origin(self, slot: int) -> tuple[int, int]:
        row, column = divmod(slot, self.columns)
        return self.gap + column * (self.tile + self.gap), self.gap + row * (self.tile + self.caption + self.gap)


@dataclass(frozen=True)
class _Entry:
    prompt_id: str
    image_index: int
    seed: int | None
    file_name: str | None
    error_type: str | None


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _entries(rows: pd.DataFrame) -> Iterator[_Entry]:
    rows = rows.sort_values(["prompt_id", "image_index"])
    columns = ("prompt_id", "image_index", "seed", "file_name", "status", "error_type")
    for pid, index, seed, file_name, status, error_type in zip(*(rows[c] for c in columns), strict=True):
        ok = status == STATUS_SUCCEEDED and isinstance(file_name, str)
        yield _Entry(
            prompt_id=str(pid),
            image_index=int(index),
            seed=int(seed) if pd.notna(seed) else None,
            file_name=file_name if ok else None,
            error_type=None if ok else str(error_type or "failed"),
        )


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _thumbnail(location: StorageLocation, file_name: str, size: int) -> Image.Image | None:
    try:
        with location.open(file_name) as handle, Image.open(handle) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at reduced scale
            image.thumbnail((size, size))
            return image.convert("RGB")
    except Exception as exc:  # a missing or unreadable file is a marked tile, not a failed sheet
        log.warning("Contact sheet: cannot read %s: %s", file_name, exc)
        return None


def _marked_tile(draw: ImageDraw.ImageDraw, x: int, y: int, layout: SheetLayout, title: str, detail: str) -> None:
    edge = layout.tile - 1
    draw.rectangle((x, y, x + edge, y + edge), fill=_FAILED, outline=_MARK, width=3)
    draw.line((x + 12, y + 12, x + edge - 12, y + edge - 12), fill=_MARK, width=4)
    draw.line((x + 12, y + edge - 12, x + edge - 12, y + 12), fill=_MARK, width=4)
    middle = x + layout.tile / 2
    draw.rectangle((x + 6, y + layout.tile / 2 - 22, x + edge - 6, y + layout.tile / 2 + 20), fill=(255, 255, 255))
    title_font, detail_font = _font(16), _font(12)
    draw.text((middle, y + layout.tile / 2 - 10), title, fill=_MARK, font=title_font, anchor="mm")
    detail = _fit(draw, detail, layout.tile - 16, detail_font)
    draw.text((middle, y + layout.tile / 2 + 9), detail, fill=_MARK, font=detail_font, anchor="mm")


def _draw_tile(page: Image.Image, slot: int, entry: _Entry, location: StorageLocation, layout: SheetLayout) -> None:
    draw = ImageDraw.Draw(page)
    x, y = layout.origin(slot)
    thumb = _thumbnail(location, entry.file_name, layout.tile) if entry.file_name else None
    if thumb is not None:
        page.paste(thumb, (x + (layout.tile - thumb.width) // 2, y + (layout.tile - thumb.height) // 2))
        thumb.close()
    else:
        title = "FAILED" if entry.error_type else "UNREADABLE"
        _marked_tile(draw, x, y, layout, title, entry.error_type or entry.file_name or "")
    font = _font(13)
    seed = "?" if entry.seed is None else str(entry.seed)
    draw.text((x, y + layout.tile + 3), _fit(draw, entry.prompt_id, layout.tile, font), fill=_TEXT, font=font)
    draw.text((x, y + layout.tile + 18), _fit(draw, f"#{entry.image_index}  seed {seed}", layout.tile, font),
              fill=_TEXT, font=font)


def _page_names(pages: int) -> list[str]:
    if pages == 1:
        return [f"{SHEET_NAME}.png"]
    return [f"{SHEET_NAME}-{number:03d}.png" for number in range(1, pages + 1)]


def _save(location: StorageLocation, name: str, page: Image.Image) -> str:
    with location.open_atomic(name) as handle:
        page.save(handle, format="PNG", optimize=False)
    return location.uri_of(name)


def _remove_stale(location: StorageLocation, keep: list[str]) -> None:
    """Pages of an earlier, larger sheet."""
    stale = [
        name for name in location.list_files("", suffix=".png")
        if "/" not in name and posixpath.basename(name).startswith(SHEET_NAME) and name not in keep
    ]
    if stale:
        location.remove(stale)


def _current(location: StorageLocation) -> pd.DataFrame:
    if location.exists(_CURRENT_TABLE):
        with location.open(_CURRENT_TABLE) as handle:
            return pd.read_parquet(handle)
    return current_rows(read_metadata(location))


def write_contact_sheet(
    output: Any,
    *,
    rows: pd.DataFrame | None = None,
    layout: SheetLayout | None = None,
    max_pages: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write the contact sheet of ``output``; returns the URIs of its pages (none when nothing is on record).

    :param rows: the current metadata rows to show (default: ``metadata_current.parquet`` when finalize wrote
        one, else the metadata on record).
    :param layout: grid geometry (default 8 x 8 tiles of 192 px a page).
    :param max_pages: stop after this many pages (the log says how many images were left out).
    """
    location = StorageLocation.from_url(output, storage_options)
    layout = layout or SheetLayout()
    frame = _current(location) if rows is None else rows
    total = len(frame)
    pages = -(-total // layout.per_page)
    if max_pages is not None and pages > max_pages:
        log.warning("Contact sheet: first %d of %d pages (%d images)", max_pages, pages, total)
        pages = max_pages
    names = _page_names(pages)
    entries = _entries(frame)
    written = []
    for number, name in enumerate(names):
        count = min(layout.per_page, total - number * layout.per_page)
        with Image.new("RGB", layout.page_size(count), _BACKGROUND) as page:
            for slot in range(count):
                _draw_tile(page, slot, next(entries), location, layout)
            written.append(_save(location, name, page))
    _remove_stale(location, names)
    return written

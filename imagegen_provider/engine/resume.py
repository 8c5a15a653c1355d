"""What an output already holds: images stored and recorded as succeeded are never requested again.

"Stored" means the file named by the image's metadata row exists with the recorded size (one listing of
``images/``, not one request per file) and, when verifying, the recorded sha256 (read in bounded chunks). An
image whose file is missing or changed is generated again and reported by finalize.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from imagegen_provider.engine.metadata import current_rows, read_metadata
from imagegen_provider.engine.schema import STATUS_SUCCEEDED
from imagegen_provider.engine.storage import StorageLocation

IMAGES_DIR = "images"
_COLUMNS = ["prompt_id", "image_index", "status", "file_name", "finished_at", "image_bytes", "image_sha256"]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DamagedImage:
    """A succeeded image whose file is not what its metadata row recorded."""

    prompt_id: str
    image_index: int
    file_name: str
    #: ``missing``, or ``size N, recorded M``, or ``sha256 differs``.
    problem: str


def stored_sizes(location: StorageLocation, folder: str = IMAGES_DIR) -> dict[str, int | None]:
    """Every file under ``folder`` and its size, from one recursive listing (``find`` with details: one
    paginated LIST on object stores, one walk locally)."""
    base = location.path(folder)
    try:
        found = location.fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    prefix = location.root.rstrip("/") + "/"
    sizes: dict[str, int | None] = {}
    for path, info in found.items():
        size = info.get("size", info.get("Size"))
        sizes[path[len(prefix):] if path.startswith(prefix) else path] = int(size) if size is not None else None
    return sizes


def file_sha256(location: StorageLocation, file_name: str) -> str:
    """sha256 of a stored file, read in 1 MiB chunks (memory stays bounded whatever the image size)."""
    digest = hashlib.sha256()
    with location.open(file_name) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _problem(
    location: StorageLocation,
    stored: dict[str, int | None],
    file_name: Any,
    recorded_bytes: Any,
    recorded_sha256: Any,
    *,
    verify: bool,
) -> str | None:
    if not isinstance(file_name, str) or file_name not in stored:
        return "missing"
    size = stored[file_name]
    recorded = None if recorded_bytes is None or pd.isna(recorded_bytes) else int(recorded_bytes)
    if recorded is not None and size is not None and size != recorded:
        return f"size {size}, recorded {recorded}"
    if verify and isinstance(recorded_sha256, str) and file_sha256(location, file_name) != recorded_sha256:
        return "sha256 differs"
    return None


def check_stored(
    location: StorageLocation, succeeded: pd.DataFrame, *, verify: bool = False
) -> list[DamagedImage]:
    """The succeeded images (rows of the metadata table) whose file is missing or changed.

    :param verify: also compare every file's sha256 with the recorded one (reads every image).
    """
    if succeeded.empty:
        return []
    stored = stored_sizes(location)
    damaged = []
    columns = ("prompt_id", "image_index", "file_name", "image_bytes", "image_sha256")
    for prompt_id, index, file_name, size, sha in zip(*(succeeded[c] for c in columns), strict=True):
        problem = _problem(location, stored, file_name, size, sha, verify=verify)
        if problem is not None:
            damaged.append(DamagedImage(str(prompt_id), int(index), str(file_name), problem))
    return damaged


def damaged_keys(damaged: Iterable[DamagedImage]) -> set[tuple[str, int]]:
    return {(d.prompt_id, d.image_index) for d in damaged}


@dataclass
class ResumeState:
    #: (prompt_id, image_index) of images recorded as succeeded whose file is still there, unchanged.
    done: set[tuple[str, int]] = field(default_factory=set)
    #: Images recorded as failed last time (they are retried).
    failed: int = 0
    #: Succeeded rows whose file has gone missing (they are generated again).
    missing_files: int = 0
    #: Succeeded rows whose file has another size (or, verifying, another sha256): generated again.
    changed_files: int = 0

    @classmethod
    def load(cls, output: StorageLocation, *, verify: bool = False) -> ResumeState:
        """:param verify: also check every stored image's sha256 (reads every image once)."""
        frame = current_rows(read_metadata(output, _COLUMNS))
        state = cls()
        if frame.empty:
            return state
        ok = frame["status"] == STATUS_SUCCEEDED
        state.failed = int((~ok).sum())
        succeeded = frame[ok]
        damaged = check_stored(output, succeeded, verify=verify)
        state.missing_files = sum(1 for d in damaged if d.problem == "missing")
        state.changed_files = len(damaged) - state.missing_files
        bad = damaged_keys(damaged)
        keys = zip(succeeded["prompt_id"], succeeded["image_index"].astype(int), strict=True)
        state.done = {key for key in keys if key not in bad}
        return state

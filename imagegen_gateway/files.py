"""OpenAI's Files API as far as the Batch API needs it: ``POST /v1/files`` (multipart upload with a purpose),
``GET /v1/files/{id}`` and ``GET /v1/files/{id}/content``.

Files live on disk in a private temporary directory, never in memory: a batch input file may be 200 MB and an
output file carries a base64 image per line. Uploads are copied from Starlette's spooled upload in a worker
thread; contents are served with :class:`~starlette.responses.FileResponse`, which streams in chunks.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio.to_thread
from starlette.datastructures import UploadFile

#: Purposes OpenAI accepts on ``POST /v1/files``; only ``batch`` and ``batch_output`` matter here.
PURPOSES = frozenset({"batch", "batch_output", "assistants", "fine-tune", "vision", "user_data", "evals"})
_COPY_CHUNK = 1024 * 1024


@dataclass
class StoredUpload:
    """One file of the Files API."""

    id: str
    filename: str
    purpose: str
    size: int
    created_at: int
    path: Path

    def as_object(self) -> dict[str, Any]:
        """The OpenAI ``file`` object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.size,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


class FileTooLarge(Exception):
    """An upload above the configured limit."""


class UploadStore:
    """Files of the Files API in a temporary directory, removed when the store is collected or at exit."""

    def __init__(self) -> None:
        self._files: dict[str, StoredUpload] = {}
        self._directory: Path | None = None

    def _dir(self) -> Path:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="imagegen-gateway-files-"))
            weakref.finalize(self, shutil.rmtree, self._directory, ignore_errors=True)
        return self._directory

    def _new(self, filename: str, purpose: str) -> StoredUpload:
        file_id = f"file-{secrets.token_hex(12)}"
        return StoredUpload(file_id, filename, purpose, 0, int(time.time()), self._dir() / file_id)

    async def save_upload(self, upload: UploadFile, *, purpose: str, max_bytes: int) -> StoredUpload:
        """Copy an uploaded file to the store.

        :raises FileTooLarge: the upload is larger than ``max_bytes`` (nothing is kept).
        """
        stored = self._new(upload.filename or "upload.jsonl", purpose)
        size = await anyio.to_thread.run_sync(_copy_capped, upload.file, stored.path, max_bytes)
        if size is None:
            stored.path.unlink(missing_ok=True)
            raise FileTooLarge(f"The file is larger than {max_bytes} bytes.")
        stored.size = size
        self._files[stored.id] = stored
        return stored

    def open_output(self, filename: str, purpose: str = "batch_output") -> tuple[StoredUpload, IO[bytes]]:
        """A new file the gateway writes itself (a batch's output or error file), with its open handle. The
        file is listed once :meth:`publish` is called."""
        stored = self._new(filename, purpose)
        return stored, stored.path.open("wb")

    def publish(self, stored: StoredUpload) -> None:
        stored.size = stored.path.stat().st_size
        self._files[stored.id] = stored

    def get(self, file_id: str) -> StoredUpload | None:
        return self._files.get(file_id)

    def __len__(self) -> int:
        return len(self._files)


def _copy_capped(source: IO[bytes], target: Path, max_bytes: int) -> int | None:
    """Copy ``source`` to ``target`` in chunks; ``None`` (and a partial target) when it exceeds ``max_bytes``."""
    source.seek(0)
    size = 0
    with target.open("wb") as out:
        while chunk := source.read(_COPY_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                return None
            out.write(chunk)
    return size

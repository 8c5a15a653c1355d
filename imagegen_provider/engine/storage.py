"""A folder on any fsspec filesystem (local, file://, s3://, gs://, memory://)."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec import AbstractFileSystem


def _is_local(fs: AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in ("file", "local") for p in protocols)


@dataclass
class StorageLocation:
    """A root folder and the filesystem it lives on.

    :param fs: the fsspec filesystem.
    :param root: the folder, in the filesystem's own path form (no protocol).
    """

    fs: AbstractFileSystem
    root: str
    _made_dirs: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def from_url(cls, url: Any, storage_options: Mapping[str, Any] | None = None) -> StorageLocation:
        """From a URL string, or from any object with ``.fs`` and ``.path`` (Airflow's ``ObjectStoragePath``,
        whose filesystem already carries the credentials of its connection)."""
        if isinstance(url, StorageLocation):
            return url
        if not isinstance(url, str) and hasattr(url, "fs") and hasattr(url, "path"):
            return cls(fs=url.fs, root=str(url.path).rstrip("/") or "/")
        fs, root = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
        return cls(fs=fs, root=root.rstrip("/") or "/")

    @property
    def uri(self) -> str:
        return self.fs.unstrip_protocol(self.root)

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def uri_of(self, relative: str) -> str:
        return self.fs.unstrip_protocol(self.path(relative))

    def child(self, relative: str) -> StorageLocation:
        return StorageLocation(fs=self.fs, root=self.path(relative))

    def _ensure_parent(self, path: str) -> None:
        # Object stores have no folders; only local filesystems need them made before writing.
        if not _is_local(self.fs):
            return
        parent = posixpath.dirname(path)
        if parent not in self._made_dirs:
            self.fs.makedirs(parent, exist_ok=True)
            self._made_dirs.add(parent)

    def write_bytes(self, relative: str, data: bytes) -> str:
        """Write ``data`` (whole object, replacing any previous one) and return its full path."""
        path = self.path(relative)
        self._ensure_parent(path)
        self.fs.pipe_file(path, data)
        return path

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def open(self, relative: str, mode: str = "rb"):  # noqa: ANN201 - fsspec file object
        path = self.path(relative)
        if "w" in mode:
            self._ensure_parent(path)
        return self.fs.open(path, mode)

    def list_files(self, relative: str, suffix: str = "") -> list[str]:
        """Files under ``relative`` (recursive), as paths relative to the root, sorted."""
        base = self.path(relative)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found if p.endswith(suffix))

    def remove(self, relatives: list[str]) -> None:
        if relatives:
            self.fs.rm([self.path(r) for r in relatives])

"""The three kinds of output every storage test runs against: a local folder, S3 (moto) and Azure Blob
(Azurite), each a fresh folder with the storage options that reach it."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pytest


@dataclass(frozen=True)
class Store:
    """A fresh output folder.

    :param kind: ``local``, ``s3`` or ``az``.
    :param url: the folder as the user writes it (``/tmp/…``, ``s3://bucket/…``, ``az://container/…``).
    :param storage_options: what fsspec needs to reach it (empty for a local folder).
    """

    kind: str
    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs

    def path(self, relative: str) -> str:
        """``relative`` in the filesystem's own path form."""
        _, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return f"{root.rstrip('/')}/{relative}"

    def sub(self, name: str) -> Store:
        return Store(kind=self.kind, url=f"{self.url.rstrip('/')}/{name}", storage_options=self.storage_options)


KINDS = ("local", "s3", "az")


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> Store:
    token = uuid.uuid4().hex[:10]
    if kind == "local":
        return Store(kind="local", url=str(tmp_path / f"out-{token}"))
    if kind == "s3":
        s3 = request.getfixturevalue("s3_server")
        return Store(kind="s3", url=f"s3://{s3['bucket']}/out-{token}", storage_options=s3["storage_options"])
    azurite = request.getfixturevalue("azurite")
    return Store(kind="az", url=f"az://{azurite['container']}/out-{token}", storage_options=azurite["storage_options"])


def azurite_requests(debug_log: Any) -> int:
    """Requests Azurite has served so far, from its debug log (one context line per request)."""
    with open(debug_log, "rb") as handle:
        return sum(1 for line in handle if b"BlobStorageContextMiddleware: RequestMethod=" in line)

"""A folder on any fsspec filesystem (local, file://, s3://, gs://, az://, memory://)."""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import posixpath
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from imagegen_provider.engine.azure_blob import BlobUploads, blob_uploads_for

#: Suffix of the temporary files of atomic writes; a process killed mid-write can leave one behind.
TEMP_SUFFIX = ".tmp"


def is_temp_file(path: str) -> bool:
    """A leftover of an interrupted atomic write (``.<name>.<token>.tmp``)."""
    return posixpath.basename(path).startswith(".") and path.endswith(TEMP_SUFFIX)


_MADE_DIRS_KEPT = 1024


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    """The filesystem's protocol names (fsspec gives one name or several)."""
    return tuple(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)


def _is_local(fs: AbstractFileSystem) -> bool:
    return any(p in ("file", "local") for p in _protocols(fs))


_RM_TAKES_EXPAND_PATH: dict[type, bool] = {}


def _rm_takes_expand_path(fs_class: type) -> bool:
    if fs_class not in _RM_TAKES_EXPAND_PATH:
        rm = getattr(fs_class, "_rm", None)
        try:
            takes = rm is not None and "expand_path" in inspect.signature(rm).parameters
        except (TypeError, ValueError):
            takes = False
        _RM_TAKES_EXPAND_PATH[fs_class] = takes
    return _RM_TAKES_EXPAND_PATH[fs_class]


def _exact_paths(fs: AbstractFileSystem) -> dict[str, Any]:
    """``rm`` arguments for a list of exact file paths: adlfs otherwise asks the store about each path (one
    request per file) before deleting it, doubling the cost of every journal cleanup."""
    return {"expand_path": False} if _rm_takes_expand_path(type(fs)) else {}


#: The schemes aiohttp takes a proxy from the environment for (``aiohttp.helpers.proxies_from_env``).
_PROXIED_SCHEMES = frozenset({"http", "https", "ws", "wss"})


def _environment_configures_http() -> bool:
    """Whether aiohttp's ``trust_env`` can find anything here: a proxy (``getproxies`` for the schemes aiohttp
    proxies; ``NO_PROXY`` alone names no proxy) or a netrc file (``$NETRC``, else ``~/.netrc`` or ``~/_netrc``)."""
    if any(scheme in _PROXIED_SCHEMES for scheme in urllib.request.getproxies()):
        return True
    if os.environ.get("NETRC"):
        return True
    try:
        home = Path.home()
    except RuntimeError:
        return False
    return (home / ".netrc").exists() or (home / "_netrc").exists()


def _skip_empty_env_lookups(fs: AbstractFileSystem, configures_http: bool) -> None:
    """adlfs only: stop the Azure SDK's aiohttp session from looking the environment up on every request when
    the environment holds nothing to find.

    The SDK opens its session with ``trust_env`` (its ``use_env_settings``, on by default, which adlfs gives no
    way to set), and aiohttp then reads the netrc file and the proxy variables in a worker thread for *each*
    request: two thread hand-offs per upload, which cost about a third of the client's CPU per upload and half
    the upload rate on a 2-core machine (issue 14). With no proxy variable and no netrc file, those lookups can
    only come back empty, so turning them off changes nothing else. Only a transport whose session is not
    open yet is touched (a filesystem fsspec had cached and already used keeps its session as it is).
    """
    client = getattr(fs, "service_client", None)
    transport = getattr(getattr(client, "_config", None), "transport", None)
    if transport is None or not hasattr(transport, "_use_env_settings") or getattr(transport, "session", None):
        return
    if not configures_http:
        transport._use_env_settings = False


def _azure_uploads(fs: AbstractFileSystem) -> BlobUploads | None:
    """For adlfs: its SDK session without the lookups that can find nothing, and the Put Blob uploads its
    credential allows (both look the environment up the same way, once)."""
    if "abfs" not in _protocols(fs):
        return None
    configures_http = _environment_configures_http()
    _skip_empty_env_lookups(fs, configures_http)
    return blob_uploads_for(fs, trust_env=configures_http)


def _is_async(fs: AbstractFileSystem) -> bool:
    """An fsspec filesystem with coroutine methods (s3fs, adlfs, gcsfs): its sync methods are wrappers that block
    the calling thread until its own event loop has run the coroutine."""
    return bool(getattr(fs, "async_impl", False)) and not _is_local(fs)


async def _on_loop_of(fs: AbstractFileSystem, coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Await ``coroutine`` on the loop ``fs`` was made for (fsspec's I/O thread, unless it was made asynchronous on
    ours), as its sync wrappers do, without holding a thread of ours while it runs."""
    loop = fs.loop
    if loop is asyncio.get_running_loop():
        return await coroutine
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))


@dataclass
class StorageLocation:
    """A root folder and the filesystem it lives on.

    :param fs: the fsspec filesystem.
    :param root: the folder, in the filesystem's own path form (no protocol).
    """

    fs: AbstractFileSystem
    root: str
    #: The scheme the user wrote (``az`` rather than adlfs's first name ``abfs``): URIs we hand back keep it,
    #: since users look their images up by the URL they gave. ``None``: the filesystem's own.
    protocol: str | None = None
    #: Folders known to exist, most recent last; bounded, since every prompt id has its own folder.
    _made_dirs: OrderedDict[str, None] = field(default_factory=OrderedDict, repr=False)
    #: Azure Blob with an account key or a SAS: uploads as plain Put Blob requests (see :mod:`.azure_blob`);
    #: shared with :meth:`child` locations, so that a run keeps one HTTP session.
    _blob_uploads: BlobUploads | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: Any, storage_options: Mapping[str, Any] | None = None) -> StorageLocation:
        """From a URL string, or from any object with ``.fs`` and ``.path`` (Airflow's ``ObjectStoragePath``,
        whose filesystem already carries the credentials of its connection)."""
        if isinstance(url, StorageLocation):
            return url
        if not isinstance(url, str) and hasattr(url, "fs") and hasattr(url, "path"):
            protocol = getattr(url, "protocol", None)
            fs, root = url.fs, str(url.path)
        else:
            fs, root = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
            protocol, _ = fsspec.core.split_protocol(str(url))
        return cls(fs=fs, root=root.rstrip("/") or "/", protocol=protocol or None, _blob_uploads=_azure_uploads(fs))

    def _as_written(self, path: str) -> str:
        uri = str(self.fs.unstrip_protocol(path))
        scheme, sep, rest = uri.partition("://")
        if sep and self.protocol and self.protocol != scheme and self.protocol in _protocols(self.fs):
            return f"{self.protocol}://{rest}"
        return uri

    @property
    def is_local(self) -> bool:
        """On a local filesystem (no per-request cost or latency)."""
        return _is_local(self.fs)

    @property
    def uri(self) -> str:
        return self._as_written(self.root)

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def uri_of(self, relative: str) -> str:
        return self._as_written(self.path(relative))

    def child(self, relative: str) -> StorageLocation:
        return StorageLocation(
            fs=self.fs, root=self.path(relative), protocol=self.protocol, _blob_uploads=self._blob_uploads
        )

    def _ensure_parent(self, path: str) -> None:
        # Object stores have no folders; only local filesystems need them made before writing.
        if not _is_local(self.fs):
            return
        parent = posixpath.dirname(path)
        if parent in self._made_dirs:
            self._made_dirs.move_to_end(parent)
            return
        self.fs.makedirs(parent, exist_ok=True)
        self._made_dirs[parent] = None
        if len(self._made_dirs) > _MADE_DIRS_KEPT:
            self._made_dirs.popitem(last=False)

    def write_bytes(self, relative: str, data: bytes, *, atomic: bool = False) -> str:
        """Write ``data`` (whole object, replacing any previous one) and return its full path.

        :param atomic: readers never see a partial file, even if the process is killed mid-write. Object
            stores are atomic per object already; on a local filesystem the data goes to a hidden temporary
            file in the same folder, renamed into place once complete.
        """
        if not atomic or not _is_local(self.fs):
            path = self.path(relative)
            self._ensure_parent(path)
            self.fs.pipe_file(path, data)
            return path
        with self.open_atomic(relative) as handle:
            handle.write(data)
        return self.path(relative)

    async def write_bytes_async(self, relative: str, data: bytes, *, atomic: bool = False) -> str:
        """:meth:`write_bytes` for a coroutine. On an asynchronous filesystem the upload is a coroutine on the
        filesystem's loop: no thread is held while it is on the wire, so every upload the caller has in flight
        is sent at once — through a thread each (``asyncio.to_thread``), at most the default pool's
        ``min(32, cores + 4)`` would be (6 on 2 cores), and each would pay two thread hand-offs. On Azure Blob
        with a key or a SAS, it is a Put Blob request on the caller's own loop (:mod:`.azure_blob`).

        :param atomic: as for :meth:`write_bytes` (object stores are atomic per object already).
        """
        if self._blob_uploads is not None:
            path = self.path(relative)
            await self._blob_uploads.put(path, data)
            # adlfs caches listings by folder: the next listing must show this blob.
            self.fs.invalidate_cache(posixpath.dirname(path))
            return path
        if not _is_async(self.fs):
            return await asyncio.to_thread(self.write_bytes, relative, data, atomic=atomic)
        path = self.path(relative)
        await _on_loop_of(self.fs, self.fs._pipe_file(path, data))
        return path

    async def aclose(self) -> None:
        """Release what :meth:`write_bytes_async` opened (the Put Blob session); later writes reopen it."""
        if self._blob_uploads is not None:
            await self._blob_uploads.aclose()

    @contextmanager
    def open_atomic(self, relative: str) -> Iterator[Any]:
        """A binary file to write ``relative`` whole: it appears under its name only once complete (a rename
        on local filesystems; object stores publish an object only when its upload completes)."""
        path = self.path(relative)
        self._ensure_parent(path)
        if not _is_local(self.fs):
            # One upload once the writer is done: a writer that fails half-way uploads nothing (an fsspec
            # file object would upload what it had on close, exception or not).
            buffer = io.BytesIO()
            yield buffer
            self.fs.pipe_file(path, buffer.getvalue())
            return
        directory, name = posixpath.split(path)
        temp = posixpath.join(directory, f".{name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
        try:
            with self.fs.open(temp, "wb") as handle:
                yield handle
            # os.replace, not fs.mv: mv moves a file *into* a folder that stands at its name, which would
            # report an image stored that is not where its row says.
            os.replace(temp, path)
        except BaseException:
            if self.fs.exists(temp):
                self.fs.rm(temp)
            raise

    def read_bytes(self, relative: str) -> bytes:
        return bytes(self.fs.cat_file(self.path(relative)))

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self.path(relative)))

    def open(self, relative: str, mode: str = "rb") -> Any:
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
        """Delete these files (exact paths, no globs or folders)."""
        if relatives:
            self.fs.rm([self.path(r) for r in relatives], **_exact_paths(self.fs))

"""Output and prompt stores reached through an Airflow connection.

``output_conn_id="aws_default"`` with ``output_path="s3://bucket/run"`` gives the engine the filesystem that
Airflow builds from that connection — the one ``ObjectStoragePath("s3://bucket/run", conn_id="aws_default")``
uses, made by the store's provider (``apache-airflow-providers-amazon`` for ``s3://``,
``apache-airflow-providers-microsoft-azure`` for ``abfs://`` and ``az://``, ``apache-airflow-providers-google``
for ``gs://``). Credentials stay in the connection: nothing here logs or returns them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.core import split_protocol

from imagegen_provider.engine.storage import StorageLocation

_PROVIDERS = {
    "s3": "apache-airflow-providers-amazon",
    "abfs": "apache-airflow-providers-microsoft-azure",
    "gs": "apache-airflow-providers-google",
    "gcs": "apache-airflow-providers-google",
}


def _protocol_names(scheme: str) -> list[str]:
    """``scheme`` and the other names of its fsspec filesystem (``az`` → ``abfs``, ``abfss``): Airflow's
    providers register their filesystem under some of them only."""
    names = [scheme]
    try:
        protocols = fsspec.get_filesystem_class(scheme).protocol
    except (ImportError, ValueError):
        return names
    names += [p for p in ((protocols,) if isinstance(protocols, str) else protocols) if p not in names]
    return names


def _airflow_fs(scheme: str, conn_id: str, storage_options: Mapping[str, Any] | None, role: str) -> Any:
    from airflow.sdk.io import get_fs

    for name in _protocol_names(scheme):
        try:
            return get_fs(name, conn_id, dict(storage_options) if storage_options else None)
        except ValueError as exc:
            if "No filesystem registered" not in str(exc):
                raise
    provider = next((_PROVIDERS[n] for n in _protocol_names(scheme) if n in _PROVIDERS), "its Airflow provider")
    raise ValueError(
        f"{role}_conn_id={conn_id!r}: Airflow has no filesystem for {scheme}:// that takes a connection "
        f"(install {provider})"
    )


def resolve_store(
    url: Any, *, conn_id: str | None, storage_options: Mapping[str, Any] | None, role: str
) -> tuple[Any, Mapping[str, Any] | None]:
    """What the engine takes for a store: ``(location, storage_options)``.

    :param url: the folder or table as the user gave it: a URL string, or an ``ObjectStoragePath`` (which
        carries its own connection).
    :param conn_id: an Airflow connection for the store (``output_conn_id``/``prompts_conn_id``); ``None``: the
        URL's filesystem with ``storage_options`` and fsspec's usual environment and configuration.
    :param storage_options: fsspec options; with a connection, passed to the provider's filesystem factory
        (on top of what the connection gives).
    :param role: ``output`` or ``prompts``, to name the parameter at fault in errors.
    """
    if conn_id is None:
        return url, storage_options
    if not isinstance(url, str) and hasattr(url, "fs"):
        raise ValueError(
            f"{role}_conn_id is set and {role}_path is an ObjectStoragePath, which has a connection of its own: "
            "give one or the other"
        )
    scheme, _ = split_protocol(str(url))
    if scheme in (None, "file", "local"):
        raise ValueError(f"{role}_conn_id={conn_id!r} is set but {role}_path is a local path, which takes none")
    fs = _airflow_fs(scheme, conn_id, storage_options, role)
    root = str(fs._strip_protocol(str(url))).rstrip("/") or "/"
    return StorageLocation(fs=fs, root=root, protocol=scheme), None

"""Loading a finished output as a Hugging Face ``datasets`` image dataset, wherever it lies.

``datasets.load_dataset("imagefolder", data_dir=<output>)`` works for a local folder only: it treats
``data_dir`` as a local path, and with remote ``data_files`` it joins ``metadata.parquet``'s ``file_name`` to the
*downloaded* copy's folder in its cache, where the images are not (and ``streaming=True`` decodes the images
without the ``storage_options``). :func:`load_image_dataset` reads the dataset table with ``datasets``' parquet
builder and the images through the output's own filesystem, so the same call works for a local folder,
``s3://``, ``gs://`` and ``az://``::

    from imagegen_provider.engine.hf import load_image_dataset

    ds = load_image_dataset("s3://bucket/run", {"profile": "data"})
    ds[0]["image"]        # a PIL image; every column of metadata.parquet beside it
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from imagegen_provider.engine.finalize import DATASET_TABLE
from imagegen_provider.engine.storage import StorageLocation

if TYPE_CHECKING:
    import datasets


def load_image_dataset(
    output: Any,
    storage_options: Mapping[str, Any] | None = None,
    *,
    batch_size: int = 64,
    **load_kwargs: Any,
) -> datasets.Dataset:
    """The finalized output as a ``datasets.Dataset``: one example per stored image, its ``image`` column a
    ``datasets.Image`` beside every column of ``metadata.parquet``.

    :param output: the output folder as given to the run (a local path or any fsspec URL).
    :param storage_options: what reaches the store, as for the run (``output_storage_options``).
    :param batch_size: images read per batch while the dataset is built.
    :param load_kwargs: passed to ``datasets.load_dataset`` (``cache_dir``, ``keep_in_memory``, ...).
    """
    import datasets

    location = StorageLocation.from_url(output, storage_options)
    table_uri = location.uri_of(DATASET_TABLE)
    table = datasets.load_dataset(
        "parquet",
        data_files={"train": table_uri},
        split="train",
        storage_options=dict(storage_options) if storage_options else None,
        **load_kwargs,
    )
    features = table.features.copy()
    features["image"] = datasets.Image()

    def attach(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        names = batch["file_name"]
        return {"image": [{"bytes": location.read_bytes(name), "path": name} for name in names]}

    # The fingerprint names the table's content (its URI and the stored images' hashes) rather than the
    # function, which closes over a filesystem that ``datasets`` would otherwise have to hash.
    digest = hashlib.sha256(table_uri.encode())
    for sha in table["image_sha256"]:
        digest.update(str(sha).encode())
    return table.map(
        attach, batched=True, batch_size=batch_size, features=features, new_fingerprint=digest.hexdigest()[:32]
    )

"""OpenLineage for the operators: the prompt table in; the images folder and the metadata table out; the
model, image counts and cost of the run as a run facet.

Used only when ``apache-airflow-providers-openlineage`` is installed: its listener calls the operators'
``get_openlineage_facets_on_start/complete``, which import this module (and OpenLineage) lazily.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import attr
from airflow.providers.common.compat.openlineage.facet import (
    Dataset,
    OutputDataset,
    OutputStatisticsOutputDatasetFacet,
)
from airflow.providers.openlineage.extractors import OperatorLineage
from openlineage.client.facet_v2 import RunFacet

from imagegen_provider import __version__

#: Where the facet's JSON schema would be published; OpenLineage requires a schema URL on custom facets.
_SCHEMA_URL = "https://pypi.org/project/airflow-provider-imagegen/#ImageGenerationRunFacet"


@attr.define
class ImageGenerationRunFacet(RunFacet):
    """What one generation task did: the model asked for, how many images, what they cost.

    :param model: the requested model (rows may override it).
    :param images_total: images the task is responsible for (its shard, or the whole table).
    :param images_succeeded: images generated and stored by this run.
    :param images_failed: images that failed in this run.
    :param images_skipped: images already stored by an earlier run (resumed, not paid again).
    :param cost_usd: what this run paid (simulated when ``simulated``).
    :param simulated: the bundled local gateway served the run: placeholder images, no real spend.
    :param dry_run: only counted and estimated, nothing was sent.
    """

    model: str | None = None
    images_total: int | None = None
    images_succeeded: int | None = None
    images_failed: int | None = None
    images_skipped: int | None = None
    cost_usd: float | None = None
    estimated_cost_usd: float | None = None
    simulated: bool = False
    dry_run: bool = False
    shard: str | None = None
    provider_version: str = __version__

    @staticmethod
    def _get_schema() -> str:
        return _SCHEMA_URL


def dataset_for(location: Any) -> Dataset:
    """An OpenLineage dataset for a storage URL or path, named by OpenLineage's conventions: ``file`` + the
    absolute path for local files, ``<scheme>://<bucket>`` + the key for object stores."""
    text = str(location)
    if "://" not in text:
        return Dataset(namespace="file", name=os.path.abspath(text))
    parts = urlsplit(text)
    if parts.scheme in ("file", "local"):
        return Dataset(namespace="file", name=parts.path)
    # An ObjectStoragePath prints its connection id as user info (s3://aws_conn@bucket/key): not the data's name.
    bucket = parts.netloc.rpartition("@")[2]
    return Dataset(namespace=f"{parts.scheme}://{bucket}", name=parts.path.lstrip("/"))


def _join(location: Any, child: str) -> str:
    return str(location).rstrip("/") + "/" + child


def operator_lineage(
    *,
    prompts: Any,
    output: Any,
    metadata_table: str,
    run_facet: ImageGenerationRunFacet | None = None,
    rows_written: int | None = None,
) -> OperatorLineage[Any, Any]:
    """Inputs and outputs of a task that reads ``prompts`` and writes under ``output``.

    :param metadata_table: the metadata table's path under ``output`` (``metadata.parquet`` when the task
        finalizes, the ``metadata`` folder of parts for a shard).
    :param rows_written: images stored, as the metadata output's row count (known on completion only).
    """
    images = dataset_for(_join(output, "images"))
    metadata = dataset_for(_join(output, metadata_table))
    statistics: dict[str, Any] = {}
    if rows_written is not None:
        statistics["outputStatistics"] = OutputStatisticsOutputDatasetFacet(rowCount=rows_written)
    return OperatorLineage(
        inputs=[dataset_for(prompts)] if prompts is not None else [],
        outputs=[
            OutputDataset(namespace=images.namespace, name=images.name),
            OutputDataset(namespace=metadata.namespace, name=metadata.name, outputFacets=statistics),
        ],
        run_facets={"imagegen": run_facet} if run_facet is not None else {},
    )

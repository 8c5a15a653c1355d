"""Stores reached through Airflow connections (``output_conn_id``/``prompts_conn_id``): the filesystem Airflow's
provider builds from the connection, with no credentials in the environment, URIs as the user wrote them."""

from __future__ import annotations

import asyncio
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagegen_provider.engine import finalize_output
from imagegen_provider.hooks.storage import resolve_store

from ..engine._support import current, numbered, run_batch, write_prompts

pytest.importorskip("airflow.providers.amazon")


# Credentials come from the Airflow connection only: none from the environment.
pytestmark = pytest.mark.usefixtures("no_store_credentials_in_env")


async def test_s3_prompts_and_output_through_an_aws_connection(tmp_path, gateway, s3_server, aws_conn):
    base = f"s3://{s3_server['bucket']}/conn-{uuid.uuid4().hex[:8]}"
    # In a thread, as in an operator's execute(): the Amazon provider's factory runs an event loop of its own.
    prompts_store, prompts_options = await asyncio.to_thread(
        resolve_store, f"{base}/prompts.parquet", conn_id=aws_conn, storage_options=None, role="prompts"
    )
    ids, texts = numbered(4)
    with prompts_store.fs.open(prompts_store.root, "wb") as handle:
        pq.write_table(pa.table({"id": ids, "prompt": texts}), handle)
    output, output_options = await asyncio.to_thread(
        resolve_store, f"{base}/out", conn_id=aws_conn, storage_options=None, role="output"
    )
    assert prompts_options is None and output_options is None  # the credentials live in the filesystem

    summary = await run_batch(gateway, prompts=prompts_store, output=output)
    assert summary.succeeded == 4 and summary.output_uri == f"{base}/out"
    report = finalize_output(output, prompts=prompts_store)
    assert report.complete and report.succeeded == 4
    rows = current(output)
    assert all(uri.startswith(f"{base}/out/images/") for uri in rows["image_uri"])


async def test_az_output_through_an_adls_connection(tmp_path, gateway, azurite, adls_conn):
    ids, texts = numbered(3)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    url = f"az://{azurite['container']}/conn-{uuid.uuid4().hex[:8]}"
    output, _ = await asyncio.to_thread(resolve_store, url, conn_id=adls_conn, storage_options=None, role="output")
    summary = await run_batch(gateway, prompts=prompts, output=output)
    assert summary.succeeded == 3 and summary.output_uri == url  # az:// as written, not abfs://
    assert all(uri.startswith(f"{url}/images/") for uri in current(output)["image_uri"])


def test_errors_name_the_parameter(aws_conn):
    from airflow.sdk import ObjectStoragePath

    with pytest.raises(ValueError, match=r"output_conn_id=.*no filesystem for memory://"):
        resolve_store("memory://x/out", conn_id=aws_conn, storage_options=None, role="output")
    with pytest.raises(ValueError, match=r"prompts_conn_id.*local path"):
        resolve_store("/tmp/p.parquet", conn_id=aws_conn, storage_options=None, role="prompts")
    with pytest.raises(ValueError, match="ObjectStoragePath"):
        resolve_store(ObjectStoragePath("s3://b/k", conn_id=aws_conn), conn_id=aws_conn, storage_options=None, role="output")
    # Without a connection, the URL and its options go through untouched.
    assert resolve_store("s3://b/k", conn_id=None, storage_options={"anon": True}, role="output") == ("s3://b/k", {"anon": True})

"""The operators reach their stores through Airflow connections (``output_conn_id``, ``prompts_conn_id``) or
``*_storage_options``: S3 through an ``aws`` connection (moto), Azure Blob through an ``adls`` connection
(Azurite), with no store credentials in the environment; the credentials never reach the XCom result."""

from __future__ import annotations

import json
import uuid

import pandas as pd
import pytest
import s3fs

from imagegen_provider.operators.image_generation import (
    ImageDatasetFinalizeOperator,
    ImageGenerationOperator,
    plan_prompt_shards,
)

from .conftest import FAST_REQUEST, make_context, write_prompts

pytest.importorskip("airflow.providers.amazon")


# Credentials come from the Airflow connection only: none from the environment.
pytestmark = pytest.mark.usefixtures("no_store_credentials_in_env")


def test_s3_prompts_and_output_through_an_aws_connection(tmp_path, s3_server, aws_conn, make_conn, prompts_file):
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    base = f"{s3_server['bucket']}/op-{uuid.uuid4().hex[:8]}"
    fs.put_file(str(prompts_file), f"{base}/prompts.parquet")
    prompts, output = f"s3://{base}/prompts.parquet", f"s3://{base}/out"

    shards = plan_prompt_shards(prompts, shard_size=4, prompts_conn_id=aws_conn)
    assert [(s["start"], s["stop"]) for s in shards] == [(0, 4), (4, 6)]
    for shard in shards:
        op = ImageGenerationOperator(
            task_id="generate", prompts_path=prompts, output_path=output, imagegen_conn_id=make_conn(),
            prompts_conn_id=aws_conn, output_conn_id=aws_conn, shard=shard, **FAST_REQUEST,
        )
        result = op.execute(make_context())
        assert result["run"]["output_uri"] == output
    finalize = ImageDatasetFinalizeOperator(
        task_id="finalize", output_path=output, prompts_path=prompts, output_conn_id=aws_conn,
        prompts_conn_id=aws_conn,
    )
    result = finalize.execute(make_context())
    assert result["dataset"]["complete"] is True and result["dataset"]["succeeded"] == 6
    with fs.open(f"{base}/out/metadata.parquet", "rb") as handle:
        table = pd.read_parquet(handle)
    assert all(uri.startswith(f"{output}/images/") for uri in table["image_uri"])
    assert len(fs.find(f"{base}/out/images")) == 6


def test_az_output_through_an_adls_connection(tmp_path, azurite, adls_conn, make_conn, prompts_file):
    output = f"az://{azurite['container']}/op-{uuid.uuid4().hex[:8]}"
    op = ImageGenerationOperator(
        task_id="generate", prompts_path=str(prompts_file), output_path=output, imagegen_conn_id=make_conn(),
        output_conn_id=adls_conn, **FAST_REQUEST,
    )
    result = op.execute(make_context())
    assert result["run"]["succeeded"] == 6 and result["dataset"]["complete"] is True
    assert result["run"]["output_uri"] == output  # as written: az://
    encoded = json.dumps(result)
    assert azurite["key"] not in encoded and "AccountKey" not in encoded


def test_storage_options_alone_and_never_templated(tmp_path, azurite, make_conn):
    prompts = write_prompts(tmp_path / "p.parquet", ["a kite", "a dune"])
    output = f"az://{azurite['container']}/opts-{uuid.uuid4().hex[:8]}"
    op = ImageGenerationOperator(
        task_id="generate", prompts_path=str(prompts), output_path=output, imagegen_conn_id=make_conn(),
        output_storage_options=azurite["storage_options"], **FAST_REQUEST,
    )
    assert "output_storage_options" not in op.template_fields
    assert azurite["key"] not in repr(op._run_config(make_context()))
    result = op.execute(make_context())
    assert result["run"]["succeeded"] == 2
    assert azurite["key"] not in json.dumps(result)


def test_a_connection_without_its_provider_fails_naming_the_parameter(tmp_path, aws_conn, make_conn, prompts_file):
    op = ImageGenerationOperator(
        task_id="generate", prompts_path=str(prompts_file), output_path="memory://nowhere/out",
        imagegen_conn_id=make_conn(), output_conn_id=aws_conn, **FAST_REQUEST,
    )
    with pytest.raises(ValueError, match=r"output_conn_id=.*memory://"):
        op.execute(make_context())


def test_mapped_tasks_take_the_store_arguments():
    from airflow.sdk import DAG

    with DAG("stores_mapped", schedule=None):
        mapped = ImageGenerationOperator.partial(
            task_id="generate", prompts_path="s3://b/p.parquet", output_path="s3://b/out",
            output_conn_id="aws_default", prompts_conn_id="aws_default", output_storage_options={"anon": False},
        ).expand(shard=[{"start": 0, "stop": 2, "label": "a"}])
    assert mapped.partial_kwargs["output_conn_id"] == "aws_default"
    with pytest.raises(TypeError, match="output_con_id"):
        ImageGenerationOperator.partial(task_id="typo", prompts_path="p", output_path="o", output_con_id="x")

"""The synthetic dataset of ``synthetic_dataset``, through the gateway's Batch API: half the price, and no
worker slot held while the gateway works.

The task submits the prompt table as batches (``api="batch"``), then defers: a trigger in the triggerer polls the
batches and the task resumes on a worker only to collect the images. Output, seeds and metadata are those of the
sync DAG, plus the ``api`` (``batch``) and ``batch_id`` columns.

Batch needs a gateway with OpenAI's ``/v1/files`` and ``/v1/batches`` (OpenAI itself, or the bundled gateway
served with ``imagegen gateway``). Connection ``imagegen_batch`` defaults to a bundled gateway on
127.0.0.1:8000 (``imagegen gateway --batch-delay 20`` shows the task deferred for 20 s). With host ``local``
(the in-process gateway) there is no process for the triggerer to poll: the task waits on its worker instead.
``max_active_runs=1``: two runs submitting the same table would pay twice.
"""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG

from imagegen_provider.operators.image_generation import ImageGenerationOperator, metadata_asset_for

REPO = Path(__file__).resolve().parents[1]
PROMPTS = os.environ.get("IMAGEGEN_PROMPTS", str(REPO / "sample_data" / "prompts.parquet"))
OUTPUT = os.path.join(os.environ.get("IMAGEGEN_OUTPUT_ROOT", str(REPO / "output")), "synthetic_dataset_batch")

with DAG(
    dag_id="synthetic_dataset_batch",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["imagegen", "example", "batch"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": pendulum.duration(seconds=30)},
):
    ImageGenerationOperator(
        task_id="generate_images_batch",
        prompts_path=PROMPTS,
        output_path=OUTPUT,
        imagegen_conn_id=os.environ.get("IMAGEGEN_BATCH_CONN_ID", "imagegen_batch"),
        model="gpt-image-1",
        size="1024x1024",
        quality="low",
        seed=2026,
        api="batch",
        batch_poll_interval=float(os.environ.get("IMAGEGEN_BATCH_POLL_INTERVAL", "10")),
        batch_timeout=25 * 3600.0,
        max_cost_usd=2.5,
        metadata_asset=metadata_asset_for(OUTPUT),
    )

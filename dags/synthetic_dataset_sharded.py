"""The same dataset at scale: plan shards from the Parquet footer → one mapped task per shard (capped by the
``imagegen`` pool) → finalize (completeness check, ``metadata.parquet``, run summary, Asset event).

Every shard's client draws from the connection's rate limits; set the connection extra
``rate_limit_backend`` to ``redis://host:6379/0`` so that shards on different workers share one budget.
Output: ``$IMAGEGEN_OUTPUT_ROOT/synthetic_dataset_sharded``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task

from imagegen_provider.operators.image_generation import (
    ImageDatasetFinalizeOperator,
    ImageGenerationOperator,
    metadata_asset_for,
    plan_prompt_shards,
)

REPO = Path(__file__).resolve().parents[1]
PROMPTS = os.environ.get("IMAGEGEN_PROMPTS", str(REPO / "sample_data" / "prompts.parquet"))
OUTPUT = os.path.join(os.environ.get("IMAGEGEN_OUTPUT_ROOT", str(REPO / "output")), "synthetic_dataset_sharded")
SHARD_SIZE = int(os.environ.get("IMAGEGEN_SHARD_SIZE", "15"))
POOL = os.environ.get("IMAGEGEN_POOL", "imagegen")

with DAG(
    dag_id="synthetic_dataset_sharded",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # One run at a time: two runs of the same output would pay for the same images twice.
    max_active_runs=1,
    tags=["imagegen", "example"],
    doc_md=__doc__,
):

    @task
    def plan() -> list[dict]:
        return plan_prompt_shards(PROMPTS, shard_size=SHARD_SIZE)

    generate = ImageGenerationOperator.partial(
        task_id="generate_shard",
        prompts_path=PROMPTS,
        output_path=OUTPUT,
        imagegen_conn_id="imagegen_default",
        model="gpt-image-1",
        size="1024x1024",
        quality="low",
        seed=2026,
        pool=POOL,
        retries=3,
        retry_delay=pendulum.duration(seconds=5),
        metadata_asset=False,
        progress_interval=5.0,
    ).expand(shard=plan())

    finalize = ImageDatasetFinalizeOperator(
        task_id="finalize",
        output_path=OUTPUT,
        prompts_path=PROMPTS,
        metadata_asset=metadata_asset_for(OUTPUT),
    )
    generate >> finalize

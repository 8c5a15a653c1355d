"""Generate a synthetic image dataset from sample_data/prompts.parquet through connection ``imagegen_default``.

With the connection set up by ``scripts/demo.sh`` (host ``local``), this runs against the bundled gateway
in-process: no server, no key, no cost. Point the connection at a real gateway to generate real images.
Output: ``$IMAGEGEN_OUTPUT_ROOT/synthetic_dataset`` (default ``<repo>/output/synthetic_dataset``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG

from imagegen_provider.operators.image_generation import ImageGenerationOperator, metadata_asset_for

REPO = Path(__file__).resolve().parents[1]
PROMPTS = os.environ.get("IMAGEGEN_PROMPTS", str(REPO / "sample_data" / "prompts.parquet"))
OUTPUT = os.path.join(os.environ.get("IMAGEGEN_OUTPUT_ROOT", str(REPO / "output")), "synthetic_dataset")

with DAG(
    dag_id="synthetic_dataset",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # One run at a time: two runs of the same output would pay for the same images twice.
    max_active_runs=1,
    tags=["imagegen", "example"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": pendulum.duration(seconds=30)},
):
    ImageGenerationOperator(
        task_id="generate_images",
        prompts_path=PROMPTS,
        output_path=OUTPUT,
        imagegen_conn_id="imagegen_default",
        model="gpt-image-1",
        size="1024x1024",
        quality="low",
        seed=2026,
        max_cost_usd=5.0,
        progress_interval=5.0,
        metadata_asset=metadata_asset_for(OUTPUT),
    )

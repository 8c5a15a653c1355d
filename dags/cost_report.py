"""Cost report, scheduled on the metadata Assets of the example datasets: cost, images and failures by day,
model, provider and DAG, written as Parquet and as a PNG bar chart under ``$IMAGEGEN_OUTPUT_ROOT/reports``."""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task

from imagegen_provider.engine.report import build_cost_report, plot_cost_report
from imagegen_provider.operators.image_generation import metadata_asset_for

REPO = Path(__file__).resolve().parents[1]
ROOT = os.environ.get("IMAGEGEN_OUTPUT_ROOT", str(REPO / "output"))
OUTPUTS = [os.path.join(ROOT, "synthetic_dataset"), os.path.join(ROOT, "synthetic_dataset_sharded")]
ASSETS = [metadata_asset_for(path) for path in OUTPUTS]

with DAG(
    dag_id="cost_report",
    schedule=ASSETS[0] | ASSETS[1],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["imagegen", "example"],
    doc_md=__doc__,
):

    @task
    def report() -> dict:
        reports = os.path.join(ROOT, "reports")
        frame = build_cost_report(OUTPUTS)
        os.makedirs(reports, exist_ok=True)
        table_path = os.path.join(reports, "cost_report.parquet")
        chart_path = os.path.join(reports, "cost_report.png")
        frame.to_parquet(table_path, index=False)
        plot_cost_report(frame, chart_path)
        return {
            "report": table_path,
            "chart": chart_path,
            "groups": len(frame),
            "total_cost_usd": float(frame["cost_usd"].sum()) if not frame.empty else 0.0,
        }

    report()

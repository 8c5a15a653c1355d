"""Cost report, scheduled on the metadata Assets of the example datasets: cost, images and failures by day,
model, provider and DAG (and by ``api``, sync vs batch, where the metadata has that column), written as Parquet
and as a PNG bar chart under ``$IMAGEGEN_OUTPUT_ROOT/reports``.

Rows whose ``cost_source`` is ``simulated`` (the bundled local gateway's charges: no money was spent) are left
out unless the run is triggered with ``{"include_simulated": true}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task

from imagegen_provider.engine.report import build_cost_report, plot_cost_report
from imagegen_provider.operators.image_generation import metadata_asset_for

REPO = Path(__file__).resolve().parents[1]
ROOT = os.environ.get("IMAGEGEN_OUTPUT_ROOT", str(REPO / "output"))
OUTPUTS = [os.path.join(ROOT, name) for name in ("synthetic_dataset", "synthetic_dataset_sharded",
                                                  "synthetic_dataset_batch")]
ASSETS = [metadata_asset_for(path) for path in OUTPUTS]


with DAG(
    dag_id="cost_report",
    schedule=ASSETS[0] | ASSETS[1] | ASSETS[2],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["imagegen", "example"],
    doc_md=__doc__,
    params={
        "include_simulated": Param(
            False, type="boolean", description="Count the bundled local gateway's simulated charges as spend."
        )
    },
):

    @task
    def report(params: dict[str, Any] | None = None) -> dict[str, Any]:
        include_simulated = bool((params or {}).get("include_simulated", False))
        frame = build_cost_report(OUTPUTS, include_simulated=include_simulated)
        reports = os.path.join(ROOT, "reports")
        os.makedirs(reports, exist_ok=True)
        table_path = os.path.join(reports, "cost_report.parquet")
        chart_path = os.path.join(reports, "cost_report.png")
        frame.to_parquet(table_path, index=False)
        plot_cost_report(frame, chart_path)
        spend_by_api = {str(k): round(float(v), 6) for k, v in frame.groupby("api")["cost_usd"].sum().items()}
        return {
            "report": table_path,
            "chart": chart_path,
            "groups": len(frame),
            "include_simulated": include_simulated,
            "total_cost_usd": float(frame["cost_usd"].sum()) if not frame.empty else 0.0,
            "cost_usd_by_api": spend_by_api,
        }

    report()

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

from imagegen_provider.engine.metadata import read_metadata
from imagegen_provider.engine.report import GROUP_COLUMNS, plot_cost_report
from imagegen_provider.engine.schema import COLUMNS, STATUS_SUCCEEDED
from imagegen_provider.engine.storage import StorageLocation
from imagegen_provider.operators.image_generation import metadata_asset_for

REPO = Path(__file__).resolve().parents[1]
ROOT = os.environ.get("IMAGEGEN_OUTPUT_ROOT", str(REPO / "output"))
OUTPUTS = [os.path.join(ROOT, "synthetic_dataset"), os.path.join(ROOT, "synthetic_dataset_sharded")]
ASSETS = [metadata_asset_for(path) for path in OUTPUTS]
SIMULATED = "simulated"


def spend_rows(outputs: list[str], *, include_simulated: bool) -> Any:
    """Every metadata row of ``outputs`` (all runs, all attempts: a retried image may have been paid twice),
    without simulated spend unless asked. Reads the ``api`` column when the metadata has one."""
    import pandas as pd

    wanted = [c for c in ("run_id", "prompt_id", "image_index", "status", "model", "provider", "dag_id",
                          "cost_usd", "cost_source", "finished_at", "api") if c in COLUMNS]
    frames = []
    for output in outputs:
        location = StorageLocation.from_url(output)
        frame = read_metadata(location, wanted).to_pandas()
        frame["output"] = location.uri
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True).drop_duplicates(
        ["output", "run_id", "prompt_id", "image_index", "finished_at"]
    )
    if not include_simulated:
        rows = rows[rows["cost_source"] != SIMULATED]
    return rows


def summarize(rows: Any) -> Any:
    """One row per (day, model, provider, dag_id[, api]): images succeeded and failed, cost, unpriced images."""
    import pandas as pd

    groups = [*GROUP_COLUMNS, *(["api"] if "api" in rows.columns else [])]
    columns = [*groups, "images_succeeded", "images_failed", "cost_usd", "unpriced_images"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rows = rows.assign(
        day=rows["finished_at"].dt.strftime("%Y-%m-%d"),
        succeeded=rows["status"] == STATUS_SUCCEEDED,
    )
    rows["unpriced"] = rows["succeeded"] & rows["cost_usd"].isna()
    for column in groups[1:]:
        rows[column] = rows[column].fillna("unknown")
    report = (
        rows.groupby(groups, dropna=False)
        .agg(
            images_succeeded=("succeeded", "sum"),
            images_failed=("succeeded", lambda s: int((~s).sum())),
            cost_usd=("cost_usd", "sum"),
            unpriced_images=("unpriced", "sum"),
        )
        .reset_index()
    )
    report["cost_usd"] = report["cost_usd"].round(6)
    return report[columns]


with DAG(
    dag_id="cost_report",
    schedule=ASSETS[0] | ASSETS[1],
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
        rows = spend_rows(OUTPUTS, include_simulated=include_simulated)
        frame = summarize(rows)
        reports = os.path.join(ROOT, "reports")
        os.makedirs(reports, exist_ok=True)
        table_path = os.path.join(reports, "cost_report.parquet")
        chart_path = os.path.join(reports, "cost_report.png")
        frame.to_parquet(table_path, index=False)
        plot_cost_report(frame, chart_path)
        # Empty without an ``api`` column (not None: Airflow 3.0 refuses a None XCom of a multiple-outputs task).
        spend_by_api = (
            {str(k): round(float(v), 6) for k, v in frame.groupby("api")["cost_usd"].sum().items()}
            if "api" in frame.columns else {}
        )
        return {
            "report": table_path,
            "chart": chart_path,
            "groups": len(frame),
            "include_simulated": include_simulated,
            "total_cost_usd": float(frame["cost_usd"].sum()) if not frame.empty else 0.0,
            "cost_usd_by_api": spend_by_api,
        }

    report()

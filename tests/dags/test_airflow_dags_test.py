"""The example DAGs under real Airflow: ``airflow dags test synthetic_dataset`` then ``airflow dags test
cost_report``, in subprocesses, on the migrated test DB, with the connection given as env JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imagegen_provider.engine.schema import COLUMNS

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-demo-CONN-PASSWORD-81d4e6b09a"


def airflow_cli() -> str:
    return shutil.which("airflow", path=os.path.dirname(sys.executable)) or "airflow"


def run_dag(dag_id: str, env: dict[str, str], conf: dict | None = None) -> str:
    process = subprocess.run(
        [airflow_cli(), "dags", "test", dag_id, *(["--conf", json.dumps(conf)] if conf else [])],
        env=env, cwd=str(REPO), capture_output=True, text=True, timeout=240,
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-4000:]
    # Airflow 3.0's ``dags test`` echoes, at debug level, the task runner's own requests to the supervisor to
    # mask the connection password (``MaskSecret(value=...)``): Airflow's lines, not the provider's.
    return "\n".join(line for line in output.splitlines() if "MaskSecret" not in line)


@pytest.fixture
def airflow_env(airflow_db, tmp_path):
    env = os.environ.copy()
    for name in list(env):
        if name.startswith("AIRFLOW_CONN_") or name == "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST":
            env.pop(name)
    env.update(
        AIRFLOW_HOME=airflow_db,
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        IMAGEGEN_OUTPUT_ROOT=str(tmp_path / "output"),
        AIRFLOW_CONN_IMAGEGEN_DEFAULT=json.dumps(
            {
                "conn_type": "imagegen",
                "host": "local",
                "password": SECRET,
                "extra": {"dialect": "openai", "model": "gpt-image-1", "rpm": 6000, "max_in_flight": 8},
            }
        ),
    )
    env.pop("IMAGEGEN_PROMPTS", None)
    # Parse the DAG folder into the DB first, as the DAG processor would: Airflow 3.0's ``dags test`` does not
    # register the DAGs' Assets itself, and refuses to run a task whose outlet Asset is not active.
    process = subprocess.run(
        [airflow_cli(), "dags", "reserialize"], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=240
    )
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    return env


@pytest.mark.e2e
def test_synthetic_dataset_then_cost_report(airflow_env, tmp_path):
    out = tmp_path / "output" / "synthetic_dataset"
    log = run_dag("synthetic_dataset", airflow_env)
    assert SECRET not in log

    table = pd.read_parquet(out / "metadata.parquet")
    assert list(table.columns) == list(COLUMNS)
    assert pq.read_schema(out / "metadata.parquet").names == list(COLUMNS)
    assert len(table) >= 50
    assert (table.status == "succeeded").all()
    assert set(table.dag_id) == {"synthetic_dataset"} and set(table.task_id) == {"generate_images"}
    assert table.run_id.nunique() == 1 and table.run_id.iloc[0].startswith("manual__")
    valid = 0
    for row in table.itertuples():
        with Image.open(out / row.file_name) as image:
            image.load()  # decodes every pixel
            assert image.size == (row.image_width, row.image_height)
            assert image.format.lower() == row.image_format.lower()
            valid += 1
    assert valid >= 50
    assert len(list((out / "images").iterdir())) == len(table)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["succeeded"] == len(table)
    metadata_cost = float(pd.read_parquet(out / "metadata").cost_usd.sum())
    assert metadata_cost > 0
    assert summary["total_cost_usd"] == pytest.approx(metadata_cost, abs=1e-6)
    for path in (tmp_path / "output").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    history = pd.read_parquet(out / "metadata")
    real = history[history.cost_source != "simulated"]
    reports = tmp_path / "output" / "reports"

    # By default the bundled gateway's simulated charges are not spend.
    log = run_dag("cost_report", airflow_env)
    assert SECRET not in log
    report = pd.read_parquet(reports / "cost_report.parquet")
    assert float(report.cost_usd.sum()) == pytest.approx(float(real.cost_usd.sum()), abs=1e-5)
    assert int(report.images_succeeded.sum()) == int((real.status == "succeeded").sum())

    # Asked for, they are counted.
    run_dag("cost_report", airflow_env, conf={"include_simulated": True})
    report = pd.read_parquet(reports / "cost_report.parquet")
    assert len(report) >= 1
    assert set(report.dag_id) == {"synthetic_dataset"} and set(report.model) == {"gpt-image-1"}
    assert int(report.images_succeeded.sum()) == len(table)
    assert float(report.cost_usd.sum()) == pytest.approx(metadata_cost, abs=1e-5)
    assert float(report.cost_usd.sum()) == pytest.approx(float(table.cost_usd.sum()), abs=1e-5)
    if "api" in history.columns:  # sync vs batch spend, once the metadata records the API used
        assert "api" in report.columns
    with Image.open(reports / "cost_report.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > 100

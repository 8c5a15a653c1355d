"""Every file in dags/ imports cleanly, and the DAGs are wired to each other through their Assets."""

from __future__ import annotations

from pathlib import Path

import pytest
from airflow.sdk import Asset

from imagegen_provider.operators.image_generation import (
    ImageDatasetFinalizeOperator,
    ImageGenerationOperator,
    metadata_asset_for,
)

DAGS = Path(__file__).resolve().parents[2] / "dags"
DAG_IDS = {"synthetic_dataset", "synthetic_dataset_sharded", "synthetic_dataset_batch", "cost_report"}


@pytest.fixture
def dagbag(tmp_path, monkeypatch):
    """The DAG folder parsed as the DAG processor would (Airflow 3.3: ``airflow.dag_processing.dagbag``; its
    ``include_examples`` is gone, examples follow ``[core] load_examples``, off in the tests)."""
    from tests.operators.conftest import dagbag_class

    monkeypatch.setenv("IMAGEGEN_OUTPUT_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    return dagbag_class()(dag_folder=str(DAGS))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dags) == DAG_IDS
    # Every .py file in dags/ was parsed and holds one of the DAGs.
    assert {Path(d.fileloc).name for d in dagbag.dags.values()} == {p.name for p in DAGS.glob("*.py")}


def test_cost_report_is_scheduled_on_both_metadata_assets(dagbag, tmp_path):
    root = tmp_path / "root"
    expected = [  # a list: Airflow 3.0's Asset is not hashable
        metadata_asset_for(str(root / "synthetic_dataset")),
        metadata_asset_for(str(root / "synthetic_dataset_sharded")),
        metadata_asset_for(str(root / "synthetic_dataset_batch")),
    ]
    assert {a.uri for a in expected} == {
        f"file://{root}/synthetic_dataset/metadata.parquet",
        f"file://{root}/synthetic_dataset_sharded/metadata.parquet",
        f"file://{root}/synthetic_dataset_batch/metadata.parquet",
    }
    dag = dagbag.dags["cost_report"]
    condition = dag.timetable.asset_condition
    # Airflow 3.0: iter_assets() yields (key, asset) pairs; 3.3: the condition lists its objects.
    assets = list(dict(condition.iter_assets()).values()) if hasattr(condition, "iter_assets") else condition.objects
    assert {(a.name, a.uri) for a in assets} == {(a.name, a.uri) for a in expected}
    # Either dataset's update triggers the report.
    assert type(condition).__name__ == "AssetAny"


def test_producers_emit_the_assets_cost_report_waits_for(dagbag, tmp_path):
    root = tmp_path / "root"
    single = dagbag.dags["synthetic_dataset"].task_dict["generate_images"]
    assert isinstance(single, ImageGenerationOperator)
    assert single.outlets == [metadata_asset_for(str(root / "synthetic_dataset"))]
    assert single.output_path == str(root / "synthetic_dataset")
    assert single.imagegen_conn_id == "imagegen_default"
    assert single.retries == 2  # transient failures fail the task; a retry resumes

    sharded = dagbag.dags["synthetic_dataset_sharded"]
    finalize = sharded.task_dict["finalize"]
    assert isinstance(finalize, ImageDatasetFinalizeOperator)
    assert finalize.outlets == [metadata_asset_for(str(root / "synthetic_dataset_sharded"))]
    generate = sharded.task_dict["generate_shard"]
    # The mapped shards emit nothing: only the finalized dataset is an Asset event.
    assert generate.partial_kwargs["metadata_asset"] is False
    assert not generate.partial_kwargs.get("outlets")
    assert generate.upstream_task_ids == {"plan"} and finalize.upstream_task_ids == {"generate_shard"}
    assert "shard" in generate.expand_input.value
    for asset in (*single.outlets, *finalize.outlets):
        assert isinstance(asset, Asset)


def test_example_dags_run_one_at_a_time(dagbag):
    # Two concurrent runs writing the same output would pay for the same images twice.
    assert {dag_id: dag.max_active_runs for dag_id, dag in dagbag.dags.items()} == dict.fromkeys(DAG_IDS, 1)

"""plan_prompt_shards + ``ImageGenerationOperator.partial(...).expand(shard=...)`` + finalize, run by
``dag.test()`` against the migrated test DB.

In Airflow 3.3 ``dag.test()`` only runs DAGs that a DAG bundle serialized to the DB, so the test DAG is written
to a file in its own bundle (``[dag_processor] dag_bundle_config_list``, given as an env var).
"""

from __future__ import annotations

import itertools
import json
import textwrap

import pandas as pd
import pytest

from imagegen_provider.engine.schema import COLUMNS
from imagegen_provider.operators.image_generation import ImageGenerationOperator, plan_prompt_shards

from .conftest import make_context, run_dag_file, write_prompts

DAG_ID = "imagegen_test_mapped_shards"
REQUEST = {"model": "dall-e-2", "size": "256x256", "response_format": "b64_json", "seed": 2026, "images_per_prompt": 2}

DAG_FILE = '''
import pendulum
from airflow.sdk import DAG, task

from imagegen_provider.operators.image_generation import (
    ImageDatasetFinalizeOperator,
    ImageGenerationOperator,
    plan_prompt_shards,
)

PROMPTS = {prompts!r}
OUTPUT = {output!r}

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):

    @task
    def plan() -> list[dict]:
        return plan_prompt_shards(PROMPTS, shard_size=3)

    generate = ImageGenerationOperator.partial(
        task_id="generate_shard",
        prompts_path=PROMPTS,
        output_path=OUTPUT,
        imagegen_conn_id={conn_id!r},
        progress_interval=60.0,
        **{request!r},
    ).expand(shard=plan())

    finalize = ImageDatasetFinalizeOperator(
        task_id="finalize", output_path=OUTPUT, prompts_path=PROMPTS, images_per_prompt={images_per_prompt},
        fail_if_incomplete=True,
    )
    generate >> finalize
'''


def asset_events(uri: str, run_id: str) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent.source_task_id, AssetEvent.source_map_index, AssetEvent.extra)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.uri == uri, AssetEvent.source_run_id == run_id)
        ).all()
    return [{"source_task_id": t, "source_map_index": m, "extra": e} for t, m, e in rows]


def link_value(run, task_id: str, map_index: int, key: str):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        row = session.scalars(
            select(XComModel).where(
                XComModel.key == key, XComModel.run_id == run.run_id, XComModel.dag_id == run.dag_id,
                XComModel.task_id == task_id, XComModel.map_index == map_index,
            )
        ).first()
        return XComModel.deserialize_value(row) if row is not None else None


def test_plan_prompt_shards(tmp_path):
    prompts = write_prompts(tmp_path / "p.parquet", [f"prompt {i}" for i in range(7)])
    shards = plan_prompt_shards(str(prompts), shard_size=3)
    assert [(s["start"], s["stop"]) for s in shards] == [(0, 3), (3, 6), (6, 7)]
    assert [s["index"] for s in shards] == [0, 1, 2]
    assert len({s["label"] for s in shards}) == 3
    # max_shards wins over shard_size, and the shards still cover every row exactly once.
    capped = plan_prompt_shards(str(prompts), shard_size=1, max_shards=2)
    assert len(capped) == 2 and capped[0]["start"] == 0 and capped[-1]["stop"] == 7
    assert all(a["stop"] == b["start"] for a, b in itertools.pairwise(capped))
    json.dumps(shards)  # an XCom value


@pytest.mark.e2e
def test_mapped_shards_then_finalize_match_an_unsharded_run(airflow_db, tmp_path, monkeypatch, make_conn):
    prompts = write_prompts(tmp_path / "prompts.parquet", [f"a paper boat on a pond, variant {i}" for i in range(7)])
    sharded_out = tmp_path / "sharded"
    conn_id = make_conn()
    source = textwrap.dedent(DAG_FILE).format(
        prompts=str(prompts), output=str(sharded_out), dag_id=DAG_ID, conn_id=conn_id,
        request=REQUEST, images_per_prompt=REQUEST["images_per_prompt"],
    )
    run = run_dag_file(source, DAG_ID, tmp_path / "dags", monkeypatch)

    states = {(ti.task_id, ti.map_index): ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states
    assert {k: v for k, v in states.items() if k[0] == "generate_shard"} == {
        ("generate_shard", i): "success" for i in range(3)
    }
    assert states[("finalize", -1)] == "success"
    # The UI names each shard by its rows.
    names = {ti.map_index: ti.rendered_map_index for ti in run.get_task_instances() if ti.task_id == "generate_shard"}
    assert names == {0: "rows 0-3", 1: "rows 3-6", 2: "rows 6-7"}
    # The extra links were computed in the worker and kept for the UI.
    assert link_value(run, "generate_shard", 1, "_link_ImageOutputLink") == f"file://{sharded_out}/images/"
    assert link_value(run, "finalize", -1, "_link_RunSummaryLink") == f"file://{sharded_out}/run_summary.json"

    sharded = pd.read_parquet(sharded_out / "metadata.parquet")
    assert list(sharded.columns) == list(COLUMNS)
    keys = list(zip(sharded.prompt_id, sharded.image_index, strict=True))
    assert len(keys) == len(set(keys)) == 14  # one row per prompt × image
    assert set(keys) == {(f"p{i:03d}", k) for i in range(7) for k in range(2)}
    assert sharded.shard.nunique() == 3 and set(sharded.dag_id) == {DAG_ID}
    assert (sharded.status == "succeeded").all()
    summary = json.loads((sharded_out / "run_summary.json").read_text())
    assert summary["complete"] is True and summary["expected_images"] == 14

    # One dataset Asset event, from finalize: the shards (which do not write metadata.parquet) emit none.
    events = asset_events(f"file://{sharded_out}/metadata.parquet", run.run_id)
    assert [e["source_task_id"] for e in events] == ["finalize"], events
    assert events[0]["extra"]["succeeded"] == 14

    # The same table, unsharded, in one task: the same images get the same seeds.
    single_out = tmp_path / "single"
    op = ImageGenerationOperator(
        task_id="generate", prompts_path=str(prompts), output_path=str(single_out), imagegen_conn_id=conn_id,
        progress_interval=60.0, **REQUEST,
    )
    op.execute(make_context())
    single = pd.read_parquet(single_out / "metadata.parquet")
    seeds = lambda t: dict(zip(zip(t.prompt_id, t.image_index, strict=True), t.seed, strict=True))  # noqa: E731
    assert seeds(sharded) == seeds(single)
    assert sorted(sharded.file_name) == sorted(single.file_name)


@pytest.mark.parametrize("shard_size", [1, 100])
def test_shard_sizes_cover_the_table(tmp_path, shard_size):
    prompts = write_prompts(tmp_path / "p.parquet", [f"prompt {i}" for i in range(5)])
    shards = plan_prompt_shards(str(prompts), shard_size=shard_size)
    covered = [row for s in shards for row in range(s["start"], s["stop"])]
    assert covered == list(range(5))

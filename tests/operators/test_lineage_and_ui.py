"""What the operators tell Airflow besides their result: OpenLineage datasets and facets (also through the real
OpenLineage listener), extra links, shard names in the UI, and warnings said once per mapped run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imagegen_provider.operators.image_generation import ImageDatasetFinalizeOperator, ImageGenerationOperator

from .conftest import FAST_REQUEST, make_context

pytest.importorskip("airflow.providers.openlineage", reason="apache-airflow-providers-openlineage not installed")


def _names(datasets) -> list[tuple[str, str]]:
    return [(d.namespace, d.name) for d in datasets]


def _generate(conn_id: str, prompts: Path | str, output: Path | str, **kwargs) -> ImageGenerationOperator:
    return ImageGenerationOperator(
        task_id=kwargs.pop("task_id", "generate"), prompts_path=str(prompts), output_path=str(output),
        imagegen_conn_id=conn_id, progress_interval=60.0, **{**FAST_REQUEST, **kwargs},
    )


class TestOpenLineage:
    def test_on_start_names_the_prompt_table_and_the_dataset(self, prompts_file, tmp_path):
        op = _generate("unused", prompts_file, tmp_path / "out")
        lineage = op.get_openlineage_facets_on_start()
        assert _names(lineage.inputs) == [("file", str(prompts_file))]
        assert _names(lineage.outputs) == [
            ("file", f"{tmp_path}/out/images"),
            ("file", f"{tmp_path}/out/metadata.parquet"),
        ]
        shard = _generate("unused", prompts_file, tmp_path / "out", shard={"start": 0, "stop": 3, "label": "a"})
        # A shard writes metadata parts, not the dataset table.
        assert _names(shard.get_openlineage_facets_on_start().outputs)[1] == ("file", f"{tmp_path}/out/metadata")

    def test_object_store_names_leave_the_connection_out(self):
        from imagegen_provider.operators.lineage import dataset_for

        dataset = dataset_for("s3://aws_prod@bucket/prompts/cats.parquet")
        assert (dataset.namespace, dataset.name) == ("s3://bucket", "prompts/cats.parquet")
        assert (dataset_for("gs://b/x").namespace, dataset_for("gs://b/x").name) == ("gs://b", "x")

    def test_on_complete_carries_model_counts_and_cost(self, prompts_file, tmp_path, make_conn):
        op = _generate(make_conn(), prompts_file, tmp_path / "out", images_per_prompt=2)
        result = op.execute(make_context())
        lineage = op.get_openlineage_facets_on_complete(task_instance=None)
        assert _names(lineage.inputs) == [("file", str(prompts_file))]
        assert [o.name for o in lineage.outputs] == [f"{tmp_path}/out/images", f"{tmp_path}/out/metadata.parquet"]
        assert lineage.outputs[1].outputFacets["outputStatistics"].rowCount == 12
        facet = lineage.run_facets["imagegen"]
        assert facet.model == "dall-e-2"
        assert (facet.images_total, facet.images_succeeded, facet.images_failed) == (12, 12, 0)
        assert facet.cost_usd == pytest.approx(result["run"]["cost_usd"]) and facet.cost_usd > 0
        assert facet.simulated is True  # host "local": the bundled gateway's charges are not real spend
        # The facet serializes as OpenLineage JSON with its schema URL.
        from openlineage.client.serde import Serde

        encoded = json.loads(Serde.to_json(facet))
        assert encoded["images_succeeded"] == 12 and encoded["_schemaURL"].startswith("https://")

    def test_finalize_operator_lineage(self, prompts_file, tmp_path, make_conn):
        output = tmp_path / "out"
        _generate(make_conn(), prompts_file, output, shard={"start": 0, "stop": 6, "label": "all"}).execute(
            make_context()
        )
        finalize = ImageDatasetFinalizeOperator(
            task_id="finalize", output_path=str(output), prompts_path=str(prompts_file)
        )
        finalize.execute(make_context())
        lineage = finalize.get_openlineage_facets_on_complete(task_instance=None)
        assert _names(lineage.inputs) == [("file", str(prompts_file))]
        assert [o.name for o in lineage.outputs] == [f"{output}/images", f"{output}/metadata.parquet"]
        facet = lineage.run_facets["imagegen"]
        assert (facet.images_total, facet.images_succeeded) == (6, 6) and facet.cost_usd > 0


LINEAGE_DAG = '''
import pendulum
from airflow.sdk import DAG

from imagegen_provider.operators.image_generation import ImageGenerationOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    ImageGenerationOperator(
        task_id="generate", prompts_path={prompts!r}, output_path={output!r}, imagegen_conn_id={conn_id!r},
        model="dall-e-2", size="256x256", response_format="b64_json", progress_interval=60.0,
        metadata_asset=False,
    )
'''


def test_events_through_the_openlineage_listener(airflow_db, prompts_file, tmp_path, make_conn):
    """The real listener (the provider's plugin) with OpenLineage's file transport: the START and COMPLETE
    events of the task list the prompt table as input and the dataset as outputs.

    In a process of its own (``airflow dags test``): the plugin decides at import whether OpenLineage is
    enabled, so a test process that loaded it earlier without a transport would emit nothing."""
    events_file = tmp_path / "openlineage.jsonl"
    dag_id = "imagegen_test_openlineage"
    output = tmp_path / "out"
    dags = tmp_path / "dags"
    dags.mkdir()
    conn_id = make_conn()
    (dags / f"{dag_id}.py").write_text(
        textwrap.dedent(LINEAGE_DAG).format(dag_id=dag_id, prompts=str(prompts_file), output=str(output),
                                            conn_id=conn_id)
    )
    env = {
        **os.environ,
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps([
            {"name": "imagegen-openlineage-test", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {"path": str(dags)}},
            {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {}},
        ]),
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}
        ),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "imagegen-tests",
        "PYTHONWARNINGS": "ignore",
    }
    airflow = shutil.which("airflow", path=os.path.dirname(sys.executable)) or "airflow"
    for command in (["dags", "reserialize"], ["dags", "test", dag_id]):
        done = subprocess.run([airflow, *command], env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    ours = [e for e in events if e["job"]["name"] == f"{dag_id}.generate"]
    by_type = {e["eventType"]: e for e in ours}
    assert {"START", "COMPLETE"} <= set(by_type), [e["eventType"] for e in ours]
    for event in (by_type["START"], by_type["COMPLETE"]):
        assert [(d["namespace"], d["name"]) for d in event["inputs"]] == [("file", str(prompts_file))]
        assert [(d["namespace"], d["name"]) for d in event["outputs"]] == [
            ("file", f"{output}/images"),
            ("file", f"{output}/metadata.parquet"),
        ]
    facet = by_type["COMPLETE"]["run"]["facets"]["imagegen"]
    assert facet["images_succeeded"] == 6 and facet["model"] == "dall-e-2" and facet["cost_usd"] > 0


class TestLinks:
    def test_operators_declare_the_links(self):
        for operator in (ImageGenerationOperator, ImageDatasetFinalizeOperator):
            assert [link.name for link in operator.operator_extra_links] == ["Images", "Run summary"]

    def test_links_point_at_the_output(self, tmp_path):
        images, summary = ImageGenerationOperator.operator_extra_links
        local = ImageGenerationOperator(task_id="g", prompts_path="p", output_path=str(tmp_path / "out"))
        assert images.get_link(local, ti_key=None) == f"file://{tmp_path}/out/images/"
        assert summary.get_link(local, ti_key=None) == f"file://{tmp_path}/out/run_summary.json"
        s3 = ImageGenerationOperator(task_id="s", prompts_path="p", output_path="s3://aws_prod@bucket/ds/cats")
        assert images.get_link(s3, ti_key=None) == (
            "https://s3.console.aws.amazon.com/s3/buckets/bucket?prefix=ds/cats/images/"
        )
        shard = ImageGenerationOperator(
            task_id="h", prompts_path="p", output_path="gs://b/ds", shard={"start": 0, "stop": 2, "label": "x"}
        )
        assert images.get_link(shard, ti_key=None) == "https://console.cloud.google.com/storage/browser/b/ds/images/"
        assert summary.get_link(shard, ti_key=None) == ""  # a shard writes no run summary
        unknown = ImageGenerationOperator(task_id="u", prompts_path="p", output_path="abfs://c/ds")
        assert images.get_link(unknown, ti_key=None) == ""


class TestOncePerRunWarnings:
    def _run_shard(self, conn_id, prompts, output, map_index, caplog):
        op = _generate(conn_id, prompts, output, seed=3, shard={"start": 0, "stop": 2, "label": f"s{map_index}"})
        context = make_context()
        context["ti"] = type("TI", (), {"map_index": map_index})()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            op.execute(context)
        return [r for r in caplog.records if "does not send" in r.getMessage()]

    def test_first_shard_warns_the_others_inform(self, prompts_file, tmp_path, make_conn):
        conn_id = make_conn()  # openai dialect: the seed is recorded but not sent
        caplog = self.caplog
        [first] = self._run_shard(conn_id, prompts_file, tmp_path / "a", 0, caplog)
        assert first.levelno == logging.WARNING and "seed" in first.getMessage()
        [later] = self._run_shard(conn_id, prompts_file, tmp_path / "b", 3, caplog)
        assert later.levelno == logging.INFO and "as warned by the first shard" in later.getMessage()
        # The filter is gone after the task: a later unmapped run warns again.
        [again] = self._run_shard(conn_id, prompts_file, tmp_path / "c", -1, caplog)
        assert again.levelno == logging.WARNING

    @pytest.fixture(autouse=True)
    def _caplog(self, caplog):
        self.caplog = caplog

"""``dags/synthetic_dataset_batch.py`` on a real Airflow 3 deployment (scheduler with LocalExecutor,
dag-processor, Execution API and a **triggerer**), against the bundled gateway served by a subprocess whose
batches stay in progress for a while (``--batch-delay``).

Checked: while the gateway works on the batch the task instance is ``deferred`` and no task-runner process
exists (no worker slot is held); the trigger fires, the task resumes on a worker, collects every image and
succeeds; one batch was created, no image was charged twice, and the dataset's rows say ``api = batch``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import airflow
import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port, wait_for_port
from tests.scale._support import REPO, airflow_env, gateway_process
from tests.scale.test_sharded_dag_e2e import AirflowDeployment, _task_runner_of, descendants

# Airflow 3.0.x's triggerer dies with "Response read out of order!" when a trigger's requests to its supervisor
# overlap (seen in CI on 3.0.6 as the trigger read its connection); 3.1 and later serialise them. On 3.0, run
# batch mode with deferrable=False (the task waits on its worker).
_AIRFLOW = tuple(int(part) for part in airflow.__version__.split(".")[:2])
pytestmark = pytest.mark.skipif(_AIRFLOW < (3, 1), reason="Airflow 3.0.x triggerer bug: Response read out of order")

DAG_ID = "synthetic_dataset_batch"
TASK_ID = "generate_images_batch"
PROMPTS = REPO / "sample_data" / "prompts.parquet"
BATCH_DELAY = 15  # seconds the gateway keeps the batch in progress


def _env(root: Path, api_port: int, gateway_api: str) -> dict[str, str]:
    connection = {"conn_type": "imagegen", "host": gateway_api, "password": "sk-e2e-batch-key"}
    return airflow_env(
        root, api_port=api_port, executor="LocalExecutor", parallelism=2, label="batch-test",
        AIRFLOW_CONN_IMAGEGEN_BATCH=json.dumps(connection),
        IMAGEGEN_PROMPTS=str(PROMPTS),
        IMAGEGEN_OUTPUT_ROOT=str(root / "output"),
        IMAGEGEN_BATCH_POLL_INTERVAL="1",
    )


def _state(deployment: AirflowDeployment, run_id: str) -> tuple[str | None, str | None, str | None]:
    """The task's state, the run's state and the task instance id (as task-runner titles spell it)."""
    task = deployment.query("select state, id from task_instance where dag_id = ? and run_id = ? and task_id = ?",
                            DAG_ID, run_id, TASK_ID)
    run = deployment.query("select state from dag_run where dag_id = ? and run_id = ?", DAG_ID, run_id)
    ti_id = str(task[0][1]).replace("-", "").lower() if task else None
    return (task[0][0] if task else None), (run[0][0] if run else None), ti_id


def _first_run(deployment: AirflowDeployment) -> str:
    """The DAG's first run: the scheduler creates one at once (unpaused, ``@daily``, no catchup); a manual run
    beside it would find everything stored by then and never defer."""
    deadline = time.monotonic() + 60
    while True:
        runs = deployment.query("select run_id from dag_run where dag_id = ? order by id", DAG_ID)
        if runs:
            return str(runs[0][0])
        deployment.check_alive()
        assert time.monotonic() < deadline, deployment.log_tail("scheduler")
        time.sleep(0.2)


def _watch(deployment: AirflowDeployment, run_id: str) -> dict[str, object]:
    """Poll the task's state until the run ends; note whether it was seen deferred with no task runner alive."""
    seen: list[str] = []
    deferred_without_runner = 0
    deadline = time.monotonic() + 240
    while True:
        deployment.check_alive()
        task, run, ti_id = _state(deployment, run_id)
        if task and (not seen or seen[-1] != task):
            seen.append(task)
        if task == "deferred":
            scheduler = deployment.processes["scheduler"].pid
            runners = [p for p in descendants(scheduler) if _task_runner_of(p) == ti_id]
            deferred_without_runner += not runners
        if run in ("success", "failed"):
            return {"states": seen, "run": run, "deferred_polls_without_runner": deferred_without_runner}
        assert time.monotonic() < deadline, (seen, deployment.log_tail("scheduler"), deployment.log_tail("triggerer"))
        time.sleep(0.2)


@pytest.mark.e2e
def test_batch_task_defers_to_the_triggerer_and_collects(tmp_path):
    root = tmp_path
    (root / "dags").mkdir()
    (root / "home").mkdir()
    shutil.copy(REPO / "dags" / f"{DAG_ID}.py", root / "dags")
    api_port = free_port()
    with gateway_process("--batch-delay", str(BATCH_DELAY)) as gateway:
        deployment = AirflowDeployment(root, _env(root, api_port, gateway.api_base))
        deployment.cli("db", "migrate")
        try:
            deployment.start("api-server", "api-server", "--apps", "execution", "--host", "127.0.0.1",
                             "--port", str(api_port))
            deployment.start("dag-processor", "dag-processor")
            deployment.start("scheduler", "scheduler")
            deployment.start("triggerer", "triggerer")
            wait_for_port(api_port, timeout=90)
            deadline = time.monotonic() + 120
            while not deployment.query("select 1 from serialized_dag where dag_id = ?", DAG_ID):
                deployment.check_alive()
                assert time.monotonic() < deadline, deployment.log_tail("dag-processor")
                time.sleep(0.5)
            run_id = _first_run(deployment)
            watched = _watch(deployment, run_id)
        finally:
            deployment.stop()
        stats = gateway.stats()

    assert watched["run"] == "success", (watched, deployment.log_tail("scheduler"), deployment.log_tail("triggerer"))
    assert "deferred" in watched["states"] and watched["states"][-1] == "success", watched
    assert watched["deferred_polls_without_runner"] > 0, watched  # deferred, and no worker process held
    assert "Batch batch_" in deployment.log_tail("triggerer", 200_000) or stats["batches_created"] == 1
    dataset = pq.read_table(root / "output" / DAG_ID / "metadata.parquet").to_pandas()
    assert len(dataset) == pq.read_metadata(PROMPTS).num_rows
    assert (dataset["status"] == "succeeded").all() and set(dataset["api"]) == {"batch"}
    assert dataset["batch_id"].nunique() == 1
    assert (stats["batches_created"], stats["batch_lines_charged_twice"]) == (1, 0)
    assert stats["charged_images"] == len(dataset)

"""The sharded DAG on a real Airflow 3 deployment: scheduler + LocalExecutor, dag-processor and the
Execution API, SQLite metadata DB, against the bundled gateway served over loopback by a subprocess.

Airflow 3.3 accepts LocalExecutor on a file-based SQLite database (2.x refused it), so no database server is
needed. Three processes make a deployment that runs tasks headless:

* ``airflow dag-processor``: parses ``dags/`` into serialized DAGs (the scheduler no longer parses);
* ``airflow scheduler``: schedules and runs the tasks with LocalExecutor (parallelism 6);
* ``airflow api-server --apps execution``: the Execution API the task runners talk to (the UI/public API
  app is not needed). Scheduler and API server share ``[api_auth] jwt_secret``: the scheduler signs the
  task tokens that the API server checks.

The run: ``plan`` reads the Parquet footer (60 rows, shard size 10 → 6 shards), six mapped
``generate_shard`` tasks share the ``imagegen`` pool (4 slots), ``finalize`` writes ``metadata.parquet``.
While it runs, the task-runner process (``airflow worker -- <ti id>``) of shard 1 is SIGKILLed once a few of
its images are stored: Airflow retries it (``retries=3``) and the retry resumes, so the shard pays again
only for what was in flight.

Checked: every mapped shard succeeded (shard 1 on its second try); ``metadata.parquet`` has one row per
prompt × image; seeds and file names equal those of an unsharded ``imagegen run`` with the DAG's parameters;
Hugging Face ``imagefolder`` loads 60 rows; the gateway charged at most the in-flight images twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imagegen_provider.cli import main as imagegen_main
from tests.conftest import free_port, wait_for_port
from tests.scale._support import PYTHON, REPO, airflow_env, child_env, gateway_process

DAG_ID = "synthetic_dataset_sharded"
PROMPTS = REPO / "sample_data" / "prompts.parquet"
SHARD_SIZE = 10
MAX_IN_FLIGHT = 2  # connection extra: a shard takes a few seconds, so that it can be killed mid-run
KILLED_SHARD = 1
AIRFLOW = shutil.which("airflow", path=os.path.dirname(PYTHON)) or "airflow"


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (task runners put themselves in process groups of their own)."""
    tree, found, stack = _children(), [], [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _task_runner_of(pid: int) -> str | None:
    """The task instance id of a task-runner process (its title is ``airflow worker -- <ti id>``)."""
    title = _cmdline(pid)
    prefix = "airflow worker -- "
    if not title.startswith(prefix):
        return None
    return title[len(prefix):].split()[0].replace("-", "").lower() if title[len(prefix):].strip() else None


class AirflowDeployment:
    """A temporary Airflow home with its own SQLite DB and the processes started in it."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.db_path = root / "home" / "airflow.db"
        self.processes: dict[str, subprocess.Popen] = {}

    def cli(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            [AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.root
        )
        assert result.returncode == 0, (
            f"airflow {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
        return result.stdout

    def cli_json(self, *args: str):
        out = self.cli(*args, "--output", "json")
        # Warnings (e.g. "Could not import graphviz") share stdout with the JSON: take the JSON line.
        lines = [line for line in out.splitlines() if line.startswith(("[", "{"))]
        assert lines, out
        return json.loads(lines[-1])

    def start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.processes[name] = subprocess.Popen(
            [AIRFLOW, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
            start_new_session=True,
        )
        log.close()

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            assert process.poll() is None, f"{name} exited with {process.returncode}:\n{self.log_tail(name)}"

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def query(self, sql: str, *params):
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30) as db:
            return db.execute(sql, params).fetchall()

    def stop(self) -> None:
        """SIGTERM every started process group, then SIGKILL whatever of them or below them is left."""
        tree = {name: [p.pid, *descendants(p.pid)] for name, p in self.processes.items()}
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pids in tree.values():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for process in self.processes.values():
            if process.poll() is None:
                process.wait(10)


def _task_states(deployment: AirflowDeployment, run_id: str) -> dict[tuple[str, int], tuple[str, int]]:
    rows = deployment.query(
        "select task_id, map_index, state, try_number from task_instance where dag_id = ? and run_id = ?",
        DAG_ID, run_id,
    )
    return {(task, index): (state, tries) for task, index, state, tries in rows}


def _shard_images(output: Path, shard: int) -> int:
    ids = {f"sample-{row:03d}" for row in range(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE)}
    images = output / "images"
    return sum(1 for d in images.iterdir() if d.name in ids for _ in d.glob("*.png")) if images.exists() else 0


def _kill_task_runner(deployment: AirflowDeployment, run_id: str, output: Path) -> dict:
    """Wait until shard KILLED_SHARD has stored a few images, then SIGKILL its task runner."""
    deadline = time.monotonic() + 150
    while True:
        deployment.check_alive()
        assert time.monotonic() < deadline, "shard never got going"
        rows = deployment.query(
            "select id, state from task_instance where dag_id = ? and run_id = ? and task_id = 'generate_shard' "
            "and map_index = ?", DAG_ID, run_id, KILLED_SHARD,
        )
        stored = _shard_images(output, KILLED_SHARD)
        if rows and rows[0][1] == "running" and stored >= 2:
            assert stored < SHARD_SIZE, "the shard finished before it could be killed"
            ti_id = str(rows[0][0]).replace("-", "").lower()  # SQLite keeps the UUID without hyphens
            scheduler = deployment.processes["scheduler"].pid
            runners = [pid for pid in descendants(scheduler) if _task_runner_of(pid) == ti_id]
            if runners:
                for pid in runners:
                    os.kill(pid, signal.SIGKILL)
                return {"ti_id": ti_id, "pids": runners, "images_at_kill": stored}
        time.sleep(0.05)


@pytest.mark.e2e
def test_sharded_dag_on_scheduler_with_local_executor(tmp_path, record_property):
    root = tmp_path
    (root / "dags").mkdir()
    (root / "home").mkdir()
    shutil.copy(REPO / "dags" / "synthetic_dataset_sharded.py", root / "dags")
    output = root / "output" / DAG_ID
    api_port = free_port()
    started = time.monotonic()

    with gateway_process("--latency", "0.8-1.2", "--fault-seed", "11") as gateway:
        connection = {"conn_type": "imagegen", "host": gateway.api_base, "password": "k",
                      "extra": {"max_in_flight": MAX_IN_FLIGHT}}
        env = airflow_env(
            root, api_port=api_port, executor="LocalExecutor", parallelism=6, label="scale-test",
            AIRFLOW_CONN_IMAGEGEN_DEFAULT=json.dumps(connection),
            IMAGEGEN_PROMPTS=str(PROMPTS),
            IMAGEGEN_OUTPUT_ROOT=str(root / "output"),
            IMAGEGEN_SHARD_SIZE=str(SHARD_SIZE),
            IMAGEGEN_POOL="imagegen",
        )
        deployment = AirflowDeployment(root, env)
        deployment.cli("db", "migrate")
        deployment.cli("pools", "set", "imagegen", "4", "imagegen shards")
        try:
            deployment.start("api-server", "api-server", "--apps", "execution", "--host", "127.0.0.1",
                             "--port", str(api_port))
            deployment.start("dag-processor", "dag-processor")
            deployment.start("scheduler", "scheduler")
            wait_for_port(api_port, timeout=90)
            deadline = time.monotonic() + 120
            while not deployment.query("select 1 from serialized_dag where dag_id = ?", DAG_ID):
                deployment.check_alive()
                assert time.monotonic() < deadline, deployment.log_tail("dag-processor")
                time.sleep(0.5)

            triggered = deployment.cli_json("dags", "trigger", DAG_ID)
            run_id = (triggered[0] if isinstance(triggered, list) else triggered)["dag_run_id"]
            killed = _kill_task_runner(deployment, run_id, output)

            deadline = time.monotonic() + 150
            while True:
                deployment.check_alive()
                state = deployment.query("select state from dag_run where dag_id = ? and run_id = ?", DAG_ID, run_id)
                if state and state[0][0] in ("success", "failed"):
                    break
                assert time.monotonic() < deadline, (_task_states(deployment, run_id), deployment.log_tail("scheduler"))
                time.sleep(1)
            runs = deployment.cli_json("dags", "list-runs", DAG_ID)
            states = deployment.cli_json("tasks", "states-for-dag-run", DAG_ID, run_id)
            tries = _task_states(deployment, run_id)
        finally:
            deployment.stop()
        stats = gateway.stats()

    airflow_s = time.monotonic() - started
    run_states = [r["state"] for r in runs if r["run_id"] == run_id]
    assert run_states == ["success"], (states, deployment.log_tail("scheduler"))
    by_task: dict[str, dict[str, str]] = {}
    for row in states:
        by_task.setdefault(row["task_id"], {})[str(row["map_index"])] = row["state"]
    shards = len(range(0, pq.read_metadata(PROMPTS).num_rows, SHARD_SIZE))
    assert by_task["plan"] == {"": "success"}
    assert by_task["generate_shard"] == {str(i): "success" for i in range(shards)}
    assert by_task["finalize"] == {"": "success"}
    # The killed shard failed once and succeeded on its retry; the others on their first try.
    assert tries[("generate_shard", KILLED_SHARD)] == ("success", 2)
    assert all(tries[("generate_shard", i)] == ("success", 1) for i in range(shards) if i != KILLED_SHARD), tries
    # Shards ran side by side (LocalExecutor, parallelism 6) but never more than the pool's 4 slots: each holds
    # at most MAX_IN_FLIGHT requests on the gateway.
    assert MAX_IN_FLIGHT < stats["max_in_flight"] <= 4 * MAX_IN_FLIGHT, stats["max_in_flight"]

    # One row per prompt × image, nothing paid twice but what was in flight when the runner died.
    dataset = pq.read_table(output / "metadata.parquet").to_pandas()
    prompt_ids = pq.read_table(PROMPTS).column("id").to_pylist()
    assert len(dataset) == len(prompt_ids) == 60
    assert not dataset.duplicated(["prompt_id", "image_index"]).any()
    assert set(dataset["prompt_id"]) == set(prompt_ids) and set(dataset["image_index"]) == {0}
    assert (dataset["status"] == "succeeded").all() and dataset["cost_usd"].notna().all()
    assert sorted(dataset["shard"].unique()) == [f"rows-{s:09d}-{s + SHARD_SIZE:09d}" for s in range(0, 60, SHARD_SIZE)]
    assert stats["images_generated"] >= len(dataset)
    repaid = stats["charged_images"] - len(dataset)
    assert 0 <= repaid <= 2 * MAX_IN_FLIGHT, stats

    # Seeds (and so file names) equal those of an unsharded run with the DAG's parameters.
    unsharded = root / "unsharded"
    assert imagegen_main([
        "run", str(PROMPTS), str(unsharded), "--seed", "2026", "--model", "gpt-image-1", "--quality", "low",
        "--size", "1024x1024", "--progress-interval", "60",
    ]) == 0
    reference = pq.read_table(unsharded / "metadata.parquet").to_pandas()
    key = ["prompt_id", "image_index"]
    merged = dataset.merge(reference, on=key, suffixes=("", "_unsharded"), validate="one_to_one")
    assert len(merged) == 60
    assert (merged["seed"] == merged["seed_unsharded"]).all()
    assert (merged["file_name"] == merged["file_name_unsharded"]).all()
    assert (merged["size"] == merged["size_unsharded"]).all()
    assert (merged["quality"] == merged["quality_unsharded"]).all()

    # Hugging Face loads it as an image folder (offline, own cache; in a child: datasets reads the env on import).
    hf = subprocess.run(
        [PYTHON, "-c", (
            "import datasets, json, sys; "
            "ds = datasets.load_dataset('imagefolder', data_dir=sys.argv[1], cache_dir=sys.argv[2], split='train'); "
            "print(json.dumps({'rows': ds.num_rows, 'columns': ds.column_names, 'size': list(ds[0]['image'].size)}))"
        ), str(output), str(root / "hf-cache")],
        env=child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf-home")),
        capture_output=True, text=True, timeout=180,
    )
    assert hf.returncode == 0, hf.stderr[-3000:]
    loaded = json.loads(hf.stdout.strip().splitlines()[-1])
    assert loaded["rows"] == 60
    assert {"image", "prompt_id", "seed"} <= set(loaded["columns"])

    figures = {
        "airflow_s": round(airflow_s, 1),
        "shards": shards,
        "killed": killed,
        "charged_images": stats["charged_images"],
        "images": len(dataset),
        "repaid_after_kill": repaid,
        "gateway_max_in_flight": stats["max_in_flight"],
    }
    record_property("figures", figures)
    print("sharded dag:", json.dumps(figures))

"""Airflow-scale proof (issue 11): the sharded example DAG on a real CeleryExecutor, its shards on two
``airflow celery worker`` processes sharing one hidden limit through Redis.

Started here, on loopback, and stopped on any outcome (also on SIGTERM): redis-server (Celery broker on db 0,
Celery results on db 1, the shared rate limit on db 2), the bundled gateway enforcing R requests/min that it never
announces (no ``x-ratelimit-*`` headers; a token bucket answering 429 with Retry-After by default), and an Airflow
3 deployment in a temporary home on SQLite (Airflow 3 workers reach the database only through the Execution API,
so CeleryExecutor accepts a file database): ``db migrate``, ``api-server --apps execution``, ``dag-processor``,
``scheduler`` and two ``celery worker --concurrency 2``. The connection ``imagegen_default`` points at the gateway
with ``rate_limit_backend`` = the Redis and no ``rpm``: the shards learn the limit together.

Each worker reports its own Airflow hostname (``[core] hostname_callable`` reads the worker's name from its
environment), so ``task_instance.hostname`` says which worker ran which shard.

Checked: the DAG run succeeds; every shard ran on a Celery worker and both workers ran shards; every prompt has
its image in ``metadata.parquet`` and on disk, and the gateway charged each image once; over the whole minutes of
generation (60 s windows from the first accepted request) the combined accepted rate stays within the limit and
uses most of it, with at most 5 % of all requests answered 429 (learning included). The figures are printed as a
table.

Slow (about three minutes) and it needs the ``celery`` extra: outside the default run. One command:
``./scripts/celery-proof.sh`` (sets ``IMAGEGEN_CELERY_PROOF=1``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port, wait_for_port
from tests.scale._support import REPO, airflow_env, gateway_process, max_window, per_second, write_prompts
from tests.scale.test_sharded_dag_e2e import AIRFLOW, DAG_ID, AirflowDeployment

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.environ.get("IMAGEGEN_CELERY_PROOF") != "1",
        reason="about three minutes with a Celery deployment: run ./scripts/celery-proof.sh (IMAGEGEN_CELERY_PROOF=1)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("airflow.providers.celery") is None,
        reason="apache-airflow-providers-celery is not installed (pip install -e '.[celery]')",
    ),
]

RATE = int(os.environ.get("IMAGEGEN_CELERY_RPM", "240"))
LIMITER = os.environ.get("IMAGEGEN_CELERY_LIMITER", "token-bucket")
# Set to R to give the connection the limit (``rpm`` extra: one budget in Redis) instead of letting shards learn it.
CONNECTION_RPM = os.environ.get("IMAGEGEN_CELERY_CONNECTION_RPM")
# The control: IMAGEGEN_CELERY_SHARED=0 leaves rate_limit_backend out, so each shard has a limiter of its own.
SHARED = os.environ.get("IMAGEGEN_CELERY_SHARED", "1") != "0"
# The bound of the hidden-limit measurements (tests/scale/test_limiter_shapes.py), learning included.
MAX_429_SHARE = 0.05
SHARDS = 4
WORKERS = 2
CONCURRENCY = 2
# Enough rows for two whole minutes of generation at R and a little (the first seconds are the shards' start).
ROWS_PER_SHARD = int(os.environ.get("IMAGEGEN_CELERY_ROWS_PER_SHARD", str(math.ceil(RATE * 2.3 / SHARDS))))
# A token bucket may accept its burst (one second of R) on top of R in a minute; the windows accept at most R.
CEILING = RATE + max(1, RATE // 60) if LIMITER == "token-bucket" else RATE
# No fixed window: it rightly accepts R just before :00 and R again after, so "within the limit" would need
# calendar minutes, which a run of about two minutes seldom holds two of.
GATEWAY_OPTIONS = {
    "token-bucket": ["--no-rate-limit-headers"],
    "sliding-window": ["--no-rate-limit-headers", "--no-retry-after"],
}
HOSTNAME_MODULE = '''"""The Airflow hostname of a proof worker: its name from the environment."""
import os


def hostname() -> str:
    return os.environ["IMAGEGEN_PROOF_WORKER"]
'''
DEADLINE_S = 900


@dataclass
class RunRecord:
    run_id: str
    state: str
    tasks: list[tuple]  # (task_id, map_index, state, try_number, hostname, queue)
    dag_run_s: float


class CeleryDeployment(AirflowDeployment):
    """The LocalExecutor test's deployment, with processes that may carry environments of their own."""

    def start_with(self, name: str, args: list[str], **env: str) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.processes[name] = subprocess.Popen(
            [AIRFLOW, *args], env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
            start_new_session=True,
        )
        log.close()


def _environment(root: Path, redis_url: str, api_base: str, api_port: int) -> dict[str, str]:
    base = redis_url.rsplit("/", 1)[0]
    connection: dict = {"conn_type": "imagegen", "host": api_base, "password": "k", "extra": {"max_attempts": 8}}
    if SHARED:
        connection["extra"]["rate_limit_backend"] = f"{base}/2"
    if CONNECTION_RPM:
        connection["extra"]["rpm"] = int(CONNECTION_RPM)
    return airflow_env(
        root, api_port=api_port, executor="CeleryExecutor", parallelism=WORKERS * CONCURRENCY, label="celery-proof",
        AIRFLOW__CELERY__BROKER_URL=f"{base}/0",
        AIRFLOW__CELERY__RESULT_BACKEND=f"{base}/1",
        AIRFLOW__CELERY__WORKER_CONCURRENCY=str(CONCURRENCY),
        AIRFLOW_CONN_IMAGEGEN_DEFAULT=json.dumps(connection),
        IMAGEGEN_PROMPTS=str(root / "prompts.parquet"),
        IMAGEGEN_OUTPUT_ROOT=str(root / "output"),
        IMAGEGEN_SHARD_SIZE=str(ROWS_PER_SHARD),
        IMAGEGEN_POOL="imagegen",
    )


def _start(deployment: CeleryDeployment, root: Path, api_port: int) -> list[str]:
    """The API server, dag-processor, scheduler and the workers; the workers' names."""
    deployment.start_with("api-server", ["api-server", "--apps", "execution", "--host", "127.0.0.1",
                                         "--port", str(api_port), "--workers", "1"])
    deployment.start_with("dag-processor", ["dag-processor"])
    deployment.start_with("scheduler", ["scheduler"])
    hosts = root / "hosts"
    hosts.mkdir()
    (hosts / "imagegen_proof_hostname.py").write_text(HOSTNAME_MODULE)
    names = [f"celery-worker-{n}" for n in range(1, WORKERS + 1)]
    for name in names:
        deployment.start_with(
            name,
            ["celery", "worker", "--concurrency", str(CONCURRENCY), "--celery-hostname", f"{name}@%h",
             "--skip-serve-logs", "--pid", str(root / f"{name}.pid")],
            IMAGEGEN_PROOF_WORKER=name,
            AIRFLOW__CORE__HOSTNAME_CALLABLE="imagegen_proof_hostname.hostname",
            PYTHONPATH=os.pathsep.join([str(hosts), deployment.env["PYTHONPATH"]]),
        )
    return names


def _wait_until_ready(deployment: CeleryDeployment, api_port: int, workers: list[str]) -> None:
    wait_for_port(api_port, timeout=120)
    deadline = time.monotonic() + 180
    while True:
        deployment.check_alive()
        parsed = deployment.query("select 1 from serialized_dag where dag_id = ?", DAG_ID)
        ready = [name for name in workers if re.search(rf"{name}@\S+ ready", deployment.log_tail(name, 100_000))]
        if parsed and len(ready) == len(workers):
            return
        assert time.monotonic() < deadline, (ready, deployment.log_tail("dag-processor"))
        time.sleep(1)


def _run_dag(deployment: CeleryDeployment) -> RunRecord:
    triggered = deployment.cli_json("dags", "trigger", DAG_ID)
    run_id = (triggered[0] if isinstance(triggered, list) else triggered)["dag_run_id"]
    started = time.monotonic()
    deadline = started + DEADLINE_S
    while True:
        deployment.check_alive()
        state = deployment.query("select state from dag_run where dag_id = ? and run_id = ?", DAG_ID, run_id)
        if state and state[0][0] in ("success", "failed"):
            break
        assert time.monotonic() < deadline, deployment.log_tail("scheduler")
        time.sleep(2)
    tasks = deployment.query(
        "select task_id, map_index, state, try_number, hostname, queue from task_instance "
        "where dag_id = ? and run_id = ? order by task_id, map_index", DAG_ID, run_id,
    )
    return RunRecord(run_id=run_id, state=state[0][0], tasks=tasks, dag_run_s=time.monotonic() - started)


def _interrupt_on_sigterm():
    """SIGTERM (a killed script, a CI timeout) unwinds the test like Ctrl-C, so every process is stopped."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, interrupt)


def _rate_figures(stats: dict) -> dict:
    """The gateway's own counts: accepted requests per whole minute of generation, and the share of 429s."""
    seconds = per_second(stats["accepted_timeline"])
    minutes = [sum(seconds[m * 60:(m + 1) * 60]) for m in range(len(seconds) // 60)]
    sent = int(stats["generation_requests"])
    return {
        "generation_s": len(seconds),
        "whole_minutes": minutes,
        "throughput_over_r": round(sum(minutes) / len(minutes) / RATE, 3) if minutes else None,
        "worst_60s": max_window(seconds, 60),
        "requests": sent,
        "http_429": int(stats["rate_limited"]),
        "share_429": round(stats["rate_limited"] / sent, 4) if sent else 0.0,
        "charged_images": int(stats["charged_images"]),
    }


def _workload_lines(deployment: CeleryDeployment, workers: list[str]) -> dict[str, int]:
    """Workloads each Celery worker logged receiving (a cross-check of the hostnames in the database)."""
    return {name: deployment.log_tail(name, 10_000_000).count("Executing workload in Celery") for name in workers}


def _print_table(figures: dict) -> None:
    rows = [
        ("executor", f"CeleryExecutor, {WORKERS} workers × concurrency {CONCURRENCY}, Redis broker"),
        ("hidden limit", f"{LIMITER}, R = {RATE} requests/min (ceiling per 60 s: {CEILING})"),
        ("connection", f"rpm {CONNECTION_RPM or 'not set (learned)'}, "
                       + ("rate_limit_backend = the Redis" if SHARED else "no rate_limit_backend (control)")),
        ("wall time", f"{figures['wall_s']} s (DAG run {figures['dag_run_s']} s, generation {figures['generation_s']} s)"),
        ("shards per worker", ", ".join(f"{w}: {n}" for w, n in sorted(figures["shards_per_worker"].items()))),
        ("workloads per worker", ", ".join(f"{w}: {n}" for w, n in sorted(figures["workloads_per_worker"].items()))),
        ("whole minutes", f"{figures['whole_minutes']} accepted → {figures['throughput_over_r']}·R"),
        ("worst 60 s", f"{figures['worst_60s']} accepted (ceiling {CEILING})"),
        ("429 answers", f"{figures['http_429']} of {figures['requests']} requests ({figures['share_429']:.2%})"),
        ("images delivered", f"{figures['images']} / {figures['prompts']} (gateway charged {figures['charged_images']})"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\ncelery proof")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print("celery proof figures:", json.dumps(figures))


def _check_output(output: Path, prompt_ids: list[str]) -> int:
    """Every prompt has its one succeeded row and its file, of the recorded size; the number of images."""
    dataset = pq.read_table(output / "metadata.parquet").to_pandas()
    assert not dataset.duplicated(["prompt_id", "image_index"]).any()
    assert sorted(dataset["prompt_id"]) == sorted(prompt_ids)
    assert (dataset["status"] == "succeeded").all()
    for file_name, size in zip(dataset["file_name"], dataset["image_bytes"]):
        assert (output / file_name).stat().st_size == size, file_name
    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["complete"] is True, summary
    return len(dataset)


@pytest.mark.timeout(DEADLINE_S + 600)
def test_sharded_dag_on_celery_executor_shares_one_hidden_limit(tmp_path, redis_url, record_property):
    root = tmp_path
    (root / "dags").mkdir()
    (root / "home").mkdir()
    shutil.copy(REPO / "dags" / "synthetic_dataset_sharded.py", root / "dags")
    prompts = write_prompts(root / "prompts.parquet", "celery", SHARDS * ROWS_PER_SHARD)
    api_port = free_port()
    started = time.monotonic()
    previous = _interrupt_on_sigterm()
    try:
        with gateway_process("--rpm", str(RATE), "--limiter", LIMITER, "--latency", "0.2-0.6",
                             *GATEWAY_OPTIONS[LIMITER]) as gateway:
            deployment = CeleryDeployment(root, _environment(root, redis_url, gateway.api_base, api_port))
            deployment.cli("db", "migrate", timeout=300)
            deployment.cli("pools", "set", "imagegen", str(SHARDS), "imagegen shards")
            try:
                workers = _start(deployment, root, api_port)
                _wait_until_ready(deployment, api_port, workers)
                run = _run_dag(deployment)
            finally:
                deployment.stop()
            stats = gateway.stats()
    finally:
        signal.signal(signal.SIGTERM, previous)
    wall_s = time.monotonic() - started

    assert run.state == "success", (run.tasks, deployment.log_tail("scheduler"))
    shards = [t for t in run.tasks if t[0] == "generate_shard"]
    assert [t[1] for t in shards] == list(range(SHARDS)), run.tasks
    assert all(t[2] == "success" for t in run.tasks), run.tasks
    # Every task ran on a Celery worker (the hostname only the workers' environment gives), shards on both.
    assert {t[4] for t in run.tasks} <= set(workers), run.tasks
    per_worker = Counter(t[4] for t in shards)
    assert set(per_worker) == set(workers), per_worker

    prompt_ids = pq.read_table(prompts).column("id").to_pylist()
    images = _check_output(root / "output" / DAG_ID, prompt_ids)
    rates = _rate_figures(stats)
    figures = {
        "wall_s": round(wall_s, 1), "dag_run_s": round(run.dag_run_s, 1), "rate": RATE, "limiter": LIMITER,
        "connection_rpm": int(CONNECTION_RPM) if CONNECTION_RPM else None, "shared_backend": SHARED,
        "shards": SHARDS, "rows_per_shard": ROWS_PER_SHARD, "prompts": len(prompt_ids), "images": images,
        "shards_per_worker": dict(per_worker), "shard_tries": {t[1]: t[3] for t in shards},
        "workloads_per_worker": _workload_lines(deployment, workers), **rates,
    }
    record_property("figures", figures)
    _print_table(figures)

    assert images == len(prompt_ids)
    assert rates["charged_images"] == images, "an image was paid for twice"
    assert len(rates["whole_minutes"]) >= 2, rates
    assert max(rates["whole_minutes"]) <= CEILING and rates["worst_60s"] <= CEILING, rates
    assert rates["throughput_over_r"] >= 0.8, rates
    assert rates["share_429"] <= MAX_429_SHARE, f"the shards learned the limit with too many refusals: {rates}"

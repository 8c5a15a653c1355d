"""Helpers of the scale tests: real processes on loopback (the gateway as a subprocess, CLI workers), prompt
tables, the gateway's stats, and process-group clean-up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
_LISTENING = re.compile(r"imagegen gateway listening on (http://\S+)")


def write_prompts(path: Path, prefix: str, rows: int) -> Path:
    """A prompt table of ``rows`` distinct prompts with ids ``<prefix>-00000``…"""
    pq.write_table(
        pa.table(
            {
                "id": [f"{prefix}-{i:05d}" for i in range(rows)],
                "prompt": [f"{prefix}: a lighthouse on a cliff at dusk, variation {i}" for i in range(rows)],
            }
        ),
        path,
    )
    return path


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this interpreter's packages, the repo importable."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def airflow_env(root: Path, *, api_port: int, executor: str, parallelism: int, label: str,
                **extra: str) -> dict[str, str]:
    """The environment of an Airflow deployment in ``root`` (``home/`` on SQLite, ``dags/``) whose API server
    listens on 127.0.0.1:``api_port``: what the sharded-DAG, deferred-batch and Celery tests share."""
    return child_env(
        AIRFLOW_HOME=str(root / "home"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{root / 'home' / 'airflow.db'}",
        AIRFLOW__CORE__EXECUTOR=executor,
        AIRFLOW__CORE__PARALLELISM=str(parallelism),
        AIRFLOW__CORE__DAGS_FOLDER=str(root / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{api_port}/execution/",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(api_port),
        AIRFLOW__API_AUTH__JWT_SECRET=f"imagegen-{label}-" + os.urandom(8).hex(),
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        **extra,
    )


def stop_group(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout)


@dataclass
class GatewayProcess:
    process: subprocess.Popen
    base_url: str
    output: list[str] = field(default_factory=list)

    @property
    def api_base(self) -> str:
        return self.base_url + "/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(self.base_url + "/_gateway/stats", timeout=10) as response:
            return json.load(response)


@contextmanager
def gateway_process(*options: str, startup_timeout: float = 30.0) -> Iterator[GatewayProcess]:
    """``python -m imagegen_gateway --port 0 OPTIONS…`` in its own process group, until the block ends."""
    process = subprocess.Popen(
        [PYTHON, "-m", "imagegen_gateway", "--host", "127.0.0.1", "--port", "0", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(),
        start_new_session=True,
    )
    lines: list[str] = []
    found: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            match = _LISTENING.search(line)
            if match and not found:
                found.append(match.group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not found:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start:\n" + "".join(lines))
            time.sleep(0.02)
        yield GatewayProcess(process=process, base_url=found[0], output=lines)
    finally:
        stop_group(process)


def per_second(timeline: Iterable[Sequence[int]]) -> list[int]:
    """``accepted_timeline`` ([[unix_second, count], …]) as one count per second, gaps filled with 0."""
    counts = {int(second): int(count) for second, count in timeline}
    if not counts:
        return []
    return [counts.get(second, 0) for second in range(min(counts), max(counts) + 1)]


def max_window(counts: Sequence[int], seconds: int) -> int:
    """The most requests in any ``seconds`` consecutive whole seconds."""
    if len(counts) <= seconds:
        return sum(counts)
    window = sum(counts[:seconds])
    best = window
    for index in range(seconds, len(counts)):
        window += counts[index] - counts[index - seconds]
        best = max(best, window)
    return best

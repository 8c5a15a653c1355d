"""Helpers for the operator tests: a small prompt table, connections given as ``AIRFLOW_CONN_*`` env JSON
(the Task SDK's environment-variables secrets backend: no metadata DB, no supervisor) and a minimal context."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from airflow.sdk.execution_time.context import OutletEventAccessors

#: The connection password of every test connection: long enough that Airflow's masker would hide it, so a
#: leak shows up only if we wrote it somewhere ourselves.
SECRET = "sk-imagegen-TEST-SECRET-5f0c2a91d7"

#: Fast, priced requests: small images, returned inline.
FAST_REQUEST = {"model": "dall-e-2", "size": "256x256", "response_format": "b64_json"}


def write_prompts(path: Path, prompts: list[str], *, prefix: str = "p") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"id": [f"{prefix}{i:03d}" for i in range(len(prompts))], "prompt": prompts})
    frame.to_parquet(path, index=False)
    return path


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    """Six prompts, ids ``p000``..``p005``."""
    return write_prompts(tmp_path / "prompts.parquet", [f"a lighthouse at dusk, study {i}" for i in range(6)])


@pytest.fixture
def make_conn(monkeypatch):
    """``conn_id = make_conn(host=..., port=..., extra={...})``: a fresh ``imagegen`` connection as env JSON."""

    def make(host: str = "local", *, port: int | None = None, password: str | None = SECRET, **extra: Any) -> str:
        conn_id = f"imagegen_test_{uuid.uuid4().hex[:10]}"
        body: dict[str, Any] = {"conn_type": "imagegen", "host": host, "extra": extra}
        if port is not None:
            body["port"] = port
        if password is not None:
            body["password"] = password
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(body))
        return conn_id

    return make


@pytest.fixture
def loopback_conn(make_conn):
    """``loopback_conn(gateway_handle, **extra)``: a connection to a bundled gateway on a real socket."""

    def make(handle, **extra: Any) -> str:
        return make_conn("127.0.0.1", port=handle.port, **extra)

    return make


def make_context(run_id: str = "manual__test", dag_id: str = "imagegen_unit") -> dict[str, Any]:
    """What ``execute()`` reads from Airflow's context, with Airflow 3.3's own outlet-event accessors."""
    return {"run_id": run_id, "dag": SimpleNamespace(dag_id=dag_id), "outlet_events": OutletEventAccessors()}


def dagbag_class():
    """Airflow 3.3 parses DAG files with ``airflow.dag_processing.dagbag``; 3.0 with ``airflow.models.dagbag``."""
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.1
        from airflow.models.dagbag import DagBag
    return DagBag


def run_dag_file(source: str, dag_id: str, folder: Path, monkeypatch) -> Any:
    """Write ``source`` as a DAG file in its own DAG bundle and run it with ``dag.test()``; returns the DagRun.

    Airflow 3.3's ``dag.test()`` runs only DAGs that a bundle serialized to the DB, hence the bundle (given as
    an env var, keeping the default one so that the shared test DB keeps it active)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{dag_id}.py").write_text(source)
    bundles = [
        {"name": "imagegen-operator-tests", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
         "kwargs": {"path": str(folder)}},
        {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle", "kwargs": {}},
    ]
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(bundles))
    bag = dagbag_class()(dag_folder=str(folder))
    assert not bag.import_errors, bag.import_errors
    if bag.__module__ == "airflow.models.dagbag":
        # Airflow 3.0/3.1's dag.test() does not register the DAG's Assets, and refuses to run a task whose outlet
        # Asset is not active: write the parse result as the DAG processor would.
        from airflow.dag_processing.bundles.manager import DagBundlesManager

        DagBundlesManager().sync_bundles_to_db()
        if hasattr(bag, "sync_to_db"):  # Airflow 3.0
            bag.sync_to_db("imagegen-operator-tests", None)
        else:  # Airflow 3.1
            from airflow.models.dagbag import sync_bag_to_db

            sync_bag_to_db(bag, "imagegen-operator-tests", None)
    return bag.dags[dag_id].test()

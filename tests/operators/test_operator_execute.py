"""ImageGenerationOperator.execute() with a minimal context: no metadata DB, connections from
``AIRFLOW_CONN_*`` env JSON, the bundled gateway in-process (host ``local``) or on a loopback socket."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pandas as pd
import pytest
from airflow.sdk import ObjectStoragePath
from PIL import Image

from imagegen_gateway import GatewayConfig
from imagegen_provider.engine.schema import COLUMNS
from imagegen_provider.hooks._airflow import AirflowException, AirflowFailException
from imagegen_provider.operators.image_generation import ImageGenerationOperator

from .conftest import FAST_REQUEST, SECRET, make_context, write_prompts


def generate(conn_id: str, prompts, output, **kwargs) -> ImageGenerationOperator:
    params = {**FAST_REQUEST, **kwargs.pop("request", {})}
    return ImageGenerationOperator(
        task_id=kwargs.pop("task_id", "generate"),
        prompts_path=prompts,
        output_path=output,
        imagegen_conn_id=conn_id,
        progress_interval=kwargs.pop("progress_interval", 60.0),
        **params,
        **kwargs,
    )


def all_file_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_execute_generates_and_returns_a_small_summary(prompts_file, tmp_path, make_conn):
    conn_id = make_conn()
    output = tmp_path / "out"
    op = generate(conn_id, str(prompts_file), str(output), images_per_prompt=2, seed=7)
    context = make_context(run_id="manual__unit", dag_id="unit_dag")

    result = op.execute(context)

    encoded = json.dumps(result)
    assert len(encoded.encode()) < 4096
    run, dataset = result["run"], result["dataset"]
    assert run["total_images"] == 12 and run["succeeded"] == 12 and run["failed"] == 0
    assert run["cost_usd"] > 0
    assert run["output_uri"] == f"file://{output}"
    assert run["metadata_uri"] == f"file://{output}/metadata"
    assert dataset["dataset_uri"] == f"file://{output}/metadata.parquet"
    assert dataset["succeeded"] == 12 and dataset["complete"] is True
    assert dataset["total_cost_usd"] == pytest.approx(run["cost_usd"])

    table = pd.read_parquet(output / "metadata.parquet")
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == 12
    expected = {(f"p{i:03d}", k) for i in range(6) for k in range(2)}
    assert set(zip(table.prompt_id, table.image_index, strict=True)) == expected
    assert set(table.run_id) == {"manual__unit"}
    assert set(table.dag_id) == {"unit_dag"} and set(table.task_id) == {"generate"}
    assert table.seed.nunique() == 12
    for name in table.file_name:
        with Image.open(output / name) as image:
            image.verify()
    assert (output / "run_summary.json").exists()

    # The metadata Asset event carries the run's numbers.
    event = context["outlet_events"][op.metadata_asset]
    assert event.extra == {
        "output_uri": run["output_uri"],
        "metadata_uri": run["metadata_uri"],
        "dataset_uri": dataset["dataset_uri"],
        "succeeded": 12,
        "cost_usd": run["cost_usd"],
    }
    assert len(context["outlet_events"]) == 1


def test_transient_failures_fail_the_task(gateway_factory, loopback_conn, prompts_file, tmp_path):
    handle = gateway_factory(GatewayConfig(fail_503_rate=1.0))
    conn_id = loopback_conn(handle, max_attempts=1)
    op = generate(conn_id, str(prompts_file), str(tmp_path / "out"))
    with pytest.raises(AirflowException, match="6 of 6 images failed") as info:
        op.execute(make_context())
    assert not isinstance(info.value, AirflowFailException)  # a retry may fix it
    assert handle.stats()["generation_requests"] == 6  # max_attempts=1: one request per image


def test_transient_failures_below_the_threshold_pass(gateway_factory, loopback_conn, prompts_file, tmp_path):
    handle = gateway_factory(GatewayConfig(fail_503_rate=1.0))
    conn_id = loopback_conn(handle, max_attempts=1)
    op = generate(conn_id, str(prompts_file), str(tmp_path / "out"), max_failed_fraction=1.0)
    result = op.execute(make_context())
    assert result["run"]["failed"] == 6 and result["run"]["succeeded"] == 0
    assert sum(result["run"]["failures_by_type"].values()) == 6


def test_permanent_failures_do_not_fail_the_task(gateway, loopback_conn, tmp_path):
    prompts = write_prompts(
        tmp_path / "prompts.parquet",
        ["a quiet harbour", "a forbidden-content scene", "a mountain hut", "an old bridge"],
    )
    conn_id = loopback_conn(gateway)
    output = tmp_path / "out"
    op = generate(conn_id, str(prompts), str(output), max_failed_fraction=0.0)
    result = op.execute(make_context())
    assert result["run"]["succeeded"] == 3 and result["run"]["failed"] == 1
    assert result["run"]["failures_by_type"] == {"ContentPolicyError": 1}
    assert gateway.stats()["content_policy_rejections"] == 1
    assert result["dataset"]["failed"] == 1 and result["dataset"]["complete"] is False
    assert sorted(pd.read_parquet(output / "metadata.parquet").prompt_id) == ["p000", "p002", "p003"]


def test_bad_key_fails_without_retry(gateway_factory, loopback_conn, tmp_path, caplog):
    prompts = write_prompts(tmp_path / "prompts.parquet", [f"a windmill, take {i}" for i in range(20)])
    handle = gateway_factory(GatewayConfig(api_key="the-only-valid-key"))
    conn_id = loopback_conn(handle, max_in_flight=1)  # password: SECRET, which the gateway refuses
    output = tmp_path / "out"
    op = generate(conn_id, str(prompts), str(output))
    with caplog.at_level(logging.DEBUG), pytest.raises(AirflowFailException, match="fatal") as info:
        op.execute(make_context())
    assert SECRET not in str(info.value)
    # The batch stops at the first 401 instead of sending every request (at most the dispatch window).
    assert 1 <= handle.stats()["generation_requests"] <= 3
    assert SECRET.encode() not in all_file_bytes(output)
    assert SECRET not in caplog.text
    assert all(SECRET not in repr(r.args) for r in caplog.records)


def test_task_retry_resumes_without_new_requests(gateway_factory, loopback_conn, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.parquet", [f"a tidal pool, view {i}" for i in range(10)])
    output = str(tmp_path / "out")
    flaky = gateway_factory(GatewayConfig(fail_503_rate=0.5, fault_seed=3))
    first = generate(loopback_conn(flaky, max_attempts=1), str(prompts), output)
    with pytest.raises(AirflowException) as info:
        first.execute(make_context(run_id="manual__retry"))
    assert not isinstance(info.value, AirflowFailException)
    done = pd.read_parquet(Path(output) / "metadata.parquet")
    assert 0 < len(done) < 10, "the fault seed should let some images through"
    failed_first = 10 - len(done)

    # The retry (a fresh operator, as in a new task attempt) asks only for the images still missing.
    healthy = gateway_factory()
    conn_id = loopback_conn(healthy, max_attempts=1)
    second = generate(conn_id, str(prompts), output)
    result = second.execute(make_context(run_id="manual__retry"))
    assert healthy.stats()["generation_requests"] == failed_first
    assert result["run"]["skipped_existing"] == len(done)
    assert result["run"]["succeeded"] == failed_first
    assert result["dataset"]["succeeded"] == 10 and result["dataset"]["complete"] is True

    # A third attempt sends nothing at all.
    third = generate(conn_id, str(prompts), output)
    again = third.execute(make_context(run_id="manual__retry"))
    assert healthy.stats()["generation_requests"] == failed_first
    assert again["run"]["skipped_existing"] == 10 and again["run"]["succeeded"] == 0
    # Images written by the first attempt were kept, not regenerated.
    table = pd.read_parquet(Path(output) / "metadata.parquet")
    kept = table.set_index("prompt_id").loc[done.prompt_id, "image_sha256"]
    assert list(kept) == list(done.image_sha256)


def test_dry_run_sends_nothing(gateway, loopback_conn, prompts_file, tmp_path):
    output = tmp_path / "out"
    op = generate(loopback_conn(gateway), str(prompts_file), str(output), images_per_prompt=3, dry_run=True)
    result = op.execute(make_context())
    assert gateway.stats()["generation_requests"] == 0
    run = result["run"]
    assert run["dry_run"] is True and run["total_images"] == 18 and run["succeeded"] == 0
    assert run["estimated_cost_usd"] > 0 and run["cost_usd"] == 0
    assert "dataset" not in result
    assert not (output / "images").exists() and not (output / "metadata.parquet").exists()


def test_object_storage_path_on_local_files(prompts_file, tmp_path, make_conn):
    prompts = ObjectStoragePath(f"file://{prompts_file}")
    output = ObjectStoragePath(f"file://{tmp_path}/osp-out/")
    op = generate(make_conn(), prompts, output)
    assert op.metadata_asset.uri == f"file://{tmp_path}/osp-out/metadata.parquet"
    op.render_template_fields({"ds": "2026-01-01"})
    context = make_context()
    result = op.execute(context)
    assert result["run"]["succeeded"] == 6
    assert result["dataset"]["dataset_uri"] == f"file://{tmp_path}/osp-out/metadata.parquet"
    assert len(pd.read_parquet(tmp_path / "osp-out" / "metadata.parquet")) == 6
    assert len(list((tmp_path / "osp-out" / "images").iterdir())) == 6
    assert context["outlet_events"][op.metadata_asset].extra["succeeded"] == 6


@pytest.fixture
def s3_store(s3_server):
    """Attach an S3 filesystem for a throwaway conn id. There is no Amazon provider in this environment, so
    ``ObjectStoragePath("s3://…", conn_id=…)`` has no registered s3 filesystem of its own; ``attach(fs=…)`` is
    Airflow's supported way to hand it one."""
    import s3fs
    from airflow.sdk.io import attach
    from airflow.sdk.io.store import _STORE_CACHE

    conn_id = "imagegen_test_moto"
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    alias = f"s3-{conn_id}"
    previous = _STORE_CACHE.pop(alias, None)
    attach("s3", conn_id=conn_id, fs=fs)
    yield conn_id, fs
    _STORE_CACHE.pop(alias, None)
    if previous is not None:
        _STORE_CACHE[alias] = previous


def test_object_storage_path_on_s3(s3_server, s3_store, prompts_file, tmp_path, make_conn):
    conn_id, fs = s3_store
    bucket = s3_server["bucket"]
    key = f"operator-{uuid.uuid4().hex[:8]}"
    fs.put_file(str(prompts_file), f"{bucket}/{key}/prompts.parquet")
    prompts = ObjectStoragePath(f"s3://{bucket}/{key}/prompts.parquet", conn_id=conn_id)
    output = ObjectStoragePath(f"s3://{bucket}/{key}/out/", conn_id=conn_id)
    op = generate(make_conn(), prompts, output, images_per_prompt=2)
    assert op.metadata_asset.uri == f"s3://{bucket}/{key}/out/metadata.parquet"  # no conn id in the Asset
    context = make_context()
    result = op.execute(context)
    assert result["run"]["succeeded"] == 12
    assert result["run"]["output_uri"] == f"s3://{bucket}/{key}/out"
    assert result["dataset"]["dataset_uri"] == f"s3://{bucket}/{key}/out/metadata.parquet"
    with fs.open(f"{bucket}/{key}/out/metadata.parquet", "rb") as handle:
        table = pd.read_parquet(handle)
    assert len(table) == 12
    assert all(uri.startswith(f"s3://{bucket}/{key}/out/images/") for uri in table.image_uri)
    assert len(fs.find(f"{bucket}/{key}/out/images")) == 12
    assert context["outlet_events"][op.metadata_asset].extra["dataset_uri"] == result["dataset"]["dataset_uri"]


def test_secret_never_leaves_the_connection(gateway, loopback_conn, tmp_path, caplog):
    prompts = write_prompts(
        tmp_path / "prompts.parquet", ["a red kite", "forbidden-content here", "a blue kite", "a green kite"]
    )
    output = tmp_path / "out"
    conn_id = loopback_conn(gateway)
    op = generate(conn_id, str(prompts), str(output))
    with caplog.at_level(logging.DEBUG):
        result = op.execute(make_context())
    assert result["run"]["succeeded"] == 3  # the key was sent and accepted
    assert op.hook.settings.api_key == SECRET
    assert SECRET not in json.dumps(result)
    assert SECRET.encode() not in all_file_bytes(output)
    assert caplog.records, "the operator logs through the standard logging module"
    assert SECRET not in caplog.text
    assert all(SECRET not in repr(r.args) and SECRET not in str(r.msg) for r in caplog.records)
    # Control: nothing masks the secret on its way into caplog, so its absence above is meaningful.
    logging.getLogger("imagegen_provider.tests").warning("control %s", SECRET)
    assert SECRET in caplog.text


def test_shard_then_finalize_operator(prompts_file, tmp_path, make_conn):
    from imagegen_provider.operators.image_generation import ImageDatasetFinalizeOperator

    output = str(tmp_path / "out")
    conn_id = make_conn()
    shard = generate(conn_id, str(prompts_file), output, shard={"start": 0, "stop": 4, "label": "rows-0-4"})
    assert shard.metadata_asset is None
    context = make_context()
    result = shard.execute(context)
    assert result["run"]["succeeded"] == 4 and result["run"]["shard"] == "rows-0-4"
    assert "dataset" not in result  # a shard does not finalize
    assert not (tmp_path / "out" / "metadata.parquet").exists()
    assert len(context["outlet_events"]) == 0

    strict = ImageDatasetFinalizeOperator(
        task_id="finalize", output_path=output, prompts_path=str(prompts_file), fail_if_incomplete=True
    )
    with pytest.raises(AirflowException, match="0 failed and 2 missing"):
        strict.execute(make_context())

    lenient = ImageDatasetFinalizeOperator(task_id="finalize", output_path=output, prompts_path=str(prompts_file))
    context = make_context()
    brief = lenient.execute(context)["dataset"]
    assert brief["succeeded"] == 4 and brief["missing"] == 2 and brief["complete"] is False
    assert len(json.dumps(brief)) < 4096
    assert context["outlet_events"][lenient.metadata_asset].extra == {
        "output_uri": f"file://{output}",
        "dataset_uri": f"file://{output}/metadata.parquet",
        "succeeded": 4,
        "cost_usd": brief["total_cost_usd"],
    }
    assert len(pd.read_parquet(tmp_path / "out" / "metadata.parquet")) == 4

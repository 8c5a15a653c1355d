"""ImageGenerationOperator / ImageDatasetFinalizeOperator construction, templating and metadata_asset_for:
parse-time behaviour, no metadata DB, no gateway."""

from __future__ import annotations

import os
from functools import cached_property
from types import SimpleNamespace

import pendulum
import pytest
from airflow.sdk import DAG, Asset, BaseOperator, ObjectStoragePath, task

from imagegen_provider.hooks.image_generation import ImageGenerationHook
from imagegen_provider.operators.image_generation import (
    ImageDatasetFinalizeOperator,
    ImageGenerationOperator,
    metadata_asset_for,
)


def test_positional_arguments_are_rejected():
    with pytest.raises(TypeError):
        ImageGenerationOperator("generate", "prompts.parquet", "out")  # type: ignore[misc]
    with pytest.raises(TypeError):
        ImageDatasetFinalizeOperator("finalize", "out")  # type: ignore[misc]


def test_construction_does_no_io(tmp_path, monkeypatch):
    missing_conn = "imagegen_never_defined_anywhere"
    monkeypatch.delenv(f"AIRFLOW_CONN_{missing_conn.upper()}", raising=False)
    missing_prompts = tmp_path / "no" / "such" / "prompts.parquet"
    output = tmp_path / "not-yet" / "out"
    op = ImageGenerationOperator(
        task_id="generate",
        prompts_path=str(missing_prompts),
        output_path=str(output),
        imagegen_conn_id=missing_conn,
        max_cost_usd=1.0,
    )
    assert op.prompts_path == str(missing_prompts)
    assert op.imagegen_conn_id == missing_conn
    assert "hook" not in op.__dict__  # the connection is looked up at execute time, not parse time
    assert not output.exists() and not missing_prompts.parent.exists()
    # Only at execute time does the missing connection surface.
    with pytest.raises(Exception, match=missing_conn):
        op.hook.settings  # noqa: B018


def test_defaults_and_static_outlet(tmp_path):
    op = ImageGenerationOperator(task_id="generate", prompts_path="p.parquet", output_path=str(tmp_path / "out"))
    assert op.imagegen_conn_id == ImageGenerationHook.default_conn_name == "imagegen_default"
    expected = Asset(uri=f"file://{tmp_path}/out/metadata.parquet", name=f"imagegen:file://{tmp_path}/out")
    assert op.metadata_asset == expected
    assert op.outlets == [expected]


def test_metadata_asset_false_or_explicit(tmp_path):
    none = ImageGenerationOperator(
        task_id="a", prompts_path="p", output_path=str(tmp_path), metadata_asset=False
    )
    assert none.metadata_asset is None and none.outlets == []
    mine = Asset(uri="s3://bucket/mine/metadata.parquet", name="mine")
    explicit = ImageGenerationOperator(task_id="b", prompts_path="p", output_path=str(tmp_path), metadata_asset=mine)
    assert explicit.metadata_asset == mine and explicit.outlets == [mine]
    other = Asset(uri="s3://bucket/other", name="other")
    kept = ImageGenerationOperator(task_id="c", prompts_path="p", output_path=str(tmp_path), outlets=[other])
    assert kept.outlets == [other]  # given outlets are not replaced


def test_only_a_finalizing_task_derives_the_dataset_asset(tmp_path):
    shard = {"start": 0, "stop": 3, "label": "rows-0-3"}
    out = str(tmp_path / "out")
    shard_op = ImageGenerationOperator(task_id="a", prompts_path="p", output_path=out, shard=shard)
    assert shard_op.metadata_asset is None and shard_op.outlets == []
    finalizing_shard = ImageGenerationOperator(
        task_id="b", prompts_path="p", output_path=out, shard=shard, finalize=True
    )
    assert finalizing_shard.metadata_asset == metadata_asset_for(out)
    not_finalizing = ImageGenerationOperator(task_id="c", prompts_path="p", output_path=out, finalize=False)
    assert not_finalizing.metadata_asset is None and not_finalizing.outlets == []
    mine = Asset(uri="s3://bucket/shards", name="shards")
    explicit = ImageGenerationOperator(task_id="d", prompts_path="p", output_path=out, shard=shard, metadata_asset=mine)
    assert explicit.outlets == [mine]


def test_hook_is_a_cached_property(make_conn):
    assert isinstance(ImageGenerationOperator.__dict__["hook"], cached_property)
    conn_id = make_conn(model="gpt-image-1")
    op = ImageGenerationOperator(task_id="g", prompts_path="p", output_path="out", imagegen_conn_id=conn_id)
    hook = op.hook
    assert isinstance(hook, ImageGenerationHook)
    assert hook.imagegen_conn_id == conn_id
    assert op.hook is hook
    assert hook.settings.is_local and hook.settings.model == "gpt-image-1"


def test_template_fields_render(tmp_path):
    assert {"prompts_path", "output_path", "model", "size", "request_params", "seed", "max_cost_usd", "shard"} <= set(
        ImageGenerationOperator.template_fields
    )
    op = ImageGenerationOperator(
        task_id="generate",
        prompts_path=str(tmp_path / "prompts-{{ ds_nodash }}.parquet"),
        output_path=str(tmp_path / "out" / "{{ ds }}"),
        model="{{ params.model }}",
        size="{{ params.size }}",
        request_params={"output_format": "{{ params.fmt }}"},
        seed="{{ 40 + 2 }}",
        max_cost_usd="{{ params.budget }}",
        params={"model": "gpt-image-1", "size": "1024x1024", "fmt": "webp", "budget": 2.5},
    )
    # A templated output cannot name an Asset at parse time.
    assert op.metadata_asset is None and op.outlets == []
    context = {"ds": "2026-03-04", "ds_nodash": "20260304", "params": op.params}
    op.render_template_fields(context)
    assert op.output_path == str(tmp_path / "out" / "2026-03-04")
    assert op.prompts_path == str(tmp_path / "prompts-20260304.parquet")
    assert op.model == "gpt-image-1" and op.size == "1024x1024"
    assert op.request_params == {"output_format": "webp"}
    assert op.seed == "42" and op.max_cost_usd == "2.5"


def test_rendered_strings_reach_the_run_config(make_conn, tmp_path):
    conn_id = make_conn()
    op = ImageGenerationOperator(
        task_id="generate",
        prompts_path="p.parquet",
        output_path=str(tmp_path / "{{ ds }}"),
        imagegen_conn_id=conn_id,
        model="dall-e-2",
        size="{{ params.size }}",
        seed="{{ 40 + 2 }}",
        max_cost_usd="{{ params.budget }}",
        params={"size": "256x256", "budget": 2.5},
    )
    op.render_template_fields({"ds": "2026-03-04", "params": op.params})
    config = op._run_config({"run_id": "manual__x", "dag": SimpleNamespace(dag_id="d")})
    assert config.base_seed == 42 and config.max_cost_usd == 2.5
    assert config.output == str(tmp_path / "2026-03-04")
    assert config.request_defaults == {"model": "dall-e-2", "size": "256x256"}
    assert config.labels == {"dag_id": "d", "task_id": "generate"}


def test_template_rendering_keeps_object_storage_paths(tmp_path):
    prompts = ObjectStoragePath(f"file://{tmp_path}/prompts.parquet")
    output = ObjectStoragePath(f"file://{tmp_path}/out/")
    op = ImageGenerationOperator(task_id="g", prompts_path=prompts, output_path=output)
    op.render_template_fields({"ds": "2026-01-01"})
    assert isinstance(op.prompts_path, ObjectStoragePath) and op.prompts_path == prompts
    assert isinstance(op.output_path, ObjectStoragePath) and op.output_path == output


def test_request_params_may_come_from_an_upstream_task():
    with DAG(dag_id="imagegen_xcom_params", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):

        @task
        def choose() -> dict:
            return {"output_format": "webp"}

        params = choose()
        op = ImageGenerationOperator(task_id="g", prompts_path="p", output_path="out", request_params=params)
    assert op.request_params is params
    assert "choose" in op.upstream_task_ids


def test_finalize_operator_construction(tmp_path):
    op = ImageDatasetFinalizeOperator(task_id="f", output_path=str(tmp_path / "out"), prompts_path="nope.parquet")
    assert set(op.template_fields) == {"output_path", "prompts_path"}
    assert op.metadata_asset == metadata_asset_for(str(tmp_path / "out"))
    assert op.outlets == [op.metadata_asset]
    templated = ImageDatasetFinalizeOperator(task_id="t", output_path="s3://b/{{ ds }}")
    assert templated.metadata_asset is None and templated.outlets == []


class TestMetadataAssetFor:
    def test_absolute_path(self, tmp_path):
        asset = metadata_asset_for(str(tmp_path / "out"))
        assert isinstance(asset, Asset)
        assert asset.uri == f"file://{tmp_path}/out/metadata.parquet"
        assert asset.name == f"imagegen:file://{tmp_path}/out"

    def test_trailing_slash_and_relative_path(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        assert metadata_asset_for("rel/out/").uri == f"file://{os.path.abspath('rel/out')}/metadata.parquet"
        assert metadata_asset_for(str(tmp_path) + "/a/") == metadata_asset_for(str(tmp_path) + "/a")

    def test_url(self):
        asset = metadata_asset_for("s3://bucket/datasets/cats/")
        assert asset.uri == "s3://bucket/datasets/cats/metadata.parquet"
        assert asset.name == "imagegen:s3://bucket/datasets/cats"

    def test_object_storage_path(self, tmp_path):
        assert metadata_asset_for(ObjectStoragePath(f"file://{tmp_path}/out")).uri == (
            f"file://{tmp_path}/out/metadata.parquet"
        )

    def test_connection_id_is_not_part_of_the_asset(self):
        # str(ObjectStoragePath("s3://bucket/x", conn_id="aws_prod")) is "s3://aws_prod@bucket/x".
        with_conn = metadata_asset_for("s3://aws_prod@bucket/datasets/cats")
        assert with_conn == metadata_asset_for("s3://bucket/datasets/cats")
        assert "aws_prod" not in with_conn.uri and "aws_prod" not in with_conn.name

    @pytest.mark.parametrize(
        "templated",
        ["/data/{{ ds }}/out", "s3://bucket/{{ dag_run.run_id }}", "/data/{% if params.x %}x{% endif %}"],
    )
    def test_templated_is_none(self, templated):
        assert metadata_asset_for(templated) is None


def test_dry_run_keyword_does_not_hide_base_operator_dry_run(tmp_path, caplog):
    op = ImageGenerationOperator(task_id="g", prompts_path="p", output_path=str(tmp_path), dry_run=True)
    assert op.estimate_only is True
    if hasattr(BaseOperator, "dry_run"):  # Airflow 3.3 (3.0's Task SDK has no dry_run())
        # BaseOperator.dry_run() (render templates and log, no execute) is still the method.
        assert op.dry_run.__func__ is BaseOperator.dry_run
        op.dry_run()
    else:
        assert "dry_run" not in vars(op)
    assert not (tmp_path / "images").exists()
    default = ImageGenerationOperator(task_id="h", prompts_path="p", output_path=str(tmp_path))
    assert default.estimate_only is False


class TestFailureClassification:
    """The task's verdict reads the error classes' flags, never a list of class names."""

    def test_known_kinds(self):
        from imagegen_provider.operators.image_generation import is_fatal_failure, is_permanent_failure

        assert is_permanent_failure("ContentPolicyError") and is_permanent_failure("RequestValidationError")
        assert is_permanent_failure("InvalidRow")
        assert not is_permanent_failure("RateLimitError") and not is_permanent_failure("ServerError")
        assert not is_permanent_failure("SomethingNobodyRaises")
        assert is_fatal_failure("AuthenticationError") and is_fatal_failure("InsufficientBalanceError")
        assert not is_fatal_failure("ContentPolicyError") and not is_fatal_failure("InvalidRow")

    def test_flags_of_a_new_error_class_are_honoured(self):
        from imagegen_provider.operators.image_generation import is_fatal_failure, is_permanent_failure
        from imagegen_provider.wire.errors import ImageGenError

        class RowTooSpicyError(ImageGenError):
            permanent = True

        class VaultSealedError(ImageGenError):
            fatal = True

        assert is_permanent_failure("RowTooSpicyError") and not is_fatal_failure("RowTooSpicyError")
        assert is_fatal_failure("VaultSealedError") and not is_permanent_failure("VaultSealedError")

    def test_a_fatal_kind_in_the_summary_fails_without_retry(self, tmp_path):
        from imagegen_provider.engine.runner import RunSummary
        from imagegen_provider.hooks._airflow import AirflowException
        from imagegen_provider.operators.image_generation import AirflowFailException

        op = ImageGenerationOperator(task_id="g", prompts_path="p", output_path=str(tmp_path))
        common = {
            "run_id": "r", "output_uri": "o", "metadata_uri": "m", "shard": "all", "total_images": 4,
            "succeeded": 2, "skipped_existing": 0, "not_attempted": 0, "cost_usd": 0.0, "duration_s": 1.0,
            "images_per_minute": 1.0,
        }
        with pytest.raises(AirflowFailException, match="AuthenticationError"):
            op._raise_for(RunSummary(failed=2, failures_by_type={"AuthenticationError": 2}, **common))
        with pytest.raises(AirflowException, match="2 of 4") as info:
            op._raise_for(RunSummary(failed=2, failures_by_type={"RateLimitError": 2}, **common))
        assert not isinstance(info.value, AirflowFailException)
        op._raise_for(RunSummary(failed=2, failures_by_type={"ContentPolicyError": 1, "InvalidRow": 1}, **common))

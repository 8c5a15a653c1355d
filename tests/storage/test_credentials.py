"""Storage credentials the CLI way (``--storage-options``, ``--prompts-storage-options``, as JSON or @file) with
no environment variables of the store, and never echoed, logged or written anywhere."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from imagegen_provider.cli import main
from imagegen_provider.engine import finalize_output

from ..engine._support import numbered, run_batch, write_prompts
from ._stores import Store, make_store

SMALL_ARGS = ["--model", "dall-e-2", "--size", "256x256", "--response-format", "b64_json"]
_STORE_ENV = ("AZURE_", "AWS_", "FSSPEC_", "GOOGLE_")


def _clean_env(tmp_path) -> dict[str, str]:
    """The test's environment without any store credentials or fsspec configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_STORE_ENV)}
    env.update(HOME=str(tmp_path), FSSPEC_CONFIG_DIR=str(tmp_path / "no-fsspec-config"))
    return env


def _imagegen(tmp_path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagegen_provider.cli", *argv],
        capture_output=True, text=True, timeout=240, env=_clean_env(tmp_path),
    )


def test_cli_writes_to_azurite_with_storage_options_and_no_azure_environment(tmp_path, azurite, s3_server):
    # The prompt table on S3 and the output on Azure: each store gets its own options.
    s3_options = s3_server["storage_options"]
    prompts = f"s3://{s3_server['bucket']}/cli-{uuid.uuid4().hex[:8]}/prompts.parquet"
    with s3fs.S3FileSystem(**s3_options).open(prompts, "wb") as handle:
        pq.write_table(pa.table({"id": ["c0", "c1", "c2"], "prompt": ["a lake", "a cliff", "a dune"]}), handle)
    options_file = tmp_path / "s3.json"
    options_file.write_text(json.dumps(s3_options))
    output = f"az://{azurite['container']}/cli-{uuid.uuid4().hex[:8]}"

    result = _imagegen(
        tmp_path, "run", prompts, output, *SMALL_ARGS, "--json",
        "--storage-options", json.dumps(azurite["storage_options"]),
        "--prompts-storage-options", f"@{options_file}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["run"]["succeeded"] == 3 and summary["dataset"]["complete"] is True
    assert summary["run"]["output_uri"] == output  # as written: az://, not abfs://
    for text in (result.stdout, result.stderr):
        assert azurite["key"] not in text and "connection_string" not in text

    # Finalize from the command line reaches the same output the same way.
    again = _imagegen(tmp_path, "finalize", output, "--prompts", prompts, "--no-contact-sheet",
                      "--storage-options", json.dumps(azurite["storage_options"]),
                      "--prompts-storage-options", f"@{options_file}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["succeeded"] == 3

    # Without the options the same command cannot reach the store (nothing came from the environment).
    bare = _imagegen(tmp_path, "finalize", output, "--no-contact-sheet")
    assert bare.returncode != 0


@pytest.mark.parametrize("text", ['{"connection_string": "AccountKey=sekrit-value-1234', '["sekrit-value-1234"]'])
def test_malformed_storage_options_are_refused_without_echoing_them(tmp_path, capsys, text):
    prompts = write_prompts(tmp_path / "p.parquet", ["a lake"], ids=["a"])
    with pytest.raises(SystemExit) as exit_info:
        main(["run", prompts, str(tmp_path / "out"), "--storage-options", text])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--storage-options" in err
    assert "sekrit-value-1234" not in err


@pytest.fixture(params=["s3", "az"])
def remote_store(request, tmp_path) -> Store:
    return make_store(request.param, request, tmp_path)


def _with_secret(store: Store) -> tuple[dict, str]:
    """The store's options with a distinctive secret in them (moto takes any key; Azurite's is published)."""
    options = json.loads(json.dumps(store.storage_options))
    if store.kind == "s3":
        secret = "S3-SECRET-" + uuid.uuid4().hex
        options.update(key="AKIA" + uuid.uuid4().hex[:16].upper(), secret=secret)
        return options, secret
    return options, options["connection_string"].split("AccountKey=")[1].split(";")[0]


async def test_secrets_in_storage_options_never_reach_logs_metadata_or_summary(
    remote_store: Store, tmp_path, gateway, caplog
):
    options, secret = _with_secret(remote_store)
    ids, texts = numbered(4)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    caplog.set_level(logging.DEBUG)  # everything every library logs, the storage SDKs' requests included
    summary = await run_batch(gateway, prompts=prompts, output=remote_store.url, output_storage_options=options)
    report = finalize_output(remote_store.url, prompts=prompts, output_storage_options=options)
    assert summary.succeeded == 4 and report.complete
    fs = remote_store.fs
    written = [p for p in fs.find(remote_store.path("")) if not p.endswith(".png")]
    assert any(p.endswith("run_summary.json") for p in written) and any("/metadata/" in p for p in written)
    texts_seen = [caplog.text, json.dumps(summary.to_dict()), json.dumps(report.brief()), repr(summary)]
    texts_seen += [fs.cat_file(p).decode("latin-1") for p in written]
    assert len(caplog.records) > 20  # the debug log did run
    for text in texts_seen:
        assert secret not in text

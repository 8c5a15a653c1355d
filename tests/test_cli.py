"""``imagegen`` from the command line: run (bundled in-process gateway or a URL), exit codes, the API key
from the environment and never printed, dry runs, plan, finalize and the gateway's documented options."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagegen_gateway import GatewayConfig
from imagegen_provider.cli import ENV_API_KEY, main

SECRET = "sk-cli-secret-key-0123456789abcdef"
SMALL_ARGS = ["--model", "dall-e-2", "--size", "256x256", "--response-format", "b64_json"]


@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch):
    monkeypatch.delenv(ENV_API_KEY, raising=False)


def _prompts(tmp_path: Path, texts: list[str], name: str = "prompts.parquet") -> str:
    path = tmp_path / name
    pq.write_table(pa.table({"id": [f"c{i}" for i in range(len(texts))], "prompt": texts}), path)
    return str(path)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_without_base_url_uses_the_bundled_gateway_in_process(tmp_path, capsys, monkeypatch):
    # No gateway listens anywhere: only the in-process one can answer.
    import httpx

    def no_sockets(*_args, **_kwargs):
        raise AssertionError("the bundled gateway must be served in-process, not over a socket")

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", no_sockets)
    prompts = _prompts(tmp_path, ["a quiet harbour", "a windmill", "a glacier"])
    output = tmp_path / "out"
    code, out, err = _run(capsys, "run", prompts, str(output), *SMALL_ARGS, "--images-per-prompt", "2")
    assert code == 0, err
    assert "6 succeeded, 0 failed, 0 already done, 0 not attempted of 6 images" in out
    assert "cost $0.0960" in out
    assert f"metadata: file://{output}/metadata" in out
    assert f"dataset:  file://{output}/metadata.parquet" in out
    dataset = pd.read_parquet(output / "metadata.parquet")
    assert len(dataset) == 6 and (dataset["status"] == "succeeded").all()
    assert json.loads((output / "run_summary.json").read_text())["complete"] is True


def test_exit_code_is_non_zero_when_an_image_failed(tmp_path, capsys):
    prompts = _prompts(tmp_path, ["a lake", "forbidden-content please", "a cliff"])
    code, out, _err = _run(capsys, "run", prompts, str(tmp_path / "out"), *SMALL_ARGS)
    assert code == 1
    assert "2 succeeded, 1 failed" in out and "failures: ContentPolicyError=1" in out
    # Rerun: the two images are skipped, the refused one fails again; still non-zero.
    code, out, _err = _run(capsys, "run", prompts, str(tmp_path / "out"), *SMALL_ARGS)
    assert code == 1 and "0 succeeded, 1 failed, 2 already done" in out


def test_json_summary(tmp_path, capsys):
    prompts = _prompts(tmp_path, ["a lake", "a cliff"])
    code, out, _err = _run(capsys, "run", prompts, str(tmp_path / "out"), *SMALL_ARGS, "--json", "--seed", "9")
    assert code == 0
    result = json.loads(out)
    assert result["run"]["succeeded"] == 2 and result["run"]["cost_usd"] == pytest.approx(0.032)
    assert result["dataset"]["complete"] is True and result["dataset"]["succeeded"] == 2


def test_api_key_comes_from_the_environment_and_is_never_printed(
    tmp_path, capsys, caplog, gateway_factory, monkeypatch
):
    gateway = gateway_factory(GatewayConfig(api_key=SECRET))
    prompts = _prompts(tmp_path, ["a lake", "a cliff"])
    base = ["--base-url", f"{gateway.base_url}/v1", *SMALL_ARGS, "--max-in-flight", "2"]
    caplog.set_level(logging.DEBUG)

    monkeypatch.setenv(ENV_API_KEY, SECRET)
    code, out, err = _run(capsys, "run", prompts, str(tmp_path / "env"), *base)
    assert code == 0, err
    assert "2 succeeded" in out
    printed = out + err + caplog.text

    # A wrong key on the command line wins over the environment: 401 stops the run, the key is not echoed.
    wrong = "sk-wrong-cli-key-9876543210fedcba"
    code, out, err = _run(capsys, "run", prompts, str(tmp_path / "wrong"), *base, "--api-key", wrong)
    assert code == 1
    assert "stopped: fatal gateway error: HTTP 401" in out
    printed += out + err + caplog.text
    monkeypatch.delenv(ENV_API_KEY)
    code, out, err = _run(capsys, "run", prompts, str(tmp_path / "none"), *base, "--json")
    assert code == 1 and json.loads(out)["run"]["stopped_reason"].startswith("fatal")
    printed += out + err + caplog.text
    assert SECRET not in printed and wrong not in printed
    by_status = gateway.stats()["by_status"]
    assert by_status["200"] == 2 and 2 <= by_status["401"] <= 4  # each 401 run stopped within --max-in-flight


def test_dry_run_calls_nothing(tmp_path, capsys, gateway):
    prompts = _prompts(tmp_path, ["a lake", "a cliff", ""])
    output = tmp_path / "out"
    code, out, err = _run(
        capsys, "run", prompts, str(output), "--base-url", f"{gateway.base_url}/v1", "--api-key", SECRET,
        "--model", "dall-e-3", "--images-per-prompt", "2", "--dry-run",
    )
    assert code == 0, err
    assert "dry run: estimated cost $0.1600 (0 images without a known price)" in out
    assert "0 succeeded, 2 failed, 0 already done, 4 not attempted of 6 images" in out
    assert gateway.stats()["generation_requests"] == 0 and gateway.stats()["total_requests"] == 0
    assert not output.exists()
    assert SECRET not in out + err


def test_rows_shard_and_finalize_command(tmp_path, capsys):
    prompts = _prompts(tmp_path, ["a", "b", "c", "d"])
    output = str(tmp_path / "out")
    code, _out, _err = _run(capsys, "run", prompts, output, *SMALL_ARGS, "--rows", "0:2", "--no-finalize")
    assert code == 0
    assert not (tmp_path / "out" / "metadata.parquet").exists()
    code, out, _err = _run(capsys, "finalize", output, "--prompts", prompts)
    assert code == 1 and json.loads(out)["missing"] == 2
    code, _out, _err = _run(capsys, "run", prompts, output, *SMALL_ARGS, "--rows", "2:", "--no-finalize")
    assert code == 0
    code, out, _err = _run(capsys, "finalize", output, "--prompts", prompts)
    assert code == 0 and json.loads(out)["complete"] is True
    assert len(pd.read_parquet(tmp_path / "out" / "metadata.parquet")) == 4


def test_plan_prints_shards_as_json(tmp_path, capsys):
    prompts = _prompts(tmp_path, [f"p{i}" for i in range(10)])
    code, out, _err = _run(capsys, "plan", prompts, "--shard-size", "4")
    assert code == 0
    shards = json.loads(out)
    assert [(s["start"], s["stop"]) for s in shards] == [(0, 4), (4, 8), (8, 10)]
    code, out, _err = _run(capsys, "plan", prompts, "--shard-size", "1", "--max-shards", "3")
    assert len(json.loads(out)) == 3


def test_custom_columns_on_every_command(tmp_path, capsys):
    path = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"key": ["k1", "k2"], "caption": ["a tram", "a ferry"]}), path)
    output = str(tmp_path / "out")
    columns = ["--prompt-column", "caption", "--id-column", "key"]
    code, out, err = _run(capsys, "plan", str(path))
    assert code == 2 and "prompt column 'prompt' not found" in err and not out
    code, out, _err = _run(capsys, "plan", str(path), *columns)
    assert code == 0 and json.loads(out)[0]["stop"] == 2
    code, _out, err = _run(capsys, "run", str(path), output, *SMALL_ARGS, *columns, "--no-finalize")
    assert code == 0, err
    code, out, _err = _run(capsys, "finalize", output, "--prompts", str(path), *columns)
    assert code == 0 and json.loads(out)["succeeded"] == 2


def test_unusable_table_is_an_error_naming_the_column(tmp_path, capsys):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a", "a"], "prompt": ["x", "y"]}), path)
    code, _out, err = _run(capsys, "run", str(path), str(tmp_path / "out"), *SMALL_ARGS)
    assert code == 2 and "duplicate id 'a' in column 'id'" in err and "row 1" in err


def test_gateway_help_documents_its_options():
    result = subprocess.run(
        [sys.executable, "-m", "imagegen_provider.cli", "gateway", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for option in (
        "--host", "--port", "--api-key", "--balance-usd", "--rpm", "--ipm", "--burst", "--latency",
        "--fail-502-rate", "--fail-503-rate", "--fail-500-rate", "--drop-rate", "--corrupt-b64-rate",
        "--fault-seed", "--content-policy-trigger",
    ):
        assert option in text, option
    assert "0 picks a free port" in text
    assert "any non-empty key is accepted" in text
    assert "Requests per minute" in text and "Images per minute" in text
    assert "probabilities between 0 and 1" in text


def test_run_help_and_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Default: the bundled local gateway, in-process" in text and ENV_API_KEY in text and "Never printed" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("imagegen ")


def test_options_are_never_abbreviated(tmp_path, capsys, gateway):
    prompts = _prompts(tmp_path, ["a lake"])
    with pytest.raises(SystemExit) as exited:
        main(["run", prompts, str(tmp_path / "out"), "--base-url", f"{gateway.base_url}/v1", "--api", "batch"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --api batch" in capsys.readouterr().err
    assert gateway.stats()["total_requests"] == 0


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--rows", "5:2"], "0 <= START < STOP"),
        (["--rows", "3:3"], "0 <= START < STOP"),
        (["--timeout", "0"], "timeout (read_timeout) must be above zero"),
        (["--max-in-flight", "0"], "max_in_flight must be 1 or more"),
        (["--rpm", "-1"], "--rpm must not be negative"),
        (["--rpm", "0"], "rpm (requests_per_minute) must be above zero"),
        (["--attempt-timeout", "0"], "attempt_timeout must be above zero"),
        (["--max-response-bytes", "0"], "max_response_bytes must be above zero"),
        (["--max-cost", "nan"], "must be a finite number >= 0"),
        (["--images-per-prompt", "0"], "must be a finite number >= 1"),
        (["--price-as", "no-equals-sign"], "--price-as takes ALIAS=MODEL"),
    ],
)
def test_numbers_out_of_range_are_refused_before_anything_is_sent(tmp_path, capsys, option, message):
    prompts = _prompts(tmp_path, ["a lake"])
    # Refused by argparse (SystemExit) or by the preflight after parsing (exit code): 2 either way.
    try:
        code = main(["run", prompts, str(tmp_path / "out"), *SMALL_ARGS, *option])
    except SystemExit as exited:
        code = exited.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_base_url_without_a_scheme_is_refused(tmp_path, capsys):
    prompts = _prompts(tmp_path, ["a lake"])
    with pytest.raises(SystemExit) as exited:
        main(["run", prompts, str(tmp_path / "out"), *SMALL_ARGS, "--base-url", "localhost:9/v1"])
    assert exited.value.code == 2
    assert "--base-url must be an http:// or https:// URL" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bundled_gateway_rows_are_simulated_and_priced_from_a_price_file(tmp_path, capsys):
    prompts = _prompts(tmp_path, ["a lake", "a cliff"])
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"per_image": {"dall-e-2": {"256x256": {"*": 0.5}}}}))
    output = tmp_path / "out"
    code, out, err = _run(capsys, "run", prompts, str(output), *SMALL_ARGS, "--prices", str(prices), "--json")
    assert code == 0, err
    assert json.loads(out)["run"]["cost_usd"] == pytest.approx(1.0)
    rows = pd.read_parquet(output / "metadata.parquet")
    assert set(rows["provider"]) == {"local"} and set(rows["cost_source"]) == {"simulated"}
    assert list(rows["cost_usd"]) == [0.5, 0.5]
    with pytest.raises(SystemExit) as exited:
        main(["run", prompts, str(tmp_path / "x"), *SMALL_ARGS, "--prices", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "--prices must be a JSON object or a file holding one" in err and "No such file" in err


def test_second_run_on_a_live_output_fails_fast(tmp_path, capsys):
    from imagegen_provider.engine.lease import Lease
    from imagegen_provider.engine.storage import StorageLocation

    prompts = _prompts(tmp_path, ["a lake"])
    output = tmp_path / "out"
    holder = Lease(StorageLocation.from_url(str(output)), shard="all", run_id="run-holder")
    holder.acquire()
    code, out, err = _run(capsys, "run", prompts, str(output), *SMALL_ARGS)
    assert code == 2 and not out
    assert err.startswith("error: output file://") and "is being written by run run-holder" in err
    holder.release()

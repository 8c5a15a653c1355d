"""The storage SDKs' request logs stay quiet during a run at the default log level, unless asked for."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid

import pytest

from imagegen_provider.engine.logs import STORAGE_REQUEST_LOGGERS, quiet_storage_logs

from ..engine._support import numbered, run_batch, write_prompts
from .test_credentials import SMALL_ARGS, _clean_env


@pytest.mark.e2e
def test_500_images_to_azurite_print_under_100_stderr_lines(tmp_path, azurite):
    ids, texts = numbered(500)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = f"az://{azurite['container']}/quiet-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [sys.executable, "-m", "imagegen_provider.cli", "run", prompts, output, *SMALL_ARGS, "--json",
         "--max-in-flight", "32", "--storage-options", json.dumps(azurite["storage_options"])],
        capture_output=True, text=True, timeout=600, env=_clean_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["run"]["succeeded"] == 500
    lines = result.stderr.splitlines()
    print(f"stderr: {len(lines)} lines for 500 images to az://")
    assert len(lines) < 100, "\n".join(lines[:40])
    assert not [line for line in lines if "azure" in line.lower()]


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.names.append(record.name)


async def _azure_records(tmp_path, gateway, azurite) -> list[str]:
    counter = _Count()
    logging.getLogger().addHandler(counter)
    try:
        ids, texts = numbered(3, prefix=uuid.uuid4().hex[:4])
        prompts = write_prompts(tmp_path / f"{uuid.uuid4().hex}.parquet", texts, ids=ids)
        output = f"az://{azurite['container']}/quiet-{uuid.uuid4().hex[:8]}"
        await run_batch(gateway, prompts=prompts, output=output, output_storage_options=azurite["storage_options"])
    finally:
        logging.getLogger().removeHandler(counter)
    return [name for name in counter.names if name.startswith("azure")]


async def test_quiet_at_info_unless_the_user_asked(tmp_path, gateway, azurite):
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.INFO)
    try:
        assert await _azure_records(tmp_path, gateway, azurite) == []
        # The user asked for the Azure SDK's request log: it is left alone.
        http = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
        http.setLevel(logging.INFO)
        try:
            assert len(await _azure_records(tmp_path, gateway, azurite)) > 3
        finally:
            http.setLevel(logging.NOTSET)
    finally:
        root.setLevel(previous)


def test_levels_are_restored_by_the_last_of_nested_runs():
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.INFO)
    try:
        with quiet_storage_logs():
            with quiet_storage_logs():
                assert all(logging.getLogger(n).level == logging.WARNING for n in STORAGE_REQUEST_LOGGERS)
            assert logging.getLogger("botocore").level == logging.WARNING  # the outer run is still going
        assert all(logging.getLogger(n).level == logging.NOTSET for n in STORAGE_REQUEST_LOGGERS)
    finally:
        root.setLevel(previous)

"""Engine-test fixtures.

``s3_server`` overrides the shared fixture of ``tests/conftest.py`` for these tests only: the shared one
creates its bucket with ``s3fs.mkdir``, which (s3fs >= 2025) sends ``LocationConstraint=us-east-1`` when
``region_name`` is set, and moto, like AWS, rejects that ("The specified location-constraint is not valid"),
so the fixture errors before any test runs. Same server, same options, bucket made without the constraint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import free_port, wait_for_port


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict]:
    binary = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if binary is None:
        pytest.skip("moto_server is not installed (pip install -e .[test])")
    port = free_port()
    process = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
        import s3fs

        fs = s3fs.S3FileSystem(**options)
        fs.call_s3("create_bucket", Bucket="imagegen-test")  # us-east-1: no CreateBucketConfiguration
        fs.invalidate_cache()
        yield {"endpoint": endpoint, "storage_options": options, "bucket": "imagegen-test"}
    finally:
        process.terminate()
        process.wait(timeout=10)

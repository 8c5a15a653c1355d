from __future__ import annotations

import pytest

from ._stores import KINDS, Store, make_store


@pytest.fixture(params=KINDS)
def store(request, tmp_path) -> Store:
    """A fresh output folder on a local disk, on S3 (moto) and on Azure Blob (Azurite): every test using it runs
    three times."""
    return make_store(request.param, request, tmp_path)

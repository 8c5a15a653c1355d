"""Importing the hook must not load the server side: the bundled gateway (Starlette, uvicorn) and Pillow are
imported only when a local gateway is opened or an image is inspected."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FORBIDDEN = ("starlette", "uvicorn", "PIL", "imagegen_gateway")

_PROBE = (
    "import json, sys\n"
    "import imagegen_provider.hooks.image_generation\n"
    "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {names})))\n"
)


@pytest.fixture(scope="module")
def hook_import() -> subprocess.CompletedProcess[str]:
    code = _PROBE.format(names=set(FORBIDDEN))
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, timeout=120, check=True
    )


def _imported_by_importtime(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines: ``import time: self | cumulative | <indent>name``."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


def test_hook_import_loads_no_server_side_module(hook_import: subprocess.CompletedProcess[str]) -> None:
    assert json.loads(hook_import.stdout) == []


def test_importtime_trace_names_no_server_side_module(hook_import: subprocess.CompletedProcess[str]) -> None:
    imported = _imported_by_importtime(hook_import.stderr)
    # The trace must really list the import chain, or the check below would pass vacuously.
    assert "imagegen_provider.hooks.image_generation" in imported
    assert "httpx" in imported
    leaked = sorted(name for name in imported if name.split(".")[0] in FORBIDDEN)
    assert leaked == []


def test_local_client_does_load_the_gateway() -> None:
    """The counterpart: opening a ``local`` client imports the gateway lazily and works."""
    code = (
        "import sys\n"
        "from imagegen_provider.connect import open_client\n"
        "from imagegen_provider.transport.settings import ClientSettings\n"
        "assert 'imagegen_gateway' not in sys.modules\n"
        "client = open_client(ClientSettings.from_connection(host='local'))\n"
        "print('imagegen_gateway' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"

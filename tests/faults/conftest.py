"""Fixtures of the fault suite: the hostile gateway, prompt tables, the rescue folder, and the figures each
case reports (paid by the gateway's count, stored, recorded, exit code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagegen_provider.engine.metadata import read_metadata
from imagegen_provider.engine.storage import StorageLocation

from ._hostile import HostileGateway, Hostility, hostile_gateway

REPO = Path(__file__).resolve().parents[2]
SMALL_ARGS = ["--model", "dall-e-2", "--size", "256x256", "--response-format", "b64_json"]
SMALL_PRICE = 0.016


@pytest.fixture
def hostile() -> Iterator[HostileGateway]:
    with hostile_gateway(Hostility()) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def rescue_dir(tmp_path, monkeypatch) -> Path:
    """Rescue ledgers of these tests stay in their tmp folder, never in ~/.cache."""
    folder = tmp_path / "rescue"
    monkeypatch.setenv("IMAGEGEN_RESCUE_DIR", str(folder))
    monkeypatch.delenv("IMAGEGEN_API_KEY", raising=False)
    return folder


def prompts(tmp_path: Path, count: int, name: str = "prompts.parquet") -> str:
    path = tmp_path / name
    pq.write_table(
        pa.table({"id": [f"f{i:03d}" for i in range(count)], "prompt": [f"a hostile fox {i}" for i in range(count)]}),
        path,
    )
    return str(path)


def stored_images(output: Path) -> int:
    return sum(1 for p in (output / "images").rglob("*") if p.is_file()) if (output / "images").is_dir() else 0


def recorded_rows(output: Path, rescue: Path) -> int:
    """Rows on record: in the output's metadata, plus rows kept in a rescue ledger."""
    rows = 0
    if output.is_dir():
        rows += read_metadata(StorageLocation.from_url(str(output))).num_rows
    if rescue.is_dir():
        rows += sum(len(p.read_bytes().splitlines()) for p in rescue.rglob("ledger-*.jsonl"))
    return rows


def report(case: str, **figures: Any) -> None:
    """Print a case's figures (run pytest with -s to see them) and append them to $IMAGEGEN_FAULT_FIGURES."""
    line = json.dumps({"case": case, **figures})
    # Past pytest's capture (capsys would swallow it): the figures are the point of the suite.
    sys.__stdout__.write(f"\nFIGURES {line}\n")
    target = os.environ.get("IMAGEGEN_FAULT_FIGURES")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``imagegen`` in a real subprocess (this worktree's code: PYTHONPATH is inherited)."""
    return subprocess.Popen(
        [sys.executable, "-m", "imagegen_provider.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, cwd=REPO,
    )

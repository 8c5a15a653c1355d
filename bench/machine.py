"""What the benchmark ran on: CPU, RAM, Python, package versions, the code's git state, and the machine's load."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

PACKAGES = ("airflow-provider-imagegen", "openai", "litellm", "httpx", "limits", "tenacity", "pyarrow", "uvicorn",
            "starlette", "redis", "psutil", "matplotlib")
ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def code_fingerprint() -> str:
    """sha256 of every source file of the package under test, as it is on disk now. Recorded at each client's
    start: the package is edited while benchmarks run, and a run whose clients saw different code says so."""
    digest = hashlib.sha256()
    package = ROOT / "imagegen_provider"
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(package)).encode())
            try:
                digest.update(path.read_bytes())
            except OSError:
                pass
    return digest.hexdigest()[:12]


def describe() -> dict[str, Any]:
    diff = _git("diff", "HEAD", "--", "imagegen_provider") or ""
    untracked = _git("ls-files", "--others", "--exclude-standard", "imagegen_provider") or ""
    redis_version = None
    try:
        redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                                       timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu_model": _cpu_model(),
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "packages": {name: _version(name) for name in PACKAGES},
        "redis_server": redis_version,
        "git": {
            "commit": (_git("rev-parse", "HEAD") or "").strip() or None,
            "commit_subject": (_git("log", "-1", "--format=%s") or "").strip()[:200] or None,
            "code_fingerprint_at_start": code_fingerprint(),
            # The package is being edited while benchmarks run: fingerprint the working tree that was measured.
            "imagegen_provider_uncommitted_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
            "imagegen_provider_untracked_files": untracked.split() or None,
        },
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class LoadMeter:
    """System-wide busy CPU over an interval, to tell how much of the machine others were using."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = self._busy()

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def foreign_cores(self, our_cpu_s: float) -> dict[str, float]:
        wall = max(1e-6, time.monotonic() - self._t0)
        busy = self._busy() - self._busy0
        return {
            "machine_busy_cores": round(busy / wall, 2),
            "other_processes_cores": round(max(0.0, busy - our_cpu_s) / wall, 2),
        }

"""What every client subprocess shares: its spec (a JSON file), the prompt table, and its result file.

A client measures its own *work* window (after imports, from the first dispatch to the last write) with
``getrusage(RUSAGE_SELF)``, so CPU per image can be reported without the interpreter's start-up; the parent
measures the whole process with ``wait4``.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any


def load_spec() -> dict[str, Any]:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m {sys.modules['__main__'].__spec__.name} SPEC.json")
    return json.loads(Path(sys.argv[1]).read_text())


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def read_prompts(path: str) -> list[tuple[str, str]]:
    """(id, prompt) pairs of a prompt table, the way a hand-written script would read it."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "prompt"])
    return list(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist(), strict=True))


def count_files(folder: str | os.PathLike[str], suffixes: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")) -> tuple[int, int]:
    """(files, bytes) of the images under ``folder``."""
    files = size = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            if name.endswith(suffixes) and not name.startswith("."):
                files += 1
                size += os.path.getsize(os.path.join(root, name))
    return files, size


def save_b64_image(out: str, prompt_id: str, b64_json: str) -> None:
    """What a hand-written peer script does with each image: decode it and write it to a file."""
    with open(os.path.join(out, f"{prompt_id}.png"), "wb") as handle:
        handle.write(base64.b64decode(b64_json))


class Window:
    """The measured work window of a client."""

    def __init__(self) -> None:
        self.t0_unix = time.time()
        self._t0 = time.monotonic()
        self._cpu0 = cpu_now()
        self._stopped: tuple[float, float] | None = None

    def stop(self) -> None:
        """End of the work (before counting files, which is the benchmark's business, not the client's)."""
        if self._stopped is None:
            self._stopped = (time.monotonic() - self._t0, cpu_now() - self._cpu0)

    def result(self, **fields: Any) -> dict[str, Any]:
        self.stop()
        assert self._stopped is not None
        duration, cpu = self._stopped
        return {
            "t0_unix": self.t0_unix,
            "t1_unix": self.t0_unix + duration,
            "duration_s": duration,
            "work_cpu_s": cpu,
            **fields,
        }


def write_result(spec: dict[str, Any], result: dict[str, Any]) -> None:
    path = Path(spec["result_path"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)


def peer_result(window: Window, out: str, outcomes: list[bool], failures: Counter[str],
                **fields: Any) -> dict[str, Any]:
    """The result of a peer script: one outcome per prompt, failures counted by exception type."""
    window.stop()
    files, size = count_files(out)
    succeeded = sum(outcomes)
    return window.result(
        n=len(outcomes),
        succeeded=succeeded,
        failed=len(outcomes) - succeeded,
        failures=dict(failures),
        images_kept=files,
        bytes_kept=size,
        **fields,
    )

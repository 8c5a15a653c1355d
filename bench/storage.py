"""The storage case: storage requests per image and images/s, a local folder against an object store (Azurite,
Microsoft's Azure Blob emulator, on loopback) at zero gateway latency, so that the store is the bottleneck."""

from __future__ import annotations

import collections
import contextlib
import json
import re
import shutil
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import psutil

from bench.procs import REGISTRY, BenchError, Child, Gateway, _Server, free_port
from bench.prompts import make_table

REPO = Path(__file__).resolve().parent.parent
#: The published development account of Azure's storage emulators (documented by Microsoft, not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONTAINER = "bench"
#: In flight: ``imagegen run``'s default --max-in-flight.
IN_FLIGHT = 16
#: An access-log line of Azurite: ``127.0.0.1 - - [date] "PUT /account/container/blob?query HTTP/1.1" 201 -``.
_ACCESS = re.compile(rb'"(?P<method>[A-Z]+) (?P<target>/\S*) HTTP/[\d.]+" (?P<status>\d{3})')


def operation(method: str, target: str) -> str:
    """The Blob REST operation of a request (the names Azurite's debug log uses), from its method and URL."""
    _, _, query = target.partition("?")
    params = urllib.parse.parse_qs(query)
    comp = params.get("comp", [""])[0]
    on_container = params.get("restype", [""])[0] == "container"
    if comp == "batch":
        return "SubmitBatch"
    if on_container:
        if comp == "list":
            return "Container_ListBlobHierarchySegment" if "delimiter" in params else "Container_ListBlobFlatSegment"
        return {"PUT": "Container_Create", "DELETE": "Container_Delete"}.get(method, "Container_GetProperties")
    blob = {
        ("PUT", ""): "BlockBlob_Upload", ("PUT", "block"): "BlockBlob_StageBlock",
        ("PUT", "blocklist"): "BlockBlob_CommitBlockList", ("GET", ""): "Blob_Download",
        ("HEAD", ""): "Blob_GetProperties", ("DELETE", ""): "Blob_Delete",
    }
    return blob.get((method, comp), f"{method} ?comp={comp}" if comp else f"{method} blob")


class Azurite(_Server):
    """``azurite-blob`` (``scripts/install-azurite.sh``) on a free loopback port.

    The emulator is not what the case measures, so it runs the cheapest way it still answers like Azure Blob
    Storage and counts every request: blob service only, blobs kept in memory (``--inMemoryPersistence``, no
    disk I/O of its own), no API version check, and its one-line-per-request access log (what requests/image
    is counted from) instead of its ``--debug`` log, which costs the emulator more than twice as much CPU per request.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.access_log = folder / "azurite.log"
        self.proc = None
        self.port = 0

    @staticmethod
    def binary() -> str | None:
        local = REPO / ".tools" / "node_modules" / ".bin" / "azurite-blob"
        return str(local) if local.exists() else shutil.which("azurite-blob")

    def start(self, timeout: float = 30.0) -> Azurite:
        binary = self.binary()
        if binary is None or shutil.which("node") is None:
            raise BenchError("azurite-blob not found (scripts/install-azurite.sh)")
        self.port = free_port()
        self._log = open(self.access_log, "w")  # noqa: SIM115 - closed in stop()
        argv = [binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--inMemoryPersistence",
                "--skipApiVersionCheck", "--loose", "--disableTelemetry"]
        self.proc = REGISTRY.spawn(argv, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise BenchError(f"azurite did not start; see {self.access_log}")

    @property
    def storage_options(self) -> dict[str, str]:
        return {"connection_string": (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.port}/{ACCOUNT};"
        )}

    def cpu_seconds(self) -> float:
        """CPU the emulator (node and its children) has used so far."""
        assert self.proc is not None
        process = psutil.Process(self.proc.pid)
        total = 0.0
        for member in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = member.cpu_times()
                total += times.user + times.system
        return total

    def operations(self) -> collections.Counter[str]:
        """Requests served so far, by Blob operation (from the access log)."""
        if not self.access_log.exists():
            return collections.Counter()
        with open(self.access_log, "rb") as handle:
            return collections.Counter(
                operation(m["method"].decode(), m["target"].decode()) for line in handle if (m := _ACCESS.search(line))
            )


def _run(table: Path, output: str, gateway: Gateway, log: Path, extra: list[str]) -> tuple[dict[str, Any], float]:
    argv = [sys.executable, "-m", "imagegen_provider.cli", "run", str(table), output, "--base-url", gateway.v1,
            "--api-key", "bench", "--model", "dall-e-2", "--size", "256x256", "--response-format", "b64_json",
            "--max-in-flight", str(IN_FLIGHT), "--no-finalize", "--json", *extra]
    summary = log.with_suffix(".json")
    child = Child(argv, log, stdout_path=summary)
    deadline = time.monotonic() + 900
    while (result := child.poll()) is None:
        if time.monotonic() > deadline:
            child.kill()
            raise BenchError(f"imagegen run to {output} timed out; see {log}")
        time.sleep(0.1)
    try:
        run = json.loads(summary.read_text())["run"]
    except (OSError, ValueError, KeyError):
        raise BenchError(f"imagegen run to {output} failed (exit {result.returncode}); see {log}") from None
    return run, result.cpu_s


def _record(run: dict[str, Any], cpu_s: float) -> dict[str, Any]:
    return {"succeeded": run["succeeded"], "failed": run["failed"], "run_s": run["duration_s"],
            "images_per_s": round(run["succeeded"] / max(1e-9, run["duration_s"]), 1), "cpu_s": round(cpu_s, 2)}


def case_storage(ctx: Any) -> dict[str, Any]:
    from bench.cases import check

    n = ctx.params.n
    folder = ctx.case_dir("storage")
    logs = ctx.out / "logs"
    if Azurite.binary() is None:
        return {"skipped": "azurite-blob not found (scripts/install-azurite.sh)"}
    table = make_table(folder / "prompts.parquet", n, prefix="o", distinct=256)
    gateway = Gateway(["--render-cache-size", "512"], logs / "storage-gateway.log").start()
    azurite = Azurite(folder).start()
    try:
        import adlfs

        adlfs.AzureBlobFileSystem(**azurite.storage_options).mkdir(CONTAINER)
        local, local_cpu = _run(table, str(folder / "out"), gateway, logs / "storage-local.log", [])
        before, emulator_cpu = azurite.operations(), azurite.cpu_seconds()
        remote, remote_cpu = _run(table, f"az://{CONTAINER}/run", gateway, logs / "storage-azurite.log",
                                  ["--storage-options", json.dumps(azurite.storage_options)])
        time.sleep(0.5)  # Azurite writes its log asynchronously
        operations = azurite.operations() - before
        emulator_cpu = azurite.cpu_seconds() - emulator_cpu
    finally:
        azurite.stop()
        gateway.stop()
    requests = sum(operations.values())
    records = {"local": _record(local, local_cpu), "azurite": _record(remote, remote_cpu)}
    records["azurite"]["storage_requests"] = requests
    records["azurite"]["emulator_cpu_s"] = round(emulator_cpu, 2)
    per_image = round(requests / max(1, remote["succeeded"]), 3)
    speed = round(records["azurite"]["images_per_s"] / max(1e-9, records["local"]["images_per_s"]), 3)
    ctx.log(f"  [storage] {requests} requests for {remote['succeeded']} images ({per_image}/image); "
            f"{records['local']['images_per_s']} images/s local, {records['azurite']['images_per_s']} to Azurite")
    return {
        "description": f"Object store economy: `imagegen run` of {n} dall-e-2 256x256 images at zero gateway latency, "
                       f"{IN_FLIGHT} in flight, to a local folder and to `az://` on Azurite (loopback; blob service "
                       "only, blobs in memory, access log on); storage requests counted from the emulator's access "
                       "log over the whole run (start-up listing, journal, parts and deletes included). images/s "
                       "over the run itself (no process start). On a small machine the emulator's own CPU (node) "
                       "competes with the client and the gateway: see its column.",
        "n": n, "clients": records, "operations": dict(operations.most_common()),
        "requests_per_image": per_image, "azurite_vs_local": speed,
        "targets": {"requests_per_image": check("storage_requests_per_image", per_image),
                    "azurite_vs_local": check("storage_speed_ratio", speed)},
    }


def markdown(case: dict[str, Any]) -> list[str]:
    rows = [f"| {name} | {r['succeeded']} | {r['run_s']:.1f} | {r['images_per_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r.get('emulator_cpu_s', '–')} | {r.get('storage_requests', '–')} |" for name, r in case["clients"].items()]
    targets = case["targets"]
    return [
        "| output | images | run s | images/s | client CPU s | emulator CPU s | storage requests |",
        "|---|---|---|---|---|---|---|", *rows, "",
        f"Requests per image: **{case['requests_per_image']}** — {targets['requests_per_image']['status']} "
        f"({targets['requests_per_image']['target']}); Azurite ÷ local images/s: **{case['azurite_vs_local']}** — "
        f"{targets['azurite_vs_local']['status']} ({targets['azurite_vs_local']['target']}).", "",
        "Requests by operation: " + ", ".join(f"{k} {v}" for k, v in case["operations"].items()) + ".",
    ]

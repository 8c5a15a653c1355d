"""The storage case: storage requests per image and images/s, a local folder against an object store (Azurite,
Microsoft's Azure Blob emulator, on loopback) at zero gateway latency, so that the store is the bottleneck."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from bench.machine import LoadMeter
from bench.procs import REGISTRY, BenchError, Child, Gateway, _Server, free_port
from bench.prompts import make_table

REPO = Path(__file__).resolve().parent.parent
#: The published development account of Azure's storage emulators (documented by Microsoft, not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONTAINER = "bench"
#: In flight: ``imagegen run``'s default --max-in-flight.
IN_FLIGHT = 16
#: ``IMAGEGEN_BENCH_PIN=1`` (on a machine with two cores or more) runs the client alone on one core and the servers
#: (the gateway, the emulator) on another, in both runs of a pair. Off by default: measured, it
#: lifted the median ratio (0.566 pinned, 0.486 not, 15 pairs each) but not to 0.67: bench/results/storage/pinning.md.
PIN_ENV = "IMAGEGEN_BENCH_PIN"
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
        self.folder.mkdir(parents=True, exist_ok=True)
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


@dataclasses.dataclass(frozen=True)
class Cores:
    """Which cores the client and the servers run on: the servers stand for remote machines (a gateway and a
    store in a data centre), so the client gets a core of its own, as it would have a machine of its own; on a
    2-core machine otherwise the emulator's CPU (which Azure would spend on its own machines) comes out of the
    client's. Both runs of a pair are pinned the same way, so the local run's servers (the gateway alone) have
    the same core to themselves."""

    client: frozenset[int]
    servers: frozenset[int]

    @classmethod
    def chosen(cls) -> Cores | None:
        """The split to use, or ``None`` unless ``IMAGEGEN_BENCH_PIN=1`` on 2 cores or more."""
        available = sorted(os.sched_getaffinity(0))
        if os.environ.get(PIN_ENV, "0") != "1" or len(available) < 2:
            return None
        return cls(client=frozenset(available[:1]), servers=frozenset(available[1:2]))

    def describe(self) -> dict[str, list[int]]:
        return {"client": sorted(self.client), "servers": sorted(self.servers)}


@contextlib.contextmanager
def _on_cores(cores: frozenset[int] | None) -> Iterator[None]:
    """Processes started inside run on ``cores`` (every thread: a child inherits the spawning thread's affinity).

    Only the calling thread's affinity is changed, and restored on the way out.
    """
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _run(table: Path, output: str, gateway: Gateway, log: Path, extra: list[str],
         cores: frozenset[int] | None) -> tuple[dict[str, Any], float]:
    argv = [sys.executable, "-m", "imagegen_provider.cli", "run", str(table), output, "--base-url", gateway.v1,
            "--api-key", "bench", "--model", "dall-e-2", "--size", "256x256", "--response-format", "b64_json",
            "--max-in-flight", str(IN_FLIGHT), "--no-finalize", "--json", *extra]
    summary = log.with_suffix(".json")
    with _on_cores(cores):
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


#: Local/Azurite pairs run one after the other in a full run: the machine is shared (and small), so a single pair
#: says as much about what else ran meanwhile as about the store; the ratio reported is the median pair's. Five,
#: not three: the local runs alone spread 3.4–4.9 s between pairs on this machine (2026-11-30).
PAIRS = {False: 5, True: 1}


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _measured(table: Path, output: str, gateway: Gateway, log: Path, extra: list[str], *, cores: Cores | None,
              emulator: Azurite | None = None) -> dict[str, Any]:
    """One run, with the CPU the gateway spent and the cores the rest of the machine (not the client, the
    gateway or the emulator) used."""
    assert gateway.proc is not None
    meter, gateway_cpu = LoadMeter(), _cpu_seconds(gateway.proc.pid)
    emulator_cpu = emulator.cpu_seconds() if emulator is not None else 0.0
    run, cpu_s = _run(table, output, gateway, log, extra, cores.client if cores else None)
    emulator_cpu = emulator.cpu_seconds() - emulator_cpu if emulator is not None else 0.0
    gateway_cpu = _cpu_seconds(gateway.proc.pid) - gateway_cpu
    record = _record(run, cpu_s)
    record["gateway_cpu_s"] = round(gateway_cpu, 2)
    # Pinned, the servers' share of their one core: near 1.0 means that core, not the client's, set the pace.
    record["servers_core_share"] = round((gateway_cpu + emulator_cpu) / max(1e-9, run["duration_s"]), 2)
    ours = cpu_s + emulator_cpu + gateway_cpu
    record["other_processes_cores"] = meter.foreign_cores(ours)["other_processes_cores"]
    if emulator is not None:
        record["emulator_cpu_s"] = round(emulator_cpu, 2)
    return record


def _azurite_run(table: Path, folder: Path, log: Path, gateway: Gateway, cores: Cores | None) -> dict[str, Any]:
    """One run to ``az://`` on an emulator of its own, started empty: an emulator holding the blobs of earlier
    runs spends more CPU per request as they pile up (in memory), which would bill later pairs for earlier ones."""
    with _on_cores(cores.servers if cores else None):
        azurite = Azurite(folder).start()
    try:
        import adlfs

        adlfs.AzureBlobFileSystem(**azurite.storage_options, skip_instance_cache=True).mkdir(CONTAINER)
        time.sleep(0.5)  # Azurite writes its log asynchronously: the container's creation is not the run's
        before = azurite.operations()
        record = _measured(table, f"az://{CONTAINER}/run", gateway, log,
                           ["--storage-options", json.dumps(azurite.storage_options)], cores=cores, emulator=azurite)
        time.sleep(0.5)
        operations = azurite.operations() - before
        record.update(storage_requests=sum(operations.values()), operations=dict(operations.most_common()))
        return record
    finally:
        azurite.stop()


def _pair(table: Path, folder: Path, logs: Path, gateway: Gateway, index: int, cores: Cores | None) -> dict[str, Any]:
    """A run to a local folder and the same run to Azurite, with what the emulator served and spent; every other
    pair runs Azurite first, so that a drift of the machine's load over the case favours neither."""

    def local() -> dict[str, Any]:
        return _measured(table, str(folder / f"out-{index}"), gateway, logs / f"storage-local-{index}.log", [],
                         cores=cores)

    def azurite() -> dict[str, Any]:
        return _azurite_run(table, folder / f"azurite-{index}", logs / f"storage-azurite-{index}.log", gateway, cores)

    if index % 2:
        remote, local_run = azurite(), local()
    else:
        local_run, remote = local(), azurite()
    record = {"local": local_run, "azurite": remote, "operations": remote.pop("operations")}
    record["order"] = "azurite first" if index % 2 else "local first"
    record["requests_per_image"] = round(remote["storage_requests"] / max(1, remote["succeeded"]), 3)
    record["azurite_vs_local"] = round(remote["images_per_s"] / max(1e-9, local_run["images_per_s"]), 3)
    return record


_PINNING = {
    True: "Pinned: the client alone on one core, the servers (gateway; emulator) sharing the other, in both runs of "
          "a pair, as if the servers were remote machines (IMAGEGEN_BENCH_PIN=1; the default runs everything on "
          "every core).",
    False: "Not pinned (the default; IMAGEGEN_BENCH_PIN=1 gives the client a core of its own): on a small machine the "
           "emulator's own CPU (node) competes with the client and the gateway: see its column.",
}


def case_storage(ctx: Any) -> dict[str, Any]:
    from bench.cases import check

    n = ctx.params.n
    folder = ctx.case_dir("storage")
    logs = ctx.out / "logs"
    if Azurite.binary() is None:
        return {"skipped": "azurite-blob not found (scripts/install-azurite.sh)"}
    table = make_table(folder / "prompts.parquet", n, prefix="o", distinct=256)
    cores = Cores.chosen()
    with _on_cores(cores.servers if cores else None):
        gateway = Gateway(["--render-cache-size", "512"], logs / "storage-gateway.log").start()
    pairs = []
    try:
        # Unmeasured: the gateway renders each distinct prompt once and then serves it from its cache, so without
        # this the first pair's first run would pay for rendering that no later run does.
        _run(table, str(folder / "warm-up"), gateway, logs / "storage-warm-up.log", [], cores.client if cores else None)
        for index in range(PAIRS[ctx.params.quick]):
            pairs.append(_pair(table, folder, logs, gateway, index, cores))
            ctx.log(f"  [storage] pair {index + 1}: {pairs[-1]['requests_per_image']} requests/image; "
                    f"{pairs[-1]['local']['images_per_s']} images/s local, {pairs[-1]['azurite']['images_per_s']} "
                    f"to Azurite ({pairs[-1]['azurite_vs_local']}x)")
    finally:
        gateway.stop()
    median = sorted(pairs, key=lambda pair: pair["azurite_vs_local"])[len(pairs) // 2]
    worst_requests = max(pair["requests_per_image"] for pair in pairs)
    return {
        "description": f"Object store economy: `imagegen run` of {n} dall-e-2 256x256 images at zero gateway latency, "
                       f"{IN_FLIGHT} in flight, to a local folder and to `az://` on Azurite (loopback; blob service "
                       "only, blobs in memory, access log on; a fresh emulator for each run), after one unmeasured run that "
                       "fills the gateway's render cache, in pairs run one after the other (local first in odd "
                       "pairs, Azurite first in even ones); storage requests counted from the emulator's access log "
                       "over each whole run (start-up listing, journal, parts and deletes included). images/s over "
                       "the run itself (no process start). The ratio is the median pair's, with the range over all "
                       "pairs. " + _PINNING[cores is not None],
        "n": n, "pinning": cores.describe() if cores else None, "pairs": pairs, "clients": {"local": median["local"], "azurite": median["azurite"]},
        "operations": median["operations"], "requests_per_image": worst_requests,
        "azurite_vs_local": median["azurite_vs_local"],
        "azurite_vs_local_range": [min(p["azurite_vs_local"] for p in pairs), max(p["azurite_vs_local"] for p in pairs)],
        "targets": {"requests_per_image": check("storage_requests_per_image", worst_requests),
                    "azurite_vs_local": check("storage_speed_ratio", median["azurite_vs_local"])},
    }


def markdown(case: dict[str, Any]) -> list[str]:
    rows = []
    for index, pair in enumerate(case["pairs"], 1):
        for name in ("local", "azurite"):
            r = pair[name]
            rows.append(f"| {index} | {name} | {r['succeeded']} | {r['run_s']:.1f} | {r['images_per_s']:.1f} | "
                        f"{r['cpu_s']:.1f} | {r.get('gateway_cpu_s', '–')} | {r.get('emulator_cpu_s', '–')} | "
                        f"{r.get('servers_core_share', '–')} | {r.get('storage_requests', '–')} | "
                        f"{r['other_processes_cores']} |")
    targets = case["targets"]
    low, high = case["azurite_vs_local_range"]
    ratios = ", ".join(str(pair["azurite_vs_local"]) for pair in case["pairs"])
    return [
        _pinning_line(case.get("pinning")), "",
        "| pair | output | images | run s | images/s | client CPU s | gateway CPU s | emulator CPU s | "
        "servers' cores used | storage requests | cores used by other processes |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"Requests per image (worst pair): **{case['requests_per_image']}** — "
        f"{targets['requests_per_image']['status']} ({targets['requests_per_image']['target']}); Azurite ÷ local "
        f"images/s, median pair: **{case['azurite_vs_local']}** (pairs: {ratios}; range {low}–{high}) — "
        f"{targets['azurite_vs_local']['status']} ({targets['azurite_vs_local']['target']}).", "",
        "Requests by operation (median pair): " + ", ".join(f"{k} {v}" for k, v in case["operations"].items()) + ".",
    ]


def _pinning_line(pinning: dict[str, list[int]] | None) -> str:
    if not pinning:
        return "Not pinned: the client, the gateway and the emulator share every core."
    return (f"Pinned: client on core {pinning['client']}, gateway and emulator on core {pinning['servers']} "
            "(`servers' cores used` = their CPU seconds ÷ run seconds).")

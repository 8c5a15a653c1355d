"""The six cases. Each client runs in its own subprocess against its own gateway process (a fresh one, so
its counters, timeline and token buckets are the client's alone); the scale-out workers share one gateway.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import metrics
from bench.litellm_proxy import ALIAS as PROXY_ALIAS
from bench.litellm_proxy import UPSTREAM_MODEL as PROXY_UPSTREAM
from bench.litellm_proxy import count_refusals, litellm_binary, new_master_key
from bench.litellm_proxy import write_config as write_proxy_config
from bench.machine import LoadMeter, code_fingerprint
from bench.procs import BenchError, Child, ChildResult, Gateway, LiteLLMProxy, Redis, wait_children
from bench.prompts import make_table, prompt_texts
from bench.storage import case_storage
from bench.verify import case_verify

# -- parameters and targets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    quick: bool
    #: The gateway's limit in the rate-limited cases (requests per minute).
    rpm: int
    #: Requests per client in the announced, hidden and scale-out cases.
    n: int
    faults_n: int
    overhead_n: int
    memory_sizes: tuple[int, int]
    concurrency: int = 64
    latency: str = "0.3-1.5"
    #: Attempts per image for every client: the engine's max_attempts; the SDKs get attempts - 1 retries.
    attempts: int = 8
    scale_workers: int = 4
    #: Run the clients of a case side by side (each with its own gateway), to fit --quick in its budget.
    parallel: bool = False
    fault_seed: int = 2026
    #: Batch case: images in the small and the large batch.
    batch_sizes: tuple[int, int] = (100, 2_000)
    #: limiter_shapes: the row groups and shapes to run (``--shape-rows``); empty: all of them.
    shape_rows: tuple[str, ...] = ()


QUICK = Params(quick=True, rpm=1200, n=300, faults_n=300, overhead_n=300, memory_sizes=(1_000, 10_000), parallel=True,
               batch_sizes=(50, 500))
FULL = Params(quick=False, rpm=1200, n=2000, faults_n=2000, overhead_n=2000, memory_sizes=(1_000, 100_000))

TARGETS = {
    "announced_utilisation": (">=", 0.97, "announced limit: accepted/min ≥ 0.97·R"),
    "announced_429_share": ("<=", 0.01, "announced limit: ≤ 1 % of requests answered 429"),
    "hidden_utilisation": (">=", 0.90, "hidden limit: accepted/min ≥ 0.90·R over the run"),
    "overhead_ratio": ("<=", 1.5, "client CPU per image ≤ 1.5 × bare baseline"),
    "memory_ratio": ("<=", 1.3, "peak RSS, large ÷ small prompt table ≤ 1.3"),
    "batch_memory_ratio": ("<=", 1.3, "batch mode: peak RSS collecting the large ÷ the small batch ≤ 1.3"),
    "batch_cost_ratio": ("<=", 0.5, "batch mode: cost per image batch ÷ sync ≤ 0.5"),
    "storage_requests_per_image": ("<=", 1.5, "object store: storage requests per image ≤ 1.5"),
    "storage_speed_ratio": (">=", 0.67, "object store: images/s to Azurite ≥ 0.67 × local folder"),
    "shape_throughput_over_r": (">=", 0.95, "hidden limit of any shape, no --rpm: ≥ 0.95·R over whole minutes"),
    "shape_429_share": ("<=", 0.05, "hidden limit of any shape: ≤ 5 % of requests answered 429"),
    "proxy_throughput_over_r": (">=", 0.95, "through a LiteLLM proxy enforcing rpm R, no --rpm: ≥ 0.95·R"),
    "proxy_429_share": ("<=", 0.05, "through a LiteLLM proxy: ≤ 5 % of requests answered 429"),
    "proxy_cost_filled": (">=", 1.0, "through a LiteLLM proxy, aliased model: every image row has its cost"),
}

#: dall-e-2 256x256 as b64_json: the smallest image the gateway renders for a documented model.
SMALL_IMAGE = {"model": "dall-e-2", "size": "256x256", "response_format": "b64_json"}
#: In flight in the memory case: ``imagegen run``'s default --max-in-flight.
MEMORY_CONCURRENCY = 16
#: A GPT image model, 1024x1024 PNG, always returned as b64_json.
LARGE_IMAGE = {"model": "gpt-image-1", "size": "1024x1024", "quality": "low"}


def check(name: str, value: float | None) -> dict[str, Any]:
    op, threshold, text = TARGETS[name]
    if value is None:
        status = "MISS"
    else:
        status = "PASS" if (value >= threshold if op == ">=" else value <= threshold) else "MISS"
    return {"target": f"{op.replace('>=', '≥').replace('<=', '≤')} {threshold:g}", "status": status,
            "description": text}


# -- running clients ------------------------------------------------------------------------------------


@dataclass
class ClientRun:
    key: str
    label: str
    #: ``bench.clients.<module>``; None when ``argv`` is given.
    module: str | None
    spec: dict[str, Any]
    ours: bool
    #: None: the client needs no gateway (the bare baseline).
    gateway_args: list[str] | None = field(default_factory=list)
    argv: list[str] | None = None
    #: Fingerprint of the package's source when the client started.
    code: str | None = None


@dataclass
class Ctx:
    params: Params
    out: Path
    work: Path
    log: Callable[[str], None]

    def case_dir(self, case: str) -> Path:
        path = self.work / case
        path.mkdir(parents=True, exist_ok=True)
        return path

    def client_timeout(self, n: int, rpm: float | None) -> float:
        expected = n / rpm * 60.0 if rpm else n / 20.0
        return max(120.0, 4 * expected + 120.0)


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_clients(ctx: Ctx, case: str, runs: list[ClientRun], *, rpm: float | None, timeout: float,
                parallel: bool | None = None, prepare: Callable[[Gateway], None] | None = None,
                ) -> dict[str, dict[str, Any]]:
    """Run each client against its own fresh gateway (none when its ``gateway_args`` is None); sequentially,
    or side by side when ``parallel``. ``prepare`` gets the first gateway once it listens, before any client
    starts. Every gateway and client started here is stopped here, whatever happens."""
    parallel = ctx.params.parallel if parallel is None else parallel
    folder = ctx.case_dir(case)
    logs = ctx.out / "logs"
    records: dict[str, dict[str, Any]] = {}
    gateways: list[Gateway] = []
    children: list[Child] = []

    def gateway_for(run: ClientRun) -> Gateway | None:
        if run.gateway_args is None:
            return None
        gateway = Gateway([*run.gateway_args], logs / f"{case}-{run.key}-gateway.log").spawn()
        gateways.append(gateway)
        return gateway

    def start(run: ClientRun, gateway: Gateway | None) -> Child:
        spec = dict(run.spec)
        if gateway is not None:
            gateway.wait_ready()
            spec.setdefault("base_url", gateway.v1)
        spec.setdefault("output", str(folder / run.key))
        spec["result_path"] = str(folder / f"{run.key}.result.json")
        spec_path = folder / f"{run.key}.spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        run.spec = spec
        argv = run.argv or [sys.executable, "-m", f"bench.clients.{run.module}", str(spec_path)]
        where = f"gateway {gateway.base_url} {' '.join(run.gateway_args or [])}" if gateway else "no gateway"
        run.code = code_fingerprint()
        ctx.log(f"  [{case}] {run.label}: started ({where}; code {run.code})")
        child = Child(argv, logs / f"{case}-{run.key}.log")
        children.append(child)
        return child

    def finish(run: ClientRun, gateway: Gateway | None, child_result: ChildResult, load: dict[str, float]) -> None:
        stats = None
        if gateway is not None:
            try:
                stats = gateway.stats()
            finally:
                gateway.stop()
        log_path = logs / f"{case}-{run.key}.log"
        result = _read_result(Path(run.spec["result_path"]))
        if result is None or child_result.returncode != 0:
            raise BenchError(
                f"{case}/{run.key} failed (exit {child_result.returncode}, timed out: {child_result.timed_out}); "
                f"log {log_path}:\n{_tail(log_path)}"
            )
        if not result.get("succeeded"):
            raise BenchError(f"{case}/{run.key} produced no images; log: {log_path}")
        record = client_record(run, child_result, result, stats, rpm)
        record["machine_load"] = load
        records[run.key] = record
        ctx.log(f"  [{case}] {run.label}: {summary_line(record)}")

    def prepared(gateway: Gateway | None) -> None:
        nonlocal prepare
        if prepare is not None and gateway is not None:
            gateway.wait_ready()
            prepare(gateway)
            prepare = None

    try:
        if parallel:
            meter = LoadMeter()
            own = [gateway_for(run) for run in runs]
            prepared(next((g for g in own if g is not None), None))
            started = [start(run, gateway) for run, gateway in zip(runs, own, strict=True)]
            results = wait_children(started, timeout=timeout, gateways=own)
            ours = sum(r.cpu_s + r.gateway_cpu.get("cpu_s", 0.0) for r in results)
            load = meter.foreign_cores(ours)
            for run, gateway, result in zip(runs, own, results, strict=True):
                finish(run, gateway, result, load)
        else:
            for run in runs:
                meter = LoadMeter()
                gateway = gateway_for(run)
                prepared(gateway)
                child = start(run, gateway)
                [result] = wait_children([child], timeout=timeout, gateways=[gateway])
                finish(run, gateway, result, meter.foreign_cores(result.cpu_s + result.gateway_cpu.get("cpu_s", 0.0)))
    finally:
        for child in children:
            if child.result is None:
                child.kill()
        for gateway in gateways:
            gateway.stop()
    return records


def client_record(run: ClientRun, child: ChildResult, result: dict[str, Any], stats: dict[str, Any] | None,
                  rpm: float | None) -> dict[str, Any]:
    n = int(result["n"])
    succeeded = int(result["succeeded"])
    stats = stats or {"generation_requests": 0, "accepted_timeline": [], "rate_limited": 0, "by_status": {},
                      "charged_images": 0, "dropped_connections": 0}
    sent = int(stats["generation_requests"])
    tl = metrics.timeline(stats["accepted_timeline"])
    record: dict[str, Any] = {
        "label": run.label,
        "ours": run.ours,
        "n": n,
        "succeeded": succeeded,
        "failed": int(result.get("failed", 0)),
        "failures": result.get("failures", {}),
        "requests_sent": sent,
        "retries": sent - n,
        "attempts_per_image": round(sent / n, 4) if n else None,
        "http_429": int(stats["rate_limited"]),
        "share_429": round(stats["rate_limited"] / sent, 4) if sent else 0.0,
        "by_status": stats["by_status"],
        "charged_images": int(stats["charged_images"]),
        "images_kept": int(result.get("images_kept", 0)),
        "duplicate_paid_images": (int(stats["charged_images"]) - int(result.get("images_kept", 0))) if sent else 0,
        "dropped_connections": int(stats["dropped_connections"]),
        "wall_s": round(result["duration_s"], 2),
        "process_wall_s": round(child.wall_s, 2),
        "cpu_s": round(child.cpu_s, 2),
        "user_s": round(child.user_s, 2),
        "sys_s": round(child.sys_s, 2),
        "work_cpu_s": round(result["work_cpu_s"], 3),
        "work_cpu_ms_per_image": round(result["work_cpu_s"] * 1000.0 / max(1, succeeded), 3),
        "peak_rss_mb": round(child.maxrss_mb, 1),
        "gateway_cpu": child.gateway_cpu,
        "gateway_saturated": child.gateway_cpu.get("mean_core_share", 0) >= 0.85,
        "t0_unix": result["t0_unix"],
        "timeline": stats["accepted_timeline"],
        "config": {k: v for k, v in run.spec.items() if k not in ("result_path", "base_url", "output", "prompts")},
        "gateway_args": run.gateway_args,
        "code_fingerprint": run.code,
    }
    for key in ("client_429_seen", "limiter_rpm_at_end", "routing_strategy", "image_bytes", "decoder",
                "json_parse_ms_per_image"):
        if key in result:
            record[key] = result[key]
    if rpm:
        record["utilisation"] = metrics.timeline_utilisation(tl, rpm)
        record["wall_utilisation"] = round(succeeded / max(1e-9, result["duration_s"]) * 60.0 / rpm, 4)
        record["convergence"] = metrics.convergence(tl, rpm, result["t0_unix"])
    return record


def summary_line(r: dict[str, Any]) -> str:
    parts = [f"{r['succeeded']}/{r['n']} ok", f"{r['requests_sent']} sent", f"429={r['http_429']}",
             f"wall {r['wall_s']}s", f"cpu {r['cpu_s']}s", f"rss {r['peak_rss_mb']}MB"]
    if "utilisation" in r:
        parts.insert(0, f"util {r['utilisation']['utilisation']:.3f} (wall {r['wall_utilisation']:.3f})")
    parts.append(f"gateway cpu {r['gateway_cpu'].get('mean_core_share')}")
    return ", ".join(parts)


def ratios(records: dict[str, dict[str, Any]], ours: list[str], peers: list[str]) -> dict[str, dict[str, Any]]:
    """ours ÷ peer for the figures that matter (utilisation: higher is better; the others: lower is better)."""
    out: dict[str, dict[str, Any]] = {}

    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    for o in ours:
        for p in peers:
            if o not in records or p not in records:
                continue
            a, b = records[o], records[p]
            out[f"{o} / {p}"] = {
                "utilisation": div(a.get("utilisation", {}).get("utilisation"), b.get("utilisation", {}).get("utilisation")),
                "wall_s": div(a["wall_s"], b["wall_s"]),
                "cpu_s": div(a["cpu_s"], b["cpu_s"]),
                "peak_rss_mb": div(a["peak_rss_mb"], b["peak_rss_mb"]),
                "http_429": div(a["http_429"], b["http_429"]) if b["http_429"] else None,
                "retries": div(a["retries"], b["retries"]) if b["retries"] else None,
            }
    return out


# -- the cases ------------------------------------------------------------------------------------------


def _engine(key: str, label: str, table: Path, request: dict, p: Params, *, rpm: float | None, gw: list[str],
            concurrency: int | None = None) -> ClientRun:
    return ClientRun(key, label, "engine", {
        "prompts": str(table), "request": request, "concurrency": concurrency or p.concurrency, "rpm": rpm,
        "max_attempts": p.attempts, "backend": None,
    }, ours=True, gateway_args=gw)


def _openai(table: Path, request: dict, p: Params, *, gw: list[str]) -> ClientRun:
    return ClientRun("openai", f"openai SDK + Semaphore({p.concurrency})", "openai_peer", {
        "prompts": str(table), "request": request, "concurrency": p.concurrency, "max_retries": p.attempts - 1,
    }, ours=False, gateway_args=gw)


def _litellm(table: Path, request: dict, p: Params, *, rpm: float | None, gw: list[str]) -> ClientRun:
    label = f"LiteLLM Router (rpm={rpm}, usage-based-routing-v2)" if rpm else "LiteLLM Router (no rpm, simple-shuffle)"
    return ClientRun("litellm", label, "litellm_peer", {
        "prompts": str(table), "request": request, "concurrency": p.concurrency, "num_retries": p.attempts - 1,
        "rpm": rpm,
    }, ours=False, gateway_args=gw)


def case_announced(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params
    gw = ["--rpm", str(p.rpm), "--latency", p.latency, "--fault-seed", str(p.fault_seed)]
    table = make_table(ctx.case_dir("announced") / "prompts.parquet", p.n, prefix="a")
    runs = [
        _engine("engine_rpm", f"imagegen engine (rpm={p.rpm} configured)", table, SMALL_IMAGE, p, rpm=p.rpm, gw=gw),
        _engine("engine_headers", "imagegen engine (no rpm; x-ratelimit headers)", table, SMALL_IMAGE, p, rpm=None,
                gw=gw),
        _openai(table, SMALL_IMAGE, p, gw=gw),
        _litellm(table, SMALL_IMAGE, p, rpm=p.rpm, gw=gw),
    ]
    records = run_clients(ctx, "announced", runs, rpm=p.rpm, timeout=ctx.client_timeout(p.n, p.rpm))
    for key in ("engine_rpm", "engine_headers"):
        r = records[key]
        r["targets"] = {
            "utilisation": check("announced_utilisation", r["utilisation"]["utilisation"]),
            "share_429": check("announced_429_share", r["share_429"]),
        }
    return {
        "description": "Announced limit: gateway --rpm R with x-ratelimit-* headers, latency "
                       f"{p.latency}s, N={p.n} per client, concurrency {p.concurrency}.",
        "rpm": p.rpm, "n": p.n, "concurrency": p.concurrency, "gateway_args": gw,
        "clients": records,
        "ratios": ratios(records, ["engine_rpm", "engine_headers"], ["openai", "litellm"]),
    }


def case_hidden(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params
    gw = ["--rpm", str(p.rpm), "--latency", p.latency, "--no-rate-limit-headers", "--fault-seed", str(p.fault_seed)]
    table = make_table(ctx.case_dir("hidden") / "prompts.parquet", p.n, prefix="h")
    runs = [
        _engine("engine", "imagegen engine (no rpm configured)", table, SMALL_IMAGE, p, rpm=None, gw=gw),
        _openai(table, SMALL_IMAGE, p, gw=gw),
        _litellm(table, SMALL_IMAGE, p, rpm=None, gw=gw),
    ]
    records = run_clients(ctx, "hidden", runs, rpm=p.rpm, timeout=ctx.client_timeout(p.n, p.rpm))
    r = records["engine"]
    r["targets"] = {"utilisation": check("hidden_utilisation", r["utilisation"]["utilisation"])}
    return {
        "description": "Hidden limit: gateway --rpm R --no-rate-limit-headers (429 + Retry-After only); nobody "
                       f"is told R. Latency {p.latency}s, N={p.n}, concurrency {p.concurrency}.",
        "rpm": p.rpm, "n": p.n, "concurrency": p.concurrency, "gateway_args": gw,
        "clients": records,
        "ratios": ratios(records, ["engine"], ["openai", "litellm"]),
    }


def case_faults(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params
    gw = ["--latency", p.latency, "--fail-502-rate", "0.05", "--drop-rate", "0.02", "--fault-seed", str(p.fault_seed)]
    table = make_table(ctx.case_dir("faults") / "prompts.parquet", p.faults_n, prefix="f")
    runs = [
        _engine("engine", "imagegen engine", table, SMALL_IMAGE, p, rpm=None, gw=gw),
        _openai(table, SMALL_IMAGE, p, gw=gw),
        _litellm(table, SMALL_IMAGE, p, rpm=None, gw=gw),
    ]
    records = run_clients(ctx, "faults", runs, rpm=None, timeout=ctx.client_timeout(p.faults_n, None))
    for r in records.values():
        r["completion"] = round(r["succeeded"] / r["n"], 4)
    return {
        "description": f"Faults: no limit, latency {p.latency}s, 5 % 502 (HTML, not charged), 2 % connections "
                       f"dropped mid-response after the image was charged; N={p.faults_n}.",
        "n": p.faults_n, "gateway_args": gw, "clients": records,
        "ratios": ratios(records, ["engine"], ["openai", "litellm"]),
    }


def case_overhead(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params
    folder = ctx.case_dir("overhead")
    texts = 8
    # Photo detail: images the size of real model output (a 1024x1024 PNG of about 2 MB). The default flat
    # renders are ~23 KB, which would measure HTTP round trips rather than the handling of an image.
    gw = ["--render-cache-size", "64", "--fault-seed", str(p.fault_seed), "--image-detail", "photo"]
    n, half = p.overhead_n, p.overhead_n // 2
    table = make_table(folder / "prompts.parquet", n, prefix="o", distinct=texts)
    half_table = make_table(folder / "prompts-half.parquet", half, prefix="o", distinct=texts)
    sample = folder / "sample.b64"

    def fetch_sample(gateway: Gateway) -> None:
        # One real response's b64, for the bare baseline (before the clients start, so it is not counted).
        body = gateway.post("/v1/images/generations", {"prompt": prompt_texts()[0], **LARGE_IMAGE})
        sample.write_text(body["data"][0]["b64_json"])
        gateway.reset()

    runs = [
        _engine("engine", f"imagegen engine (full path), N={n}", table, LARGE_IMAGE, p, rpm=None, gw=gw),
        _engine("engine_half", f"imagegen engine (full path), N={half}", half_table, LARGE_IMAGE, p, rpm=None, gw=gw),
    ]
    if not p.quick:
        runs += [_openai(table, LARGE_IMAGE, p, gw=gw), _litellm(table, LARGE_IMAGE, p, rpm=None, gw=gw)]
    # Two baselines: with the engine's own base64 decoder (pybase64), which isolates what the engine adds
    # around the irreducible work and is the one the target is judged on; and with the stdlib's, which is
    # what a hand-written script pays (the stdlib decoder alone is ~10 ms for a 2 MB image).
    runs.append(ClientRun("baseline", "bare baseline (pybase64 decode + sha256 + write)", "baseline",
                          {"b64_path": str(sample), "n": n, "decoder": "pybase64"}, ours=False, gateway_args=None))
    runs.append(ClientRun("baseline_stdlib", "bare baseline, stdlib base64 (b64 decode + sha256 + write)",
                          "baseline", {"b64_path": str(sample), "n": n, "decoder": "stdlib"}, ours=False,
                          gateway_args=None))
    records = run_clients(ctx, "overhead", runs, rpm=None, timeout=ctx.client_timeout(n, None),
                          prepare=fetch_sample)
    b64 = sample.read_text()
    image_bytes = len(base64.b64decode(b64))
    base = records["baseline"]["work_cpu_ms_per_image"]
    base_stdlib = records["baseline_stdlib"]["work_cpu_ms_per_image"]
    full, part = records["engine"], records["engine_half"]
    # Marginal CPU per image: the slope between the two engine runs, free of the run's fixed costs (opening
    # the table, resume scan, first connections, lazy imports on first use).
    marginal = round((full["work_cpu_s"] - part["work_cpu_s"]) * 1000.0 / max(1, full["succeeded"] - part["succeeded"]), 3)
    fixed = round(full["work_cpu_s"] - marginal * full["succeeded"] / 1000.0, 3)
    per_image = {key: r["work_cpu_ms_per_image"] for key, r in records.items()}
    ratio = {key: round(v / base, 2) if base else None for key, v in per_image.items()
             if not key.startswith("baseline")}
    marginal_ratio = round(marginal / base, 2) if base else None
    full["marginal_cpu_ms_per_image"] = marginal
    full["targets"] = {"overhead_ratio": check("overhead_ratio", marginal_ratio)}
    return {
        "description": f"Client overhead: {LARGE_IMAGE['model']} {LARGE_IMAGE['size']} quality "
                       f"{LARGE_IMAGE['quality']} PNG as b64_json ({image_bytes:,} bytes decoded, {len(b64):,} b64 "
                       f"chars per response), zero latency, no limit, N={n}. CPU is measured inside each client "
                       "over its work window (imports excluded); the engine's per-image figure for the target is "
                       f"the marginal cost, the slope between its N={half} and N={n} runs.",
        "n": n, "image_bytes": image_bytes, "b64_chars": len(b64), "gateway_args": gw,
        "clients": records,
        "cpu_ms_per_image_average": per_image,
        "ratio_to_baseline_average": ratio,
        "engine_marginal_cpu_ms_per_image": marginal,
        "engine_fixed_cpu_s_per_run": fixed,
        "baseline_cpu_ms_per_image": base,
        "engine_ratio_to_baseline": marginal_ratio,
        "baseline_stdlib_cpu_ms_per_image": base_stdlib,
        "json_parse_ms_per_image": records["baseline"].get("json_parse_ms_per_image"),
        "engine_ratio_to_stdlib_baseline": round(marginal / base_stdlib, 2) if base_stdlib else None,
        "engine_overhead_ms_per_image_over_baseline": round(marginal - base, 3),
    }


def case_memory(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params
    folder = ctx.case_dir("memory")
    gw = ["--render-cache-size", "512", "--fault-seed", str(p.fault_seed)]
    small, large = p.memory_sizes
    runs = []
    for size in (small, large):
        table = make_table(folder / f"prompts-{size}.parquet", size, prefix="m", distinct=256)
        runs.append(_engine(f"engine_{size}", f"imagegen engine, {size:,} prompts", table, SMALL_IMAGE, p, rpm=None,
                            gw=gw, concurrency=MEMORY_CONCURRENCY))
    records = run_clients(ctx, "memory", runs, rpm=None, timeout=ctx.client_timeout(large, None) * 2)
    a, b = records[f"engine_{small}"], records[f"engine_{large}"]
    ratio = round(b["peak_rss_mb"] / a["peak_rss_mb"], 3)
    b["targets"] = {"memory_ratio": check("memory_ratio", ratio)}
    for r in records.values():
        r["images_per_s"] = round(r["succeeded"] / max(1e-9, r["wall_s"]), 1)
    note = f"quick mode: {small:,} vs {large:,} prompts (full mode: 1,000 vs 100,000)" if p.quick else None
    return {
        "description": f"Memory vs size: peak RSS of the engine for {small:,} vs {large:,} prompts, dall-e-2 "
                       f"256x256 b64_json, zero latency, no limit, {MEMORY_CONCURRENCY} in flight (the CLI's "
                       "default); prompt texts cycle through 256 so the gateway serves renders from its cache "
                       "(ids are unique: every row is its own image).",
        "sizes": [small, large], "gateway_args": gw, "clients": records,
        "rss_ratio": ratio, "note": note,
    }


def case_scaleout(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params
    folder = ctx.case_dir("scaleout")
    logs = ctx.out / "logs"
    if Redis.available() is None:
        return {"skipped": "redis-server not found (apt-get install -y redis-server)"}
    workers = p.scale_workers
    per_worker = p.n // workers
    in_flight = max(1, p.concurrency // workers)
    gw_args = ["--rpm", str(p.rpm), "--latency", p.latency, "--fault-seed", str(p.fault_seed)]
    redis = Redis(logs / "scaleout-redis.log").start()
    gateway = None
    try:
        gateway = Gateway(gw_args, logs / "scaleout-gateway.log").start()
        children = []
        meter = LoadMeter()
        code = code_fingerprint()
        for w in range(workers):
            table = make_table(folder / f"prompts-{w}.parquet", per_worker, prefix=f"s{w}-")
            argv = [sys.executable, "-m", "imagegen_provider.cli", "run", str(table), str(folder / f"out-{w}"),
                    "--base-url", gateway.v1, "--api-key", "bench", "--model", SMALL_IMAGE["model"],
                    "--size", SMALL_IMAGE["size"], "--response-format", SMALL_IMAGE["response_format"],
                    "--rpm", str(p.rpm), "--max-in-flight", str(in_flight), "--max-attempts", str(p.attempts),
                    "--rate-limit-backend", redis.url, "--json"]
            children.append(Child(argv, logs / f"scaleout-worker{w}.log", stdout_path=folder / f"worker{w}.json"))
        ctx.log(f"  [scaleout] {workers} × imagegen run (--rpm {p.rpm} --max-in-flight {in_flight} "
                f"--rate-limit-backend {redis.url}) against {gateway.base_url}")
        results = wait_children(children, timeout=ctx.client_timeout(p.n, p.rpm),
                                gateways=[gateway] + [None] * (workers - 1))
        stats = gateway.stats()
        gw_cpu = results[0].gateway_cpu
        load = meter.foreign_cores(sum(r.cpu_s for r in results) + gw_cpu.get("cpu_s", 0.0))
    finally:
        if gateway is not None:
            gateway.stop()
        redis.stop()
    worker_records = []
    succeeded = 0
    for w, (child, result) in enumerate(zip(children, results, strict=True)):
        summary = _read_result(folder / f"worker{w}.json")
        if summary is None or child.result is None or child.result.timed_out:
            raise BenchError(f"scale-out worker {w} failed (exit {result.returncode}); log "
                             f"{logs / f'scaleout-worker{w}.log'}:\n{_tail(logs / f'scaleout-worker{w}.log')}")
        run = summary["run"]
        succeeded += run["succeeded"]
        worker_records.append({
            "worker": w, "exit_code": result.returncode, "succeeded": run["succeeded"], "failed": run["failed"],
            "failures": run["failures_by_type"], "run_duration_s": run["duration_s"],
            "process_wall_s": round(result.wall_s, 2), "cpu_s": round(result.cpu_s, 2),
            "peak_rss_mb": round(result.maxrss_mb, 1),
        })
    if succeeded == 0:
        raise BenchError("scale-out produced no images")
    n = per_worker * workers
    sent = int(stats["generation_requests"])
    tl = metrics.timeline(stats["accepted_timeline"])
    first_start = min(r.started_unix for r in results)
    last_end = max(r.ended_unix for r in results)
    record = {
        "label": f"{workers} × imagegen run, shared redis budget",
        "ours": True,
        "n": n, "succeeded": succeeded, "failed": n - succeeded,
        "requests_sent": sent, "retries": sent - n, "http_429": int(stats["rate_limited"]),
        "share_429": round(stats["rate_limited"] / sent, 4) if sent else 0.0,
        "by_status": stats["by_status"],
        "utilisation": metrics.timeline_utilisation(tl, p.rpm),
        "wall_utilisation_incl_startup": round(succeeded / (last_end - first_start) * 60.0 / p.rpm, 4),
        "wall_s": round(max(w["run_duration_s"] for w in worker_records), 2),
        "cpu_s": round(sum(w["cpu_s"] for w in worker_records), 2),
        "peak_rss_mb": max(w["peak_rss_mb"] for w in worker_records),
        "gateway_cpu": gw_cpu, "gateway_saturated": gw_cpu.get("mean_core_share", 0) >= 0.85,
        "machine_load": load,
        "timeline": stats["accepted_timeline"], "t0_unix": first_start,
        "convergence": metrics.convergence(tl, p.rpm, first_start),
        "workers": worker_records,
        "code_fingerprint": code,
    }
    record["targets"] = {
        "utilisation": check("announced_utilisation", record["utilisation"]["utilisation"]),
        "share_429": check("announced_429_share", record["share_429"]),
    }
    ctx.log(f"  [scaleout] {summary_line({**record, 'wall_utilisation': record['wall_utilisation_incl_startup']})}")
    return {
        "description": f"Scale-out: {workers} `imagegen run` processes on separate prompt tables ({per_worker} "
                       f"each) sharing --rpm {p.rpm} through redis-server; gateway --rpm {p.rpm} with headers, "
                       f"latency {p.latency}s. Targets are the announced-limit ones, for reference.",
        "rpm": p.rpm, "workers": workers, "gateway_args": gw_args, "clients": {"scaleout": record},
    }


#: Batch case: a 512x512 "photo" PNG is ~0.5 MB, ~0.7 MB as a base64 line of the output file (kept below the
#: multi-MB lines of 1024x1024 so that 2,000 of them fit the disk twice: gateway file and stored images).
BATCH_IMAGE = {"model": "dall-e-2", "size": "512x512", "response_format": "b64_json"}


def _cli_run(table: Path, output: Path, base_url: str, *, api: str) -> list[str]:
    argv = [sys.executable, "-m", "imagegen_provider.cli", "run", str(table), str(output), "--base-url", base_url,
            "--api-key", "bench", "--model", BATCH_IMAGE["model"], "--size", BATCH_IMAGE["size"],
            "--response-format", BATCH_IMAGE["response_format"], "--json"]
    return [*argv, "--api", "batch", "--poll-interval", "0.5"] if api == "batch" else argv


def _batch_child(ctx: Ctx, key: str, table: Path, api: str, folder: Path, timeout: float) -> dict[str, Any]:
    """Run one CLI child against its own fresh gateway; its summary, rusage and the gateway's stats."""
    logs = ctx.out / "logs"
    gateway = Gateway(["--image-detail", "photo", "--render-cache-size", "512"], logs / f"batch-{key}-gateway.log")
    try:
        gateway.start()
        argv = _cli_run(table, folder / key, gateway.v1, api=api)
        child = Child(argv, logs / f"batch-{key}.log", stdout_path=folder / f"{key}.json")
        [result] = wait_children([child], timeout=timeout, gateways=[gateway])
        stats = gateway.stats()
    finally:
        gateway.stop()
    summary = _read_result(folder / f"{key}.json")
    if summary is None or result.returncode != 0:
        raise BenchError(f"batch/{key} failed (exit {result.returncode}); log {logs / f'batch-{key}.log'}:\n"
                         f"{_tail(logs / f'batch-{key}.log')}")
    run = summary["run"]
    return {"succeeded": run["succeeded"], "failed": run["failed"], "cost_usd": run["cost_usd"],
            "cost_per_image": round(run["cost_usd"] / max(1, run["succeeded"]), 6),
            "wall_s": round(result.wall_s, 2), "cpu_s": round(result.cpu_s, 2),
            "peak_rss_mb": round(result.maxrss_mb, 1), "batch_lines": stats.get("batch_lines"),
            "batch_lines_charged_twice": stats.get("batch_lines_charged_twice"), "bytes_served": stats["bytes_served"]}


def case_batch(ctx: Ctx) -> dict[str, Any]:
    """Peak RSS of ``imagegen run --api batch`` collecting a small and a large batch, and cost per image vs sync."""
    p = ctx.params
    folder = ctx.case_dir("batch")
    small, large = p.batch_sizes
    records: dict[str, dict[str, Any]] = {}
    for key, size, api in (("batch_small", small, "batch"), ("batch_large", large, "batch"),
                           ("sync_small", small, "sync")):
        table = make_table(folder / f"prompts-{size}.parquet", size, prefix="b", distinct=256)
        ctx.log(f"  [batch] {key}: {size:,} images through --api {api}")
        records[key] = _batch_child(ctx, key, table, api, folder, timeout=ctx.client_timeout(size, None) * 2)
        ctx.log(f"  [batch] {key}: peak RSS {records[key]['peak_rss_mb']} MB, ${records[key]['cost_per_image']}/image")
    rss_ratio = round(records["batch_large"]["peak_rss_mb"] / records["batch_small"]["peak_rss_mb"], 3)
    cost_ratio = round(records["batch_small"]["cost_per_image"] / records["sync_small"]["cost_per_image"], 4)
    return {
        "description": f"Batch API mode: `imagegen run --api batch` collecting {small:,} vs {large:,} images "
                       f"(dall-e-2 512x512 photo PNGs, ~0.7 MB base64 lines, streamed line by line), peak RSS of "
                       "the CLI process; cost per image of the small batch vs the same table through sync.",
        "sizes": [small, large], "clients": records, "rss_ratio": rss_ratio, "cost_ratio": cost_ratio,
        "targets": {"batch_memory_ratio": check("batch_memory_ratio", rss_ratio),
                    "batch_cost_ratio": check("batch_cost_ratio", cost_ratio)},
    }

# -- limiter shapes (issue 11) --------------------------------------------------------------------------------

#: Gateway options per hidden limiter shape: what a real gateway of that kind sends with its 429s.
LIMITER_SHAPES = {
    "token-bucket": ["--limiter", "token-bucket", "--no-rate-limit-headers"],
    "sliding-window": ["--limiter", "sliding-window", "--no-rate-limit-headers", "--no-retry-after"],
    "fixed-window": ["--limiter", "fixed-window", "--no-rate-limit-headers", "--no-retry-after"],
}
#: Whole calendar minutes the limiter_shapes case is sized for (quick: 2).
SHAPE_MINUTES = {True: 2, False: 5}
#: The images-per-minute row: a hidden --ipm R (token bucket with Retry-After, no headers), requests for this
#: many images each, sent by the transport (the engine sends one image per request).
IPM_IMAGES_PER_REQUEST = 4


def _whole_minutes(timeline: list[list[int]], started: float, ended: float) -> list[int]:
    """Accepted requests in each calendar minute lying wholly inside ``[started, ended]``."""
    counts = {int(second): int(count) for second, count in timeline}
    first, last = -(-int(started) // 60), int(ended) // 60
    return [sum(counts.get(m * 60 + s, 0) for s in range(60)) for m in range(first, last)]


def _shape_children(ctx: Ctx, folder: Path, gateway: Gateway, *, key: str, workers: int, rows: int,
                    backend: str | None) -> list[Child]:
    children = []
    for w in range(workers):
        table = make_table(folder / f"{key}-prompts-{w}.parquet", rows, prefix=f"{key}{w}-")
        shared = ["--rate-limit-backend", backend] if backend else []
        argv = [sys.executable, "-m", "imagegen_provider.cli", "run", str(table), str(folder / f"{key}-out-{w}"),
                "--base-url", gateway.v1, "--api-key", "bench", "--model", SMALL_IMAGE["model"],
                "--size", SMALL_IMAGE["size"], "--response-format", SMALL_IMAGE["response_format"],
                "--max-in-flight", "16", "--max-attempts", str(ctx.params.attempts), *shared, "--json"]
        children.append(Child(argv, ctx.out / "logs" / f"shapes-{key}-worker{w}.log",
                              stdout_path=folder / f"{key}-worker{w}.json"))
    return children


def _ipm_child(ctx: Ctx, folder: Path, gateway: Gateway, *, key: str, images: int) -> Child:
    requests = -(-images // IPM_IMAGES_PER_REQUEST)
    argv = [sys.executable, "-m", "bench.clients.transport_n", gateway.v1, str(requests),
            str(IPM_IMAGES_PER_REQUEST), "16"]
    return Child(argv, ctx.out / "logs" / f"shapes-{key}-worker0.log", stdout_path=folder / f"{key}-worker0.json")


def _shape_record(folder: Path, key: str, children: list[Child], results: list[ChildResult],
                  stats: dict[str, Any], rate: float) -> dict[str, Any]:
    succeeded = 0
    for w in range(len(children)):
        summary = _read_result(folder / f"{key}-worker{w}.json")
        succeeded += summary["run"]["succeeded"] if summary else 0
    started, ended = min(r.started_unix for r in results), max(r.ended_unix for r in results)
    # Judged while the clients had work: up to the last accepted second, not the finalizing that follows.
    last_accepted = max((int(second) for second, _ in stats["accepted_timeline"]), default=int(ended))
    minutes = _whole_minutes(stats["accepted_timeline"], started, min(ended, last_accepted))
    sent = int(stats["generation_requests"])
    return {
        "workers": len(children), "succeeded": succeeded, "requests_sent": sent,
        "http_429": int(stats["rate_limited"]), "share_429": round(stats["rate_limited"] / sent, 4) if sent else 0.0,
        "whole_minutes": minutes,
        "throughput_over_r": round(sum(minutes) / len(minutes) / rate, 4) if minutes else None,
        "wall_s": round(ended - started, 1), "exit_codes": [r.returncode for r in results],
    }


def case_limiter_shapes(ctx: Ctx) -> dict[str, Any]:
    """Every hidden limiter shape, no --rpm, 1 process and 4 sharing Redis, all six side by side (each with
    its own gateway and Redis database): throughput/R over whole calendar minutes and % of requests 429."""
    p = ctx.params
    folder = ctx.case_dir("limiter_shapes")
    if Redis.available() is None:
        return {"skipped": "redis-server not found (apt-get install -y redis-server)"}
    minutes = SHAPE_MINUTES[p.quick]
    rows_total = -(-p.rpm * (12 * minutes + 1) // 12)
    redis = Redis(ctx.out / "logs" / "shapes-redis.log").start()
    gateways: list[Gateway] = []
    runs: list[tuple[str, str, list[Child], Gateway]] = []
    try:
        for db, (shape, workers) in enumerate((s, w) for s in LIMITER_SHAPES for w in (1, p.scale_workers)):
            key = f"{shape}-{workers}p"
            gw_args = ["--rpm", str(p.rpm), "--latency", "0.05-0.2", *LIMITER_SHAPES[shape]]
            gateway = Gateway(gw_args, ctx.out / "logs" / f"shapes-{key}-gateway.log").start()
            gateways.append(gateway)
            backend = redis.url.rsplit("/", 1)[0] + f"/{db + 1}" if workers > 1 else None
            runs.append((shape, key, _shape_children(ctx, folder, gateway, key=key, workers=workers,
                                                     rows=-(-rows_total // workers), backend=backend), gateway))
        ipm_key = f"images-per-minute-n{IPM_IMAGES_PER_REQUEST}-1p"
        gateway = Gateway(["--ipm", str(p.rpm), "--latency", "0.05-0.2", "--no-rate-limit-headers"],
                          ctx.out / "logs" / f"shapes-{ipm_key}-gateway.log").start()
        gateways.append(gateway)
        runs.append(("images-per-minute", ipm_key, [_ipm_child(ctx, folder, gateway, key=ipm_key,
                                                               images=rows_total)], gateway))
        ctx.log(f"  [limiter_shapes] {len(runs)} runs side by side, R={p.rpm}/min, {rows_total} rows each")
        every = [child for _, _, children, _ in runs for child in children]
        results = wait_children(every, timeout=60.0 * (minutes + 4))
        records: dict[str, Any] = {}
        offset = 0
        for shape, key, children, gateway in runs:
            mine = results[offset:offset + len(children)]
            offset += len(children)
            # The images row's figure is images/min ÷ the image limit: every accepted request carried n images.
            per_request = IPM_IMAGES_PER_REQUEST if key == ipm_key else 1
            records[key] = {"shape": shape, **_shape_record(folder, key, children, mine, gateway.stats(),
                                                            p.rpm / per_request)}
            records[key]["images_delivered"] = records[key]["succeeded"] * per_request
            records[key]["targets"] = {
                "throughput_over_r": check("shape_throughput_over_r", records[key]["throughput_over_r"]),
                "share_429": check("shape_429_share", records[key]["share_429"]),
            }
            ctx.log(f"  [limiter_shapes] {key}: throughput/R {records[key]['throughput_over_r']}, "
                    f"429 share {records[key]['share_429']}")
    finally:
        for gateway in gateways:
            gateway.stop()
        redis.stop()
    return {
        "description": "Hidden limit R of each shape (token bucket with Retry-After; sliding window and "
                       "calendar-minute fixed window counting refusals, both without Retry-After or headers), "
                       "no --rpm, 1 process and 4 sharing one Redis; throughput over whole calendar minutes. "
                       "Row images-per-minute: a hidden --ipm R (token bucket, Retry-After, no headers), "
                       f"requests for n={IPM_IMAGES_PER_REQUEST} images through the transport client; its "
                       "throughput is images/min ÷ R and its 429 share is per request.",
        "rpm": p.rpm, "rows_per_run": rows_total, "targets": {"throughput_over_r": ">= 0.95", "share_429": "<= 0.05"},
        "runs": records,
    }


# -- limiter shapes: the peers and a real LiteLLM proxy (issue 11) --------------------------------------------

#: Row groups of the limiter_shapes case, chosen with ``--shape-rows`` (default: all). ``engine`` is our engine
#: alone and as 4 processes through Redis; ``openai`` and ``litellm`` the two peers; ``proxy`` our engine through
#: a real LiteLLM proxy.
SHAPE_ROW_GROUPS = ("engine", "openai", "litellm", "proxy")
#: Requests in flight for each peer and the proxy run: the engine rows' ``--max-in-flight``.
SHAPE_IN_FLIGHT = 16
#: Gateway latency of every limiter_shapes run.
SHAPE_LATENCY = "0.05-0.2"


def shape_selection(params: Params) -> tuple[list[str], list[str]]:
    """(row groups, shapes) chosen by ``params.shape_rows``: names of either kind; a kind not named means all."""
    chosen = set(params.shape_rows)
    groups = [group for group in SHAPE_ROW_GROUPS if group in chosen] or list(SHAPE_ROW_GROUPS)
    shapes = [shape for shape in LIMITER_SHAPES if shape in chosen] or list(LIMITER_SHAPES)
    return groups, shapes


def _shape_rows_per_run(params: Params) -> int:
    """Rows for one run: the case's whole minutes at R and a little, like the engine rows."""
    return -(-params.rpm * (12 * SHAPE_MINUTES[params.quick] + 1) // 12)


def _judged_minutes(timeline: list[list[int]], started: float, ended: float) -> list[int]:
    """Whole calendar minutes while the client had work: up to its last accepted second at the latest."""
    last_accepted = max((int(second) for second, _ in timeline), default=int(ended))
    return _whole_minutes(timeline, started, min(ended, last_accepted))


def _over_r(minutes: list[int], rate: int) -> float | None:
    return round(sum(minutes) / len(minutes) / rate, 4) if minutes else None


def _shape_peer_runs(ctx: Ctx, *, groups: list[str], shapes: list[str]) -> list[ClientRun]:
    """One run per peer and shape, each against its own gateway with that hidden shape; nobody is told R."""
    p = ctx.params
    table = make_table(ctx.case_dir("limiter_shapes") / "peers-prompts.parquet", _shape_rows_per_run(p),
                       prefix="peer-")
    narrow = replace(p, concurrency=SHAPE_IN_FLIGHT)
    runs = []
    for shape in shapes:
        gw = ["--rpm", str(p.rpm), "--latency", SHAPE_LATENCY, "--fault-seed", str(p.fault_seed),
              *LIMITER_SHAPES[shape]]
        for group in groups:
            if group == "openai":
                run = _openai(table, SMALL_IMAGE, narrow, gw=gw)
            elif group == "litellm":
                run = _litellm(table, SMALL_IMAGE, narrow, rpm=None, gw=gw)
            else:
                continue
            run.key, run.label = f"{group}-{shape}", f"{run.label}, {shape}"
            runs.append(run)
    return runs


def _shape_peer_rows(ctx: Ctx, *, groups: list[str], shapes: list[str]) -> dict[str, dict[str, Any]]:
    """The openai SDK and the LiteLLM Router against each hidden shape, 1 process each, no rpm: baselines,
    reported as measured (no targets): throughput/R over whole minutes, % 429 and images delivered."""
    p = ctx.params
    runs = _shape_peer_runs(ctx, groups=groups, shapes=shapes)
    if not runs:
        return {}
    # Peers that give images up after their retries still end; a stuck one is stopped after twice the case's
    # length (and the case then reports the benchmark broken: a peer hanging is not a figure).
    timeout = 60.0 * (2 * SHAPE_MINUTES[p.quick] + 6)
    records = run_clients(ctx, "limiter_shapes", runs, rpm=p.rpm, timeout=timeout)
    for run in runs:
        record = records[run.key]
        minutes = _judged_minutes(record["timeline"], record["t0_unix"], record["t0_unix"] + record["wall_s"])
        record.update(shape=run.key.split("-", 1)[1], client=run.key.split("-", 1)[0], workers=1,
                      whole_minutes=minutes, throughput_over_r=_over_r(minutes, p.rpm),
                      images_delivered=record["images_kept"])
    return records


def _proxy_client(ctx: Ctx, table: Path, output: Path, proxy: LiteLLMProxy, master_key: str) -> Child:
    """``imagegen run`` through the proxy under the alias, no --rpm, priced as the model the alias stands for."""
    argv = [sys.executable, "-m", "imagegen_provider.cli", "run", str(table), str(output),
            "--base-url", proxy.v1, "--api-key", master_key, "--model", PROXY_ALIAS, "--size", SMALL_IMAGE["size"],
            "--max-in-flight", str(SHAPE_IN_FLIGHT), "--max-attempts", str(ctx.params.attempts),
            # drop_params drops response_format for dall-e-2, so images come as the gateway's loopback URLs.
            "--allow-private-image-urls", "--price-as", f"{PROXY_ALIAS}={PROXY_UPSTREAM}", "--json"]
    return Child(argv, ctx.out / "logs" / "shapes-proxy-engine.log", stdout_path=output.with_suffix(".json"))


def _cost_filled(metadata: Path) -> tuple[int, int, dict[str, int]]:
    """(rows, rows whose cost_usd is filled, rows per cost_source) of the run's metadata table."""
    import pyarrow.parquet as pq

    if not metadata.exists():
        return 0, 0, {}
    table = pq.read_table(metadata, columns=["cost_usd", "cost_source"])
    costs = table.column("cost_usd").to_pylist()
    sources: dict[str, int] = {}
    for source in table.column("cost_source").to_pylist():
        sources[str(source)] = sources.get(str(source), 0) + 1
    return len(costs), sum(cost is not None for cost in costs), sources


def _shape_proxy_measure(ctx: Ctx, folder: Path, table: Path) -> dict[str, Any]:
    """Start the gateway (no limit of its own), the proxy enforcing R in front of it, and one ``imagegen run``
    through the proxy; what each of them saw. Everything started here is stopped here."""
    p, logs = ctx.params, ctx.out / "logs"
    gateway = Gateway(["--latency", SHAPE_LATENCY, "--fault-seed", str(p.fault_seed)], logs / "shapes-proxy-gateway.log")
    proxy: LiteLLMProxy | None = None
    try:
        gateway.start()
        master_key = new_master_key()
        config = write_proxy_config(folder / "litellm.yaml", api_base=gateway.v1, rpm=p.rpm, master_key=master_key)
        proxy = LiteLLMProxy(config, logs / "shapes-proxy-litellm.log").start()
        ctx.log(f"  [limiter_shapes] proxy: LiteLLM proxy {proxy.v1} (rpm {p.rpm}, enforce_model_rate_limits, "
                f"model_name {PROXY_ALIAS}) → gateway {gateway.v1}; imagegen run, no --rpm; code {code_fingerprint()}")
        meter = LoadMeter()
        child = _proxy_client(ctx, table, folder / "proxy-out", proxy, master_key)
        [result] = wait_children([child], timeout=60.0 * (2 * SHAPE_MINUTES[p.quick] + 6), gateways=[gateway])
        proxy_cpu = proxy.cpu_since_start()
        return {"result": result, "stats": gateway.stats(), "refused": count_refusals(proxy.log_text()),
                "proxy_cpu_s": proxy_cpu, "load": meter.foreign_cores(result.cpu_s + proxy_cpu
                                                                       + result.gateway_cpu.get("cpu_s", 0.0))}
    finally:
        if proxy is not None:
            proxy.stop()
        gateway.stop()


def _shape_proxy_row(ctx: Ctx) -> dict[str, Any]:
    """Our engine through a real LiteLLM proxy enforcing rpm R (calendar minute, refusals counted, no headers),
    aliased model name, no --rpm: throughput/R over whole minutes, % 429 (the proxy's refusals) and cost filled."""
    if litellm_binary() is None:
        return {"skipped": "litellm[proxy] is not installed (pip install -e '.[litellm-proxy]')"}
    p = ctx.params
    folder = ctx.case_dir("limiter_shapes")
    rows = _shape_rows_per_run(p)
    seen = _shape_proxy_measure(ctx, folder, make_table(folder / "proxy-prompts.parquet", rows, prefix="proxy-"))
    result, stats, refused = seen["result"], seen["stats"], seen["refused"]
    summary = (_read_result(folder / "proxy-out.json") or {}).get("run", {})
    minutes = _judged_minutes(stats["accepted_timeline"], result.started_unix, result.ended_unix)
    # The proxy refuses before the gateway: its 429s are in its access log; the gateway saw only the ones let through.
    requests = int(stats["generation_requests"]) + refused
    image_rows, filled, sources = _cost_filled(folder / "proxy-out" / "metadata.parquet")
    record = {
        "label": f"imagegen run → LiteLLM proxy (rpm {p.rpm}, model_name {PROXY_ALIAS}) → gateway",
        "shape": "litellm-proxy", "workers": 1, "rows": rows, "exit_code": result.returncode,
        "succeeded": summary.get("succeeded", 0), "failed": summary.get("failed"),
        "failures": summary.get("failures_by_type"), "cost_usd": summary.get("cost_usd"),
        "requests_sent": requests, "http_429": refused, "gateway_429": int(stats["rate_limited"]),
        "share_429": round(refused / requests, 4) if requests else 0.0,
        "whole_minutes": minutes, "throughput_over_r": _over_r(minutes, p.rpm),
        "utilisation": metrics.timeline_utilisation(metrics.timeline(stats["accepted_timeline"]), p.rpm),
        "metadata_rows": image_rows, "cost_filled": filled, "cost_sources": sources,
        "wall_s": round(result.wall_s, 1), "cpu_s": round(result.cpu_s, 2),
        "proxy_cpu_core_share": round(seen["proxy_cpu_s"] / max(1e-6, result.wall_s), 3),
        "gateway_cpu": result.gateway_cpu, "machine_load": seen["load"], "code_fingerprint": code_fingerprint(),
    }
    record["targets"] = {
        "throughput_over_r": check("proxy_throughput_over_r", record["throughput_over_r"]),
        "share_429": check("proxy_429_share", record["share_429"]),
        "cost_filled": check("proxy_cost_filled", filled / rows if rows else None),
    }
    ctx.log(f"  [limiter_shapes] proxy: throughput/R {record['throughput_over_r']} over {minutes}, "
            f"429 share {record['share_429']}, {record['succeeded']}/{rows} images, cost filled {filled}/{image_rows}")
    return record


def case_limiter_shapes_with_peers(ctx: Ctx) -> dict[str, Any]:
    """limiter_shapes with every row group chosen by ``--shape-rows``: our engine's rows (the case above), the
    openai SDK's and LiteLLM Router's rows beside them, and our engine through a real LiteLLM proxy."""
    groups, shapes = shape_selection(ctx.params)
    engine = case_limiter_shapes(ctx) if "engine" in groups else {}
    case: dict[str, Any] = {
        "description": "Hidden limit R of each shape (token bucket with Retry-After; sliding window and "
                       "calendar-minute fixed window counting refusals, both without Retry-After or headers), "
                       "nobody told R; throughput over whole calendar minutes.",
        "rpm": ctx.params.rpm, "runs": {}, **{k: v for k, v in engine.items() if k != "skipped"},
        "row_groups": groups, "shapes": shapes,
    }
    if "skipped" in engine:
        case["engine_skipped"] = engine["skipped"]
    peers = [group for group in groups if group in ("openai", "litellm")]
    if peers:
        case["peers"] = _shape_peer_rows(ctx, groups=peers, shapes=shapes)
        case["peers_note"] = (f"Peers: 1 process each, {SHAPE_IN_FLIGHT} in flight (the engine rows' "
                              f"--max-in-flight), {ctx.params.attempts - 1} retries, no rpm; baselines, no targets.")
    if "proxy" in groups:
        case["proxy"] = _shape_proxy_row(ctx)
    return case


CASES: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "announced": case_announced,
    "hidden": case_hidden,
    "faults": case_faults,
    "overhead": case_overhead,
    "memory": case_memory,
    "scaleout": case_scaleout,
    "batch": case_batch,
    "storage": case_storage,
    "verify": case_verify,
    "limiter_shapes": case_limiter_shapes_with_peers,
}
#: Cases run only when named (--cases): several whole minutes of wall time and up to 15 processes.
OPT_IN = frozenset({"limiter_shapes"})


def with_overrides(params: Params, **changes: Any) -> Params:
    return replace(params, **{k: v for k, v in changes.items() if v is not None})


__all__ = ["CASES", "FULL", "QUICK", "TARGETS", "Ctx", "Params", "with_overrides"]

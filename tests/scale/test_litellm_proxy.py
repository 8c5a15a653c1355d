"""A real LiteLLM proxy in front of the bundled gateway, enforcing a deployment ``rpm`` with
``enforce_model_rate_limits`` (a calendar-minute window that counts refused requests and sends neither
Retry-After nor rate-limit headers), under an aliased model name. ``imagegen run`` with no ``--rpm`` must learn
the window: at least 0.95·R over the whole minutes of the run, at most 5 % of requests answered 429, every
image delivered, and the cost filled for the alias (the proxy's ``x-litellm-response-cost``, else
``--price-as``).

Needs the ``litellm-proxy`` extra (``litellm[proxy]``), which ``scripts/test.sh`` installs; skipped without it.
No database, no network: ``LITELLM_LOCAL_MODEL_COST_MAP=True`` keeps the proxy from downloading its cost map. The
proxy's config comes from ``bench/litellm_proxy.py``, shared with the benchmark's ``limiter_shapes`` proxy row.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from bench.litellm_proxy import (
    ALIAS,
    PROXY_ENV,
    UPSTREAM_MODEL,
    count_refusals,
    litellm_binary,
    new_master_key,
    proxy_argv,
    write_config,
)
from tests.conftest import free_port, wait_for_port
from tests.scale._support import PYTHON, REPO, child_env, gateway_process, stop_group, write_prompts
from tests.scale.test_limiter_shapes import whole_minutes

#: The proxy's deployment rpm. Identifying a calendar-minute window costs a fixed handful of 429s (about 15 at
#: R = 120: 5.7 % of a two-minute run); at 600 they are about 1 %, as in the benchmark's proxy row.
RATE = 600
MASTER_KEY = new_master_key()

pytestmark = pytest.mark.skipif(litellm_binary() is None, reason="litellm[proxy] is not installed")


def _proxy(tmp_path, api_base: str) -> tuple[subprocess.Popen, int]:
    """The proxy (config from bench/litellm_proxy.py, shared with the benchmark's proxy row) on a free port."""
    binary = litellm_binary()
    assert binary is not None
    config = write_config(tmp_path / "litellm.yaml", api_base=api_base, rpm=RATE, master_key=MASTER_KEY)
    port = free_port()
    log = open(tmp_path / "litellm.log", "w")  # noqa: SIM115 - closed with the test's tmp_path
    process = subprocess.Popen(
        proxy_argv(binary, config, port), stdout=log, stderr=subprocess.STDOUT, env=child_env(**PROXY_ENV),
        start_new_session=True,
    )
    return process, port


@pytest.mark.e2e
def test_engine_learns_a_litellm_proxy_rpm(tmp_path, record_property):
    rows = RATE * 2 + RATE // 12
    with gateway_process("--latency", "0.05-0.2") as gateway:
        proxy, port = _proxy(tmp_path, gateway.api_base)
        try:
            wait_for_port(port, timeout=90)
            started = time.time()
            out = subprocess.run(
                [PYTHON, "-m", "imagegen_provider.cli", "run", str(write_prompts(tmp_path / "p.parquet", "l", rows)),
                 str(tmp_path / "out"), "--base-url", f"http://127.0.0.1:{port}/v1", "--api-key", MASTER_KEY,
                 "--model", ALIAS, "--size", "256x256", "--max-in-flight", "8", "--allow-private-image-urls",
                 "--price-as", f"{ALIAS}={UPSTREAM_MODEL}", "--json"],
                capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=400,
            )
            ended = time.time()
        finally:
            stop_group(proxy)
        stats = gateway.stats()
    assert out.returncode == 0, out.stderr[-3000:]
    run = json.loads(out.stdout)["run"]
    refused = count_refusals((tmp_path / "litellm.log").read_text(errors="replace"))
    # The proxy refuses before the gateway: its 429s are in its access log; the gateway saw only accepted ones.
    requests = stats["generation_requests"] + refused
    last = max((int(s) for s, _ in stats["accepted_timeline"]), default=int(ended))
    minutes = whole_minutes(stats["accepted_timeline"], started, min(ended, last))
    figures = {"succeeded": run["succeeded"], "rows": rows, "proxy_429": refused, "requests": requests,
               "share_429": round(refused / max(1, requests), 4), "whole_minutes": minutes,
               "throughput_over_r": round(sum(minutes) / len(minutes) / RATE, 3) if minutes else None}
    record_property("figures", figures)
    print("litellm proxy:", json.dumps(figures), file=sys.stderr)
    assert run["succeeded"] == rows, figures
    # LiteLLM refuses response_format for dall-e-2 (drop_params drops it): images come as loopback URLs.
    costs = pq.read_table(tmp_path / "out" / "metadata.parquet").column("cost_usd").to_pylist()
    assert costs and all(cost is not None and cost > 0 for cost in costs), costs[:5]
    assert figures["share_429"] <= 0.05, figures
    assert minutes and figures["throughput_over_r"] >= 0.95, figures



@pytest.mark.e2e
def test_max_cost_holds_through_a_litellm_proxy_with_an_aliased_model(tmp_path):
    """The alias has no list price; ``--price-as`` prices it, so ``--max-cost`` is enforced before spending."""
    with gateway_process("--latency", "0.05-0.2") as gateway:
        proxy, port = _proxy(tmp_path, gateway.api_base)
        try:
            wait_for_port(port, timeout=90)
            out = subprocess.run(
                [PYTHON, "-m", "imagegen_provider.cli", "run", str(write_prompts(tmp_path / "p.parquet", "c", 20)),
                 str(tmp_path / "out"), "--base-url", f"http://127.0.0.1:{port}/v1", "--api-key", MASTER_KEY,
                 "--model", ALIAS, "--size", "256x256", "--max-in-flight", "4", "--allow-private-image-urls",
                 "--price-as", f"{ALIAS}={UPSTREAM_MODEL}", "--max-cost", "0.05", "--json"],
                capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=300,
            )
        finally:
            stop_group(proxy)
        charged = gateway.stats()["spent_usd"]
    run = json.loads(out.stdout)["run"]
    print("litellm proxy, --max-cost 0.05:", json.dumps({"succeeded": run["succeeded"], "cost_usd": run["cost_usd"],
                                                          "charged": charged, "stopped": run["stopped_reason"]}),
          file=sys.stderr)
    assert out.returncode == 1 and run["stopped_reason"].startswith("budget"), out.stderr[-2000:]
    assert 0 < run["succeeded"] < 20
    assert run["cost_usd"] == pytest.approx(charged) and charged <= 0.05 + 1e-9
    rows = pq.read_table(tmp_path / "out" / "metadata.parquet").to_pylist()
    assert rows and all(row["cost_usd"] and row["cost_usd"] > 0 for row in rows)

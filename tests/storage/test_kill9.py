"""Exactly-once history under ``kill -9`` of a real ``imagegen run``: at 20 seeded random instants (some right
after a metadata part appears), each followed by a rerun, on a local folder and on Azurite. No attempt ever
appears twice in ``metadata/*.parquet``, and the ``cost_usd`` summed there never exceeds what the gateway
charged."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from imagegen_gateway import GatewayConfig

from ..engine._support import write_prompts
from ._stores import Store, make_store

ROUNDS = 20
IMAGES_PER_ROUND = 16
MAX_IN_FLIGHT = 4


def _command(store: Store, prompts: str, base_url: str) -> list[str]:
    command = [
        sys.executable, "-m", "imagegen_provider.cli", "run", prompts, store.url, "--base-url", f"{base_url}/v1",
        "--api-key", "k", "--max-in-flight", str(MAX_IN_FLIGHT), "--model", "dall-e-2", "--size", "256x256",
        "--response-format", "b64_json", "--flush-rows", "6", "--no-finalize", "--progress-interval", "60",
    ]
    if store.storage_options:
        command += ["--storage-options", json.dumps(store.storage_options)]
    return command


def _parts(store: Store) -> list[str]:
    fs = store.fs
    fs.invalidate_cache()
    found = fs.glob(store.path("metadata/*.parquet"))
    return sorted(p for p in found if not p.rsplit("/", 1)[-1].startswith("."))


def _raw_history(store: Store) -> pd.DataFrame:
    """``metadata/*.parquet`` read the way DuckDB or pandas would: every part file, no deduplication."""
    fs = store.fs
    frames = [pq.read_table(fs.open(part, "rb")).to_pandas() for part in _parts(store)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id", "cost_usd"])


def _kill_at(process: subprocess.Popen, store: Store, rng: random.Random, after_part: bool) -> str:
    """Kill ``process`` right after a new part appears, or at a random instant of its run."""
    if after_part:
        known = set(_parts(store))
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            if set(_parts(store)) - known:
                break
            time.sleep(0.005)
        moment = "right after a part appeared"
    else:
        delay = rng.uniform(0.3, 2.2)  # start-up (~1 s: imports, recovery) included: some land before any request
        time.sleep(delay)
        moment = f"at {delay:.2f}s"
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    return moment


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["local", "az"])
def test_kill_9_at_random_instants_then_rerun_never_counts_an_attempt_twice(kind, request, tmp_path, gateway_factory):
    store = make_store(kind, request, tmp_path)
    gateway = gateway_factory(GatewayConfig(latency=(0.1, 0.3)))
    rng = random.Random(14)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = 0
    for round_ in range(ROUNDS):
        ids = [f"r{round_:02d}-{j:02d}" for j in range(IMAGES_PER_ROUND)]
        prompts = write_prompts(tmp_path / f"p{round_}.parquet", [f"a kite, round {round_}, {j}" for j in range(IMAGES_PER_ROUND)], ids=ids)
        command = _command(store, prompts, gateway.base_url)
        first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        moment = _kill_at(first, store, rng, after_part=round_ % 4 == 0)
        killed += first.returncode == -signal.SIGKILL

        rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
        assert rerun.returncode == 0, f"round {round_} (killed {moment}): {rerun.stderr[-3000:]}"

        raw = _raw_history(store)
        duplicated = raw[raw.duplicated(["run_id", "prompt_id", "image_index"], keep=False)]
        assert duplicated.empty, f"round {round_} (killed {moment}): {duplicated[['run_id', 'prompt_id']]}"
        charged = gateway.stats()["spent_usd"]
        assert raw["cost_usd"].sum() <= charged + 1e-9, f"round {round_} (killed {moment})"
        stored = raw[(raw["status"] == "succeeded") & raw["prompt_id"].isin(ids)]
        assert sorted(stored["prompt_id"].unique()) == ids  # the rerun completed the round
    assert killed >= ROUNDS * 3 // 4  # most runs were still going when killed
    stats = gateway.stats()
    # Paid but never recorded: at most what was in flight at each kill.
    assert stats["charged_images"] - len(_raw_history(store)) <= killed * MAX_IN_FLIGHT
    print(f"{kind}: {killed} kills, {stats['charged_images']} images charged, ${stats['spent_usd']:.4f}; "
          f"{len(_raw_history(store))} rows on record, ${_raw_history(store)['cost_usd'].sum():.4f}")

"""Cost per image (reported, token-priced, per-image list price, unknown), budgets, dry runs and the cost
report."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pandas as pd
import pytest
from PIL import Image

from imagegen_gateway import GatewayConfig
from imagegen_provider.engine import BatchRunner, PriceTable, RunConfig, finalize_output
from imagegen_provider.engine.budget import BlindSpending, Budget, BudgetExceeded
from imagegen_provider.engine.keys import derive_seed
from imagegen_provider.engine.report import REPORT_GROUPS, build_cost_report, plot_cost_report
from imagegen_provider.engine.runner import OutputWriteError
from imagegen_provider.wire.result import Usage

from ._support import SMALL, SMALL_PRICE, current, history, numbered, run_batch, write_prompts

B64 = {"response_format": "b64_json"}


@pytest.fixture(autouse=True)
def _rescue_in_tmp(tmp_path, monkeypatch):
    """Rescue folders of these tests stay in their tmp folder, never in ~/.cache."""
    monkeypatch.setenv("IMAGEGEN_RESCUE_DIR", str(tmp_path / "rescue"))


# -- the price table ---------------------------------------------------------------------------------------


def test_price_table_order_reported_tokens_per_image_unknown():
    prices = PriceTable.load()
    reported = prices.cost(model="dall-e-3", size="1024x1024", quality="standard", reported_usd=0.5, images=2)
    assert (reported.usd, reported.source) == (0.25, "reported")
    usage = Usage(input_tokens=10, output_tokens=272, total_tokens=282, input_text_tokens=10, output_image_tokens=272)
    tokens = prices.cost(model="openai/gpt-image-1", size="1024x1024", quality="low", usage=usage)
    assert tokens.source == "estimated"
    assert tokens.usd == pytest.approx((10 * 5.0 + 272 * 40.0) / 1_000_000)
    per_image = prices.cost(model="dall-e-3", size="1024x1792", quality="hd", usage=Usage(0, 0, 0))
    assert (per_image.usd, per_image.source) == (0.12, "estimated")
    unknown = prices.cost(model="flux-schnell", size="1024x1024", quality=None, usage=Usage(0, 0, 0))
    assert (unknown.usd, unknown.source) == (None, None)
    assert prices.estimate(model="flux-schnell", size="1024x1024", quality=None) is None


def test_price_overrides_merge_into_the_packaged_table():
    prices = PriceTable.load(
        {"per_image": {"dall-e-2": {"256x256": {"*": 0.5}}, "flux-schnell": {"*": {"*": 0.003}}},
         "per_million_tokens": {"gpt-image-1": {"output_image": 80.0}}}
    )
    assert prices.cost(model="dall-e-2", size="256x256", quality=None).usd == 0.5
    assert prices.cost(model="dall-e-2", size="512x512", quality=None).usd == 0.018  # untouched entries stay
    assert prices.cost(model="black-forest-labs/flux-schnell", size="1x1", quality=None).usd == 0.003
    usage = Usage(input_tokens=0, output_tokens=1000, input_text_tokens=0, output_image_tokens=1000)
    assert prices.cost(model="gpt-image-1", size=None, quality=None, usage=usage).usd == pytest.approx(0.08)
    with pytest.raises(ValueError, match="mapping"):
        PriceTable.load(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_price_as_prices_an_alias_as_a_listed_model():
    prices = PriceTable.load(price_as={"gw-images": "dall-e-3", "gw-tokens": "gpt-image-1"})
    assert prices.estimate(model="gw-images", size="1024x1024", quality="hd") == 0.08
    assert prices.cost(model="router/gw-images", size="1024x1024", quality="standard").usd == 0.04
    assert prices.estimate(model="gw-tokens", size="1024x1024", quality="low") == pytest.approx(272 * 40.0 / 1e6)
    with pytest.raises(ValueError, match="price_as maps 'x' to 'nothing-listed', which has no price"):
        PriceTable.load(price_as={"x": "nothing-listed"})


@pytest.mark.parametrize("garbage", [math.nan, -0.5, math.inf, -math.inf, "0.02", True])
def test_unusable_reported_cost_is_ignored_for_the_list_price(garbage, caplog):
    cost = PriceTable.load().response_cost(model="dall-e-2", size="256x256", quality=None, reported_usd=garbage)
    assert (cost.usd, cost.source) == (SMALL_PRICE, "estimated")
    assert "unusable cost" in caplog.text


def test_response_cost_covers_every_image_a_response_carried():
    prices = PriceTable.load()
    assert prices.response_cost(model="dall-e-2", size="256x256", quality=None, images=4).usd == 4 * SMALL_PRICE
    assert prices.response_cost(model="dall-e-2", size="256x256", quality=None, reported_usd=0.3, images=4).usd == 0.3
    negative = Usage(input_tokens=-10**9, output_tokens=0, input_text_tokens=-10**9, output_image_tokens=0)
    # Negative token counts make no cost (the budget then counts the estimate), never a refund.
    assert prices.response_cost(model="gpt-image-1", size=None, quality=None, usage=negative).usd is None


def test_budget_counts_unknown_costs_at_the_estimate_and_refuses_blind_spending():
    budget = Budget(limit=1.0)
    assert budget.must_wait(0.1)  # the first request of a limited run goes alone
    first = budget.admit(0.1)
    budget.settle(first, [None], returned=1, requested=1)
    assert budget.spent == pytest.approx(0.1) and not budget.must_wait(0.1)
    over = budget.admit(0.1)
    budget.settle(over, [0.2], returned=2, requested=1)  # two images for one: the next is expected at double
    assert budget.inflation == 2 and budget.expected(0.1) == pytest.approx(0.2)
    with pytest.raises(BudgetExceeded, match="would exceed max_cost_usd"):
        for _ in range(10):
            budget.admit(0.1)
    blind = Budget(limit=1.0)
    with pytest.raises(BlindSpending, match="cannot be enforced"):
        blind.settle(blind.admit(None), [math.nan], returned=1, requested=1)
    assert Budget().admit(None).usd == 0.0  # no limit: nothing to enforce, costs still counted when known
    with pytest.raises(ValueError, match="finite"):
        Budget(limit=math.nan)


# -- cost of real responses --------------------------------------------------------------------------------


async def test_reported_cost_wins(tmp_path, gateway):
    ids, texts = numbered(2)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    # A model with no list price in the engine's table: only the gateway's reported figure can give a cost.
    defaults = {"model": "acme/unlisted-image-model"}
    assert PriceTable.load().estimate(model=defaults["model"], size=None, quality=None, prompt_chars=10) is None
    summary = await run_batch(
        gateway, prompts=path, output=str(tmp_path / "out"), dialect="indoxhub", request_defaults=defaults
    )
    rows = current(tmp_path / "out")
    # What the gateway reports is what the rows record, whatever its own price table says.
    assert set(rows["cost_source"]) == {"reported"}
    spent = gateway.stats()["spent_usd"]
    assert spent > 0 and list(rows["cost_usd"]) == [pytest.approx(spent / 2)] * 2
    assert summary.cost_usd == pytest.approx(spent)


async def test_token_priced_model_cost_from_usage(tmp_path, gateway):
    texts = ["a lantern on a snowy windowsill at dusk", "a koi pond"]
    path = write_prompts(tmp_path / "p.parquet", texts, ids=["a", "b"])
    defaults = {"model": "gpt-image-1", "quality": "low", "size": "1024x1024"}
    await run_batch(gateway, prompts=path, output=str(tmp_path / "out"), request_defaults=defaults)
    rows = current(tmp_path / "out")
    for pid, text in zip(["a", "b"], texts, strict=True):
        row = rows.loc[(pid, 0)]
        assert row["status"] == "succeeded" and row["cost_source"] == "estimated"
        assert (row["input_tokens"], row["output_tokens"]) == (math.ceil(len(text) / 4), 272)
        assert row["total_tokens"] == row["input_tokens"] + row["output_tokens"]
        assert row["cost_usd"] == pytest.approx((row["input_tokens"] * 5.0 + 272 * 40.0) / 1_000_000)
    assert rows["cost_usd"].sum() == pytest.approx(gateway.stats()["spent_usd"])


async def test_per_image_list_price(tmp_path, gateway):
    path = write_prompts(tmp_path / "p.parquet", ["a tall tower"], ids=["t"])
    defaults = {"model": "dall-e-3", "quality": "hd", "size": "1024x1792", **B64}
    summary = await run_batch(gateway, prompts=path, output=str(tmp_path / "out"), request_defaults=defaults)
    row = current(tmp_path / "out").loc[("t", 0)]
    assert (row["cost_usd"], row["cost_source"], row["image_width"], row["image_height"]) == (
        0.12, "estimated", 1024, 1792
    )
    assert summary.cost_usd == 0.12


async def test_unknown_model_has_no_cost_never_a_made_up_one(tmp_path, gateway):
    ids, texts = numbered(2)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    defaults = {"model": "flux-schnell", "size": "256x256", **B64}
    summary = await run_batch(gateway, prompts=path, output=str(tmp_path / "out"), request_defaults=defaults)
    assert summary.succeeded == 2 and summary.cost_usd == 0.0
    rows = current(tmp_path / "out")
    assert rows["cost_usd"].isna().all() and rows["cost_source"].isna().all()
    assert (rows["input_tokens"] == 0).all()  # the openai dialect's zeroed usage is not a price
    report = finalize_output(str(tmp_path / "out"), prompts=path)
    assert report.unpriced_paid_images == 2 and report.total_cost_usd == 0.0


async def test_price_overrides_from_run_config_change_the_cost(tmp_path, gateway):
    ids, texts = numbered(2)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    prices = {"per_image": {"dall-e-2": {"256x256": {"*": 0.25}}, "flux-schnell": {"*": {"*": 0.003}}}}
    await run_batch(gateway, prompts=path, output=str(tmp_path / "a"), prices=prices)
    assert list(current(tmp_path / "a")["cost_usd"]) == [0.25, 0.25]
    defaults = {"model": "flux-schnell", "size": "256x256", **B64}
    await run_batch(gateway, prompts=path, output=str(tmp_path / "b"), prices=prices, request_defaults=defaults)
    assert list(current(tmp_path / "b")["cost_usd"]) == [0.003, 0.003]


# -- budgets -----------------------------------------------------------------------------------------------


async def test_budget_stops_dispatch_before_it_would_be_exceeded(tmp_path, gateway_factory):
    gateway = gateway_factory(GatewayConfig(latency=(0.05, 0.05)))
    ids, texts = numbered(20)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    defaults = {"model": "dall-e-3", "size": "1024x1024", **B64}  # $0.04 per image
    summary = await run_batch(
        gateway, prompts=path, output=str(tmp_path / "out"), request_defaults=defaults, max_cost_usd=0.2,
        max_in_flight=4,
    )
    stats = gateway.stats()
    assert stats["generation_requests"] <= 5 and stats["charged_images"] <= 5
    assert summary.succeeded <= 5 and summary.cost_usd <= 0.2 + 1e-9
    assert summary.succeeded == 5  # and the budget is used, not just respected
    assert "budget" in summary.stopped_reason and "max_cost_usd" in summary.stopped_reason
    assert summary.not_attempted == 15
    assert history(tmp_path / "out")["cost_usd"].sum() <= 0.2 + 1e-9


async def test_budget_holds_for_a_model_without_a_list_price(tmp_path, gateway_factory):
    """No list price: the first image is sent alone, then the budget uses what images actually cost."""
    gateway = gateway_factory(GatewayConfig(latency=(0.05, 0.05)))
    ids, texts = numbered(20)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    defaults = {"model": "black-forest-labs/flux-schnell", "size": "256x256"}  # the router reports $0.01
    summary = await run_batch(
        gateway, prompts=path, output=str(tmp_path / "out"), request_defaults=defaults, dialect="router",
        max_cost_usd=0.03, max_in_flight=4,
    )
    stats = gateway.stats()
    assert stats["spent_usd"] <= 0.03 + 1e-9 and stats["charged_images"] == summary.succeeded == 3
    assert summary.cost_usd == pytest.approx(0.03)
    assert "budget" in summary.stopped_reason


async def test_budget_of_zero_sends_nothing(tmp_path, gateway):
    ids, texts = numbered(3)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    summary = await run_batch(gateway, prompts=path, output=str(tmp_path / "out"), max_cost_usd=0.0)
    assert gateway.stats()["generation_requests"] == 0
    assert (summary.succeeded, summary.not_attempted) == (0, 3) and "budget" in summary.stopped_reason


# -- dry run -----------------------------------------------------------------------------------------------


async def test_dry_run_counts_and_estimates_without_calling_the_gateway(tmp_path, gateway):
    ids, texts = numbered(6)
    texts[5] = ""
    path = write_prompts(
        tmp_path / "p.parquet", texts, ids=ids, model=[None, None, None, "flux-schnell", "gpt-image-1", None],
    )
    output = tmp_path / "out"
    config = RunConfig(
        prompts=path, output=str(output), dry_run=True, images_per_prompt=2,
        request_defaults={"model": "dall-e-3", "size": "1024x1024"},
    )
    summary = await BatchRunner(config, client=None).run()
    assert summary.dry_run and summary.total_images == 12
    assert summary.unpriced_images == 2  # flux-schnell has no list price
    assert summary.failed == 2  # the empty prompt's two images
    gpt_high = (math.ceil(len(texts[4]) / 4) * 5.0 + 4160 * 40.0) / 1_000_000  # no quality: estimated at high
    assert summary.estimated_cost_usd == pytest.approx(3 * 2 * 0.04 + 2 * gpt_high)
    assert summary.cost_usd == 0.0 and summary.succeeded == 0
    assert gateway.stats()["generation_requests"] == 0
    assert not output.exists()
    with pytest.raises(ValueError, match="client"):
        BatchRunner(RunConfig(prompts=path, output=str(output)), client=None)


# -- cost report -------------------------------------------------------------------------------------------


async def test_cost_report_aggregates_the_full_history_and_plots_a_png(tmp_path, gateway):
    ids, texts = numbered(3)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    first, second = tmp_path / "first", tmp_path / "second"
    # First output: p001 is paid for but cannot be stored; it is kept in the rescue folder and stored by the
    # rerun: one payment, one success.
    blocked = first / "images" / "p001" / f"0-{derive_seed(0, 'p001', 0)}.png"
    blocked.mkdir(parents=True)
    with pytest.raises(OutputWriteError):
        await run_batch(gateway, prompts=path, output=str(first), labels={"dag_id": "dag_a"}, provider="local")
    blocked.rmdir()
    await run_batch(gateway, prompts=path, output=str(first), labels={"dag_id": "dag_a"}, provider="local")
    # Second output: another model through another dialect and DAG, one refused prompt.
    texts2 = ["a reef", "forbidden-content"]
    path2 = write_prompts(tmp_path / "p2.parquet", texts2, ids=["r", "f"])
    await run_batch(gateway, prompts=path2, output=str(second), dialect="indoxhub", labels={"dag_id": "dag_b"})

    report = build_cost_report([str(first), str(second), str(tmp_path / "empty")])
    assert list(report.columns) == [*REPORT_GROUPS, "images_succeeded", "images_failed", "cost_usd", "unpriced_images"]
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert set(report["day"]) == {today}
    a = report[report["dag_id"] == "dag_a"]
    assert len(a) == 1
    a = a.iloc[0]
    assert (a["model"], a["provider"]) == ("dall-e-2", "local")
    assert (a["images_succeeded"], a["images_failed"]) == (3, 0)
    assert a["cost_usd"] == pytest.approx(3 * SMALL_PRICE)
    b = report[report["dag_id"] == "dag_b"].set_index("provider")
    # The gateway names the provider of a generated image; the refused one never got that far.
    assert sorted(b.index) == ["openai", "unknown"]
    assert (b.loc["openai", "images_succeeded"], b.loc["openai", "cost_usd"]) == (1, pytest.approx(SMALL_PRICE))
    assert (b.loc["unknown", "images_failed"], b.loc["unknown", "cost_usd"]) == (1, 0.0)
    histories = pd.concat([history(first), history(second)])
    # One attempt, one payment: the stored rescued image supersedes its failed row (same run and finish time).
    attempts = histories.drop_duplicates(["run_id", "prompt_id", "image_index", "finished_at"])
    assert report["cost_usd"].sum() == pytest.approx(attempts["cost_usd"].sum())

    png = plot_cost_report(report, str(tmp_path / "cost.png"))
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 100
    empty = build_cost_report([str(tmp_path / "empty")])
    assert empty.empty
    with Image.open(plot_cost_report(empty, str(tmp_path / "empty.png"))) as image:
        assert image.format == "PNG"
    assert SMALL["model"] == "dall-e-2"


async def test_cost_report_leaves_simulated_spend_out_unless_asked(tmp_path, gateway):
    ids, texts = numbered(2)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    real, simulated = tmp_path / "real", tmp_path / "simulated"
    await run_batch(gateway, prompts=path, output=str(real))
    await run_batch(gateway, prompts=path, output=str(simulated), simulated=True)
    assert set(current(simulated)["cost_source"]) == {"simulated"}

    default = build_cost_report([str(real), str(simulated)])
    assert default["cost_usd"].sum() == pytest.approx(2 * SMALL_PRICE)
    assert int(default["images_succeeded"].sum()) == 2
    everything = build_cost_report([str(real), str(simulated)], include_simulated=True)
    assert everything["cost_usd"].sum() == pytest.approx(4 * SMALL_PRICE)
    assert build_cost_report([str(simulated)]).empty

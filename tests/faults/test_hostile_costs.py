"""A gateway's numbers are untrusted: NaN, negative, string and infinite costs, and more images than
requested. ``--max-cost`` holds against each; paid images are costed and recorded, never silently dropped."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from imagegen_provider.cli import main
from imagegen_provider.engine.metadata import read_metadata
from imagegen_provider.engine.storage import StorageLocation

from .conftest import SMALL_ARGS, SMALL_PRICE, prompts, recorded_rows, report, stored_images


def _rows(output) -> pd.DataFrame:
    return read_metadata(StorageLocation.from_url(str(output))).to_pandas()


def _run_json(capsys, *argv: str) -> tuple[int, dict, str]:
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else {}), captured.err


@pytest.mark.parametrize(
    "cost", ["NaN", -5, "free", "1e309", "-0.5"], ids=["nan", "negative", "string", "inf", "negative-string"]
)
def test_garbage_cost_is_counted_at_the_list_price_and_the_budget_holds(tmp_path, hostile, capsys, rescue_dir, cost):
    hostile.hostility.cost = cost
    output = tmp_path / "out"
    code, result, err = _run_json(
        capsys, "run", prompts(tmp_path, 20), str(output), "--base-url", hostile.base_url, *SMALL_ARGS,
        "--max-cost", "0.1", "--max-in-flight", "4", "--no-finalize",
    )
    paid = hostile.ledger.charged_requests
    report(f"garbage cost {cost!r}, --max-cost 0.1", paid=paid, stored=stored_images(output),
           recorded=recorded_rows(output, rescue_dir), exit=code)
    assert code == 1, err
    assert "budget" in result["run"]["stopped_reason"]
    # At $0.016 list price, six images fit $0.10; the garbage never made an image look free.
    assert paid == 6 and paid * SMALL_PRICE <= 0.1
    rows = _rows(output)
    assert len(rows) == paid and (rows["status"] == "succeeded").all()
    assert rows["cost_usd"].tolist() == [SMALL_PRICE] * paid and set(rows["cost_source"]) == {"estimated"}
    assert result["run"]["cost_usd"] == pytest.approx(paid * SMALL_PRICE)


def test_no_price_and_no_usable_cost_stops_instead_of_spending_blind(tmp_path, hostile, capsys, rescue_dir):
    hostile.hostility.cost = "NaN"
    output = tmp_path / "out"
    code, result, err = _run_json(
        capsys, "run", prompts(tmp_path, 20), str(output), "--base-url", hostile.base_url,
        "--model", "mystery-model", "--size", "256x256", "--max-cost", "1", "--max-in-flight", "4", "--no-finalize",
    )
    paid = hostile.ledger.charged_requests
    report("unpriced model + garbage cost, --max-cost 1", paid=paid, stored=stored_images(output),
           recorded=recorded_rows(output, rescue_dir), exit=code)
    assert code == 1, err
    assert "cannot be enforced" in result["run"]["stopped_reason"] and "--price-as" in result["run"]["stopped_reason"]
    assert paid == 1  # the first request of a budgeted run goes alone: one blind image, not a window of them
    assert len(_rows(output)) == 1


def test_price_as_makes_an_alias_budgetable(tmp_path, hostile, capsys, rescue_dir):
    output = tmp_path / "out"
    code, result, err = _run_json(
        capsys, "run", prompts(tmp_path, 20), str(output), "--base-url", hostile.base_url,
        "--model", "mystery-model", "--size", "256x256", "--price-as", "mystery-model=dall-e-2",
        "--max-cost", "0.05", "--max-in-flight", "4", "--no-finalize",
    )
    assert code == 1, err
    assert "budget" in result["run"]["stopped_reason"]
    assert hostile.ledger.charged_requests == 3  # 3 x $0.016 <= $0.05 < 4 x $0.016
    assert set(_rows(output)["cost_usd"]) == {SMALL_PRICE}


def test_extra_images_are_costed_recorded_and_the_budget_holds(tmp_path, hostile, capsys, rescue_dir, caplog):
    hostile.hostility.images = 4  # four images for every n=1 request, each billed
    output = tmp_path / "out"
    code, result, err = _run_json(
        capsys, "run", prompts(tmp_path, 20), str(output), "--base-url", hostile.base_url, *SMALL_ARGS,
        "--max-cost", "0.2", "--max-in-flight", "4", "--no-finalize",
    )
    charged = hostile.ledger.charged_images
    report("4 images per n=1 request, --max-cost 0.2", paid=charged, paid_requests=hostile.ledger.charged_requests,
           stored=stored_images(output), recorded=recorded_rows(output, rescue_dir), exit=code)
    assert code == 1, err
    # The first request calibrates: responses cost 4 x $0.016, so 3 of them fit $0.20.
    assert hostile.ledger.charged_requests == 3 and charged == 12
    assert charged * SMALL_PRICE <= 0.2
    rows = _rows(output)
    assert rows["cost_usd"].tolist() == [pytest.approx(4 * SMALL_PRICE)] * 3  # a row carries its whole response
    assert result["run"]["cost_usd"] == pytest.approx(charged * SMALL_PRICE)
    assert result["run"]["extra_images"] == 9
    assert stored_images(output) == 3
    assert "more than requested" in caplog.text

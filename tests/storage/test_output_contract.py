"""One output contract for every store: a local folder, ``s3://`` (moto) and ``az://`` (Azurite) behave alike —
a run stores every image and row, a rerun sends nothing, lost objects (and only those) are generated again, the
history holds each attempt once, and finalize leaves a dataset readable where it lies."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from imagegen_provider.engine import finalize_output
from imagegen_provider.engine.metadata import METADATA_DIR

from ..engine._support import SMALL_PRICE, current, history, numbered, run_batch, write_prompts
from ._stores import Store


def _requests(gateway) -> int:
    return gateway.stats()["generation_requests"]


def _raw_parts(store: Store) -> pd.DataFrame:
    """``metadata/*.parquet`` as any reader sees it (DuckDB's glob, pandas over the files): the journal aside."""
    fs = store.fs
    parts = [p for p in fs.glob(store.path(f"{METADATA_DIR}/*.parquet")) if not p.rsplit("/", 1)[-1].startswith(".")]
    frames = [pq.read_table(fs.open(part, "rb")).to_pandas() for part in parts]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


async def test_run_resume_regenerate_finalize(store: Store, tmp_path, gateway):
    ids, texts = numbered(12)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    options = dict(store.storage_options)

    first = await run_batch(gateway, prompts=prompts, output=store.url, output_storage_options=options)
    assert (first.succeeded, first.failed) == (12, 0)
    assert _requests(gateway) == 12

    again = await run_batch(gateway, prompts=prompts, output=store.url, output_storage_options=options)
    assert (again.skipped_existing, again.succeeded) == (12, 0)
    assert _requests(gateway) == 12  # a rerun of a complete output sends nothing

    rows = current(store.url, options)
    victims = sorted(rows["file_name"])[3:6]
    store.fs.rm([store.path(name) for name in victims])
    store.fs.invalidate_cache()
    third = await run_batch(gateway, prompts=prompts, output=store.url, output_storage_options=options)
    assert (third.skipped_existing, third.succeeded, third.failed) == (9, 3, 0)
    assert _requests(gateway) == 15  # exactly the three lost images, nothing else
    regenerated = {b["prompt"] for b in gateway.stats()["last_request_bodies"][-3:]}
    assert regenerated == {texts[ids.index(rows.set_index("file_name").loc[v, "prompt_id"])] for v in victims}
    assert all(store.fs.exists(store.path(name)) for name in victims)

    report = finalize_output(store.url, prompts=prompts, output_storage_options=options)
    assert (report.succeeded, report.missing, report.complete) == (12, 0, True)
    dataset = pd.read_parquet(f"{store.url}/metadata.parquet", storage_options=options or None)
    assert len(dataset) == 12 and not dataset.duplicated(["prompt_id", "image_index"]).any()
    assert (dataset["status"] == "succeeded").all()

    raw = _raw_parts(store)
    assert len(raw) == 15 == len(history(store.url, options))  # every paid attempt once, the journal folded
    assert not raw.duplicated(["run_id", "prompt_id", "image_index"]).any()
    assert raw["cost_usd"].sum() == pytest.approx(15 * SMALL_PRICE, rel=1e-9)



async def test_image_uri_keeps_the_scheme_written(store: Store, tmp_path, gateway):
    ids, texts = numbered(2)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    summary = await run_batch(
        gateway, prompts=prompts, output=store.url, output_storage_options=dict(store.storage_options)
    )
    rows = current(store.url, store.storage_options)
    expected_prefix = store.url.rstrip("/") + "/images/"
    if store.kind == "local":
        expected_prefix = "file://" + expected_prefix
    assert all(uri.startswith(expected_prefix) for uri in rows["image_uri"]), list(rows["image_uri"])
    assert summary.output_uri.rstrip("/") == expected_prefix.removesuffix("/images/")
    for uri in rows["image_uri"]:
        assert store.fs.cat_file(uri)[:4] == b"\x89PNG"  # the URI as written reaches the object


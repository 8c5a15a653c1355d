"""Issue 9 (data integrity), finalize and resume: every referenced image is checked against the folder (size
from one listing; sha256 with verify), missing or changed files are reported by prompt id and image index and
regenerated on resume; one current row per image (success or last failure); a shard finalizes against its own
rows; a journal a live shard still writes is never folded."""

from __future__ import annotations

import json
import re
import sys
import types

import pandas as pd
import pytest
from fsspec.implementations.local import LocalFileSystem

from imagegen_provider.engine import finalize as finalize_module
from imagegen_provider.engine import finalize_output
from imagegen_provider.engine.finalize import (
    CURRENT_TABLE,
    DATASET_TABLE,
    SUMMARY_FILE,
    IncompleteOutputError,
    LeaseHolder,
    LiveShardError,
)
from imagegen_provider.engine.metadata import MetadataSink
from imagegen_provider.engine.resume import ResumeState, check_stored
from imagegen_provider.engine.storage import StorageLocation

from ._support import current, image_files, numbered, run_batch, write_prompts


@pytest.fixture
async def stored(tmp_path, gateway):
    """Six images on disk, finalized once."""
    ids, texts = numbered(6)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    summary = await run_batch(gateway, prompts=prompts, output=str(output))
    assert summary.succeeded == 6
    return prompts, output, ids


def _damage(output, ids) -> dict[str, str]:
    """p000: deleted; p001: a byte appended (size differs); p002: same size, other bytes (only sha256 tells)."""
    rows = current(output)
    names = {pid: rows.loc[(pid, 0), "file_name"] for pid in ids[:3]}
    (output / names[ids[0]]).unlink()
    with open(output / names[ids[1]], "ab") as handle:
        handle.write(b"\0")
    data = bytearray((output / names[ids[2]]).read_bytes())
    data[-20] ^= 0xFF
    (output / names[ids[2]]).write_bytes(bytes(data))
    return names


# -- item 3: finalize and resume check the folder ------------------------------------------------------------


async def test_finalize_reports_missing_and_changed_files_by_prompt_and_index(stored, gateway):
    prompts, output, ids = stored
    names = _damage(output, ids)
    report = finalize_output(str(output), prompts=prompts, contact_sheet=False)
    assert (report.succeeded, report.damaged, report.missing, report.complete) == (4, 2, 0, False)
    damaged = sorted(map(tuple, report.damaged_images))
    assert [d[:2] for d in damaged] == [(ids[0], 0), (ids[1], 0)] and damaged[0][2] == "missing"
    assert re.fullmatch(r"size \d+, recorded \d+", damaged[1][2])

    verified = finalize_output(str(output), prompts=prompts, verify=True, contact_sheet=False)
    assert (verified.succeeded, verified.damaged, verified.verified) == (3, 3, True)
    assert (ids[2], 0, "sha256 differs") in map(tuple, verified.damaged_images)
    summary = json.loads((output / SUMMARY_FILE).read_text())
    assert summary["complete"] is False and len(summary["damaged_images"]) == 3

    # The dataset holds only intact images; the current table says what happened to the others.
    dataset = pd.read_parquet(output / DATASET_TABLE)
    assert sorted(dataset["prompt_id"]) == ids[3:]
    now = pd.read_parquet(output / CURRENT_TABLE).set_index("prompt_id")
    assert now.loc[ids[0], "error_type"] == "ImageFileMissing" and pd.isna(now.loc[ids[0], "file_name"])
    assert now.loc[ids[2], "error_type"] == "ImageFileChanged"
    assert names[ids[2]] in now.loc[ids[2], "error_message"]

    with pytest.raises(IncompleteOutputError, match=r"3 missing or changed image files") as raised:
        finalize_output(str(output), prompts=prompts, verify=True, fail_if_incomplete=True, contact_sheet=False)
    assert raised.value.report.damaged == 3


async def test_resume_regenerates_exactly_the_missing_and_changed_images(stored, gateway):
    prompts, output, ids = stored
    _damage(output, ids)
    location = StorageLocation.from_url(str(output))
    plain = ResumeState.load(location)
    assert (plain.missing_files, plain.changed_files) == (1, 1)
    assert plain.done == {(pid, 0) for pid in ids[2:]}
    checked = ResumeState.load(location, verify=True)
    assert checked.changed_files == 2 and checked.done == {(pid, 0) for pid in ids[3:]}

    before = gateway.stats()["generation_requests"]
    summary = await run_batch(gateway, prompts=prompts, output=str(output))
    assert (summary.succeeded, summary.skipped_existing) == (2, 4)  # the runner checks sizes (no verify)
    assert gateway.stats()["generation_requests"] == before + 2
    report = finalize_output(str(output), prompts=prompts, contact_sheet=False)
    assert (report.damaged, report.succeeded) == (0, 6)


async def test_sizes_come_from_one_listing_not_a_request_per_file(stored, monkeypatch):
    _prompts, output, _ids = stored
    location = StorageLocation.from_url(str(output))
    frame = current(output)
    calls = {"find": 0}
    real_find = LocalFileSystem.find

    def find(self, *args, **kwargs):
        calls["find"] += 1
        return real_find(self, *args, **kwargs)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("no per-file request")

    monkeypatch.setattr(LocalFileSystem, "find", find)
    for name in ("exists", "size", "isfile"):
        monkeypatch.setattr(LocalFileSystem, name, forbidden)
    assert check_stored(location, frame) == []
    assert calls["find"] == 1


# -- item 4: one current row per image ---------------------------------------------------------------------


async def test_current_table_keeps_each_images_last_failure_and_the_dataset_loads(tmp_path, gateway, monkeypatch):
    ids, texts = numbered(4)
    texts[1] = "a forbidden-content kite"
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    await run_batch(gateway, prompts=prompts, output=str(output), run_id="first")
    await run_batch(gateway, prompts=prompts, output=str(output), run_id="second")
    report = finalize_output(str(output), prompts=prompts)
    assert (report.succeeded, report.failed) == (3, 1)

    table = pd.read_parquet(output / CURRENT_TABLE)
    assert len(table) == 4 and not table.duplicated(["prompt_id", "image_index"]).any()
    failed = table.set_index("prompt_id").loc[ids[1]]
    assert (failed["status"], failed["error_type"], failed["run_id"]) == ("failed", "ContentPolicyError", "second")
    assert pd.isna(failed["file_name"])
    assert set(table["status"]) == {"succeeded", "failed"}
    dataset = pd.read_parquet(output / DATASET_TABLE)
    assert len(dataset) == 3 and (dataset["status"] == "succeeded").all()

    # imagefolder would turn a row without file_name into an example whose image is None: the dataset table
    # holds the stored images only, and every example has its image.
    for variable, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(variable, value)
    import datasets

    loaded = datasets.load_dataset(
        "imagefolder", data_dir=str(output), cache_dir=str(tmp_path / "hf" / "cache"), split="train"
    )
    assert loaded.num_rows == 3
    assert all(example["image"] is not None and example["image"].size == (256, 256) for example in loaded)


async def test_a_row_range_finalizes_against_its_own_rows(tmp_path, gateway):
    """Before: a ``--rows 0:10`` run finalized against the whole table and reported 50 missing images."""
    ids, texts = numbered(60)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids, row_group_size=16)
    output = tmp_path / "out"
    await run_batch(gateway, prompts=prompts, output=str(output), row_start=0, row_stop=10)
    whole = finalize_output(str(output), prompts=prompts, contact_sheet=False)
    assert (whole.expected_images, whole.missing) == (60, 50)
    shard = finalize_output(str(output), prompts=prompts, row_start=0, row_stop=10, contact_sheet=False)
    assert (shard.expected_images, shard.succeeded, shard.missing, shard.complete) == (10, 10, 0, True)
    assert (shard.row_start, shard.row_stop) == (0, 10)
    other = finalize_output(str(output), prompts=prompts, row_start=10, row_stop=20, contact_sheet=False)
    assert (other.expected_images, other.succeeded, other.missing, other.total_cost_usd) == (10, 0, 10, 0.0)
    assert len(pd.read_parquet(output / DATASET_TABLE)) == 10  # the tables still hold every image on record
    with pytest.raises(ValueError, match="need the prompt table"):
        finalize_output(str(output), row_start=0, row_stop=10)


# -- item 5: a journal a live shard still writes is not folded ---------------------------------------------


async def _live_journal(tmp_path, gateway):
    ids, texts = numbered(4)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    await run_batch(gateway, prompts=prompts, output=str(output), row_start=0, row_stop=2, shard="rows-a")
    # A shard still running: its rows are in its journal only.
    location = StorageLocation.from_url(str(output))
    sink = MetadataSink(location, writer="rows-b")
    frame = current(output).reset_index(drop=True)
    for row in frame.astype(object).where(frame.notna(), None).to_dict("records"):
        await sink.add({**row, "prompt_id": row["prompt_id"] + "-b", "shard": "rows-b"})
    return prompts, output


async def test_finalize_refuses_to_fold_a_live_shards_journal(tmp_path, gateway, monkeypatch):
    prompts, output = await _live_journal(tmp_path, gateway)
    journal = sorted((output / "metadata" / "_journal" / "rows-b").glob("*.json"))
    parts = sorted((output / "metadata").glob("*.parquet"))
    holder = LeaseHolder(shard="rows-b", holder="worker-7 pid 4242")
    monkeypatch.setattr(finalize_module, "_live_leases", lambda location: [holder])
    with pytest.raises(LiveShardError, match=r"shard 'rows-b' held by worker-7 pid 4242"):
        finalize_output(str(output), prompts=prompts)
    assert sorted((output / "metadata" / "_journal" / "rows-b").glob("*.json")) == journal  # untouched
    assert sorted((output / "metadata").glob("*.parquet")) == parts

    # A shard finalizing its own rows leaves the live journal alone and still reads it.
    report = finalize_output(str(output), prompts=prompts, row_start=0, row_stop=2, contact_sheet=False)
    assert report.complete
    assert sorted((output / "metadata" / "_journal" / "rows-b").glob("*.json")) == journal

    # A lease on a shard without a journal does not block; once the lease is gone, finalize folds.
    monkeypatch.setattr(finalize_module, "_live_leases", lambda location: [LeaseHolder("rows-c", "x")])
    finalize_output(str(output), prompts=prompts, contact_sheet=False)
    assert not list((output / "metadata" / "_journal").rglob("*.json"))


async def test_leases_are_read_through_engine_lease_when_it_exists(tmp_path, gateway, monkeypatch):
    prompts, output = await _live_journal(tmp_path, gateway)
    seen = []

    def live_leases(location):
        seen.append(location)
        return [{"shard": "rows-b", "holder": "host-b:99"}]

    module = types.ModuleType("imagegen_provider.engine.lease")
    module.live_leases = live_leases  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "imagegen_provider.engine.lease", module)
    with pytest.raises(LiveShardError, match="host-b:99"):
        finalize_output(str(output), prompts=prompts)
    assert len(seen) == 1 and seen[0].uri.endswith("/out")
    assert image_files(output)  # nothing was deleted


async def test_object_store_sizes_and_sha256_are_checked_too(tmp_path, gateway, s3_server):
    import uuid

    import s3fs

    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    base = f"s3://{s3_server['bucket']}/verify-{uuid.uuid4().hex}"
    ids, texts = numbered(3)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    await run_batch(gateway, prompts=prompts, output=f"{base}/out", output_storage_options=options)
    names = current(f"{base}/out", options)["file_name"].tolist()
    data = bytearray(fs.cat_file(f"{base}/out/{names[0]}"))
    data[-20] ^= 0xFF
    fs.pipe_file(f"{base}/out/{names[0]}", bytes(data))
    fs.rm(f"{base}/out/{names[1]}")
    fs.invalidate_cache()
    report = finalize_output(f"{base}/out", prompts=prompts, verify=True, output_storage_options=options)
    assert sorted(map(tuple, report.damaged_images)) == [(ids[0], 0, "sha256 differs"), (ids[1], 0, "missing")]
    assert report.succeeded == 1 and not report.complete
    assert fs.exists(f"{base}/out/contact_sheet.png")

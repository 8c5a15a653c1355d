"""Issue 9 (data integrity): image folders never collide (not even case-folded, not even with the hashed form of
another id), Windows device names are escaped; per-row values are used as given or fail their row, naming the
field, before anything is spent."""

from __future__ import annotations

import itertools
import random
import re
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagegen_provider.engine import finalize_output
from imagegen_provider.engine import keys as keys_module
from imagegen_provider.engine.keys import WINDOWS_DEVICE_NAMES, is_plain_name, safe_id
from imagegen_provider.engine.prompts import PromptTableError
from imagegen_provider.wire.request import MAX_SEED

from ._support import current, image_files, numbered, run_batch, write_prompts

_FOLDER = re.compile(r"[a-z0-9][a-z0-9._-]*")


def _assert_portable(name: str) -> None:
    assert _FOLDER.fullmatch(name), name
    assert not name.endswith("."), name
    assert name.split(".", 1)[0] not in WINDOWS_DEVICE_NAMES, name
    assert len(name) <= 100, name


# -- keys: the cases of the issue --------------------------------------------------------------------------


async def test_an_id_equal_to_the_sanitised_form_of_another_gets_its_own_folder(tmp_path, gateway):
    """Before: ``a/b`` and ``a_b-c14cddc033f64b9d`` with the same seed both wrote images/a_b-c14cddc033f64b9d/0-7.png
    (one image lost, exit 0)."""
    twin = "a_b-c14cddc033f64b9d"
    assert safe_id("a/b") == twin  # hostile ids keep their folder
    ids = ["a/b", twin]
    path = write_prompts(tmp_path / "p.parquet", ["a fox", "a hen"], ids=ids, seed=[7, 7])
    output = tmp_path / "out"
    summary = await run_batch(gateway, prompts=path, output=str(output))
    assert summary.succeeded == 2
    rows = current(output)
    names = {pid: rows.loc[(pid, 0), "file_name"] for pid in ids}
    assert names["a/b"] == f"images/{twin}/0-7.png"
    assert names[twin] != names["a/b"] and names[twin].startswith(f"images/{twin}-")
    assert image_files(output) == sorted(names.values())  # two files: nothing overwritten


async def test_ids_differing_in_case_get_folders_that_differ_case_folded(tmp_path, gateway):
    ids = ["Case", "case", "CASE"]
    path = write_prompts(tmp_path / "p.parquet", ["a", "b", "c"], ids=ids, seed=[1, 1, 1])
    output = tmp_path / "out"
    summary = await run_batch(gateway, prompts=path, output=str(output))
    assert summary.succeeded == 3
    folders = [current(output).loc[(pid, 0), "file_name"].split("/")[1] for pid in ids]
    assert folders[1] == "case"  # the lowercase id keeps its own name
    assert len({f.casefold() for f in folders}) == 3
    for folder in folders:
        _assert_portable(folder)


@pytest.mark.parametrize("pid", ["CON", "con", "NUL", "nul", "con.txt", "Aux.tar.gz", "com1", "LPT9", "prn."])
def test_windows_device_names_are_escaped(pid):
    name = safe_id(pid)
    _assert_portable(name)
    assert name != pid.lower()


def test_folders_are_injective_case_folded_over_adversarial_ids():
    rng = random.Random(9)
    alphabet = string.ascii_letters + string.digits + "._-/\\ :猫é"
    ids = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(4000)}
    # Every id's folder name taken as an id again, upper-cased variants, device names, hashed shapes.
    ids |= {safe_id(pid) for pid in list(ids)} | {pid.upper() for pid in list(ids)}
    ids |= set(WINDOWS_DEVICE_NAMES) | {n.upper() + ".txt" for n in WINDOWS_DEVICE_NAMES}
    ids |= {"x" * 80, "x" * 81, "a-0123456789abcdef", "a-0123456789ABCDEF", "a.", ".a", "-a", "_a", "id"}
    folders = {}
    for pid in ids:
        name = safe_id(pid)
        _assert_portable(name)
        assert name.casefold() not in folders, (pid, folders.get(name.casefold()))
        folders[name.casefold()] = pid
    assert len(folders) == len(ids)


def test_ordinary_ids_keep_their_folder():
    for pid in ["p001", "row00000012-1a2b3c4d", "cat-42", "img.001", "a_b", "42"]:
        assert is_plain_name(pid) and safe_id(pid) == pid
    for a, b in itertools.combinations(["a/b", "a_b", "a:b", "a b", "A_B"], 2):
        assert safe_id(a).casefold() != safe_id(b).casefold()


async def test_a_folder_collision_is_a_table_error_naming_both_ids(tmp_path, gateway, monkeypatch):
    # A 64-bit sha256 prefix collision cannot be found in a test: make every hash the same instead.
    monkeypatch.setattr(keys_module, "_id_hash", lambda _pid: "0" * 16)
    path = write_prompts(tmp_path / "p.parquet", ["a", "b", "c"], ids=["ok", "A/B", "a:b"])
    with pytest.raises(PromptTableError, match=r"row 2: ids 'A/B' and 'a:b' would share the image folder"):
        await run_batch(gateway, prompts=path, output=str(tmp_path / "out"))
    assert gateway.stats()["generation_requests"] == 0


# -- per-row values: the cases of the issue ----------------------------------------------------------------


async def _run_rows(tmp_path, gateway, **columns):
    ids, texts = numbered(len(next(iter(columns.values()))))
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids, **columns)
    output = tmp_path / "out"
    summary = await run_batch(gateway, prompts=path, output=str(output), images_per_prompt=2, accepts_seed=True)
    return ids, path, output, summary


async def test_out_of_range_seeds_fail_their_row_instead_of_wrapping(tmp_path, gateway):
    """Before: seed -5 became 2147483643 and 2**40 became 0, silently."""
    ids, _path, output, summary = await _run_rows(tmp_path, gateway, seed=[-5, 2**40, MAX_SEED, 10])
    rows = current(output)
    assert (summary.succeeded, summary.failed) == (3, 5)
    assert gateway.stats()["generation_requests"] == 3
    assert sorted(body["seed"] for body in gateway.stats()["last_request_bodies"]) == [10, 11, MAX_SEED]
    for pid, value in ((ids[0], "-5"), (ids[1], str(2**40))):
        for index in range(2):
            row = rows.loc[(pid, index)]
            assert (row["status"], row["error_type"], row["attempts"]) == ("failed", "InvalidRow", 0)
            assert re.search(rf"id '{pid}'.*seed: {re.escape(value)}", row["error_message"]), row["error_message"]
        assert rows.loc[(pid, 0), "seed"] == int(value)  # recorded as given, never wrapped
    # Image 0 of a row seeded MAX_SEED is fine; image 1 would need MAX_SEED + 1.
    assert rows.loc[(ids[2], 0), "status"] == "succeeded" and rows.loc[(ids[2], 0), "seed"] == MAX_SEED
    assert rows.loc[(ids[2], 1), "status"] == "failed"
    assert f"seed: {MAX_SEED} + image index 1 = {MAX_SEED + 1} is outside" in rows.loc[(ids[2], 1), "error_message"]
    assert [rows.loc[(ids[3], i), "seed"] for i in range(2)] == [10, 11]


async def test_unusable_n_fails_the_row_and_is_reported(tmp_path, gateway):
    """Before: n -3 silently used images_per_prompt; n 0 yielded nothing and was not reported missing."""
    ids, path, output, summary = await _run_rows(tmp_path, gateway, n=[-3, 0, 11, 3, None])
    rows = current(output)
    assert gateway.stats()["generation_requests"] == 3 + 2  # n=3, and images_per_prompt=2 for the null n
    for pid, n in ((ids[0], -3), (ids[1], 0), (ids[2], 11)):
        assert list(rows.loc[pid].index) == [0]  # one failed row, not images_per_prompt of them
        row = rows.loc[(pid, 0)]
        assert row["status"] == "failed" and row["error_type"] == "InvalidRow"
        assert f"n={n} is not a usable image count" in row["error_message"], row["error_message"]
    assert summary.total_images == 3 + 3 + 2
    report = finalize_output(str(output), prompts=path, images_per_prompt=2)
    assert (report.failed, report.missing, report.complete) == (3, 0, False)
    assert sorted(tuple(f[:2]) for f in report.failed_images) == [(ids[0], 0), (ids[1], 0), (ids[2], 0)]


async def test_n_above_the_models_maximum_fails_with_the_model_rule(tmp_path, gateway):
    ids, texts = numbered(2)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids, n=[2, 2], model=["dall-e-3", None])
    summary = await run_batch(gateway, prompts=path, output=str(tmp_path / "out"))
    rows = current(tmp_path / "out")
    assert (summary.succeeded, summary.failed) == (2, 2)
    for index in range(2):
        message = rows.loc[(ids[0], index), "error_message"]
        assert "n=2 is not a usable image count" in message and "dall-e-3 supports only n=1" in message


async def test_non_finite_numbers_fail_their_row(tmp_path, gateway):
    _ids, _path, output, summary = await _run_rows(tmp_path, gateway, guidance_scale=[float("inf"), 1.5])
    rows = current(output)
    assert summary.failed == 2
    assert "guidance_scale: inf is not a finite number" in rows.loc[("p000", 0), "error_message"]


async def test_an_unsigned_seed_beyond_int64_is_a_table_error_before_spending(tmp_path, gateway):
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table({"id": ["a", "b"], "prompt": ["x", "y"], "seed": pa.array([1, 2**64 - 1], pa.uint64())}), path
    )
    with pytest.raises(PromptTableError, match=r"row 1: seed 18446744073709551615 does not fit"):
        await run_batch(gateway, prompts=str(path), output=str(tmp_path / "out"))
    assert gateway.stats()["generation_requests"] == 0
    # Small unsigned seeds are fine.
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"], "seed": pa.array([3], pa.uint64())}), path)
    assert (await run_batch(gateway, prompts=str(path), output=str(tmp_path / "out"))).succeeded == 1

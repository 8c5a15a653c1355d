"""Seeds are a pure function of (base seed, prompt id, image index); image paths cannot leave the output."""

from __future__ import annotations

import io
import itertools
import posixpath

import pytest
from PIL import Image

from imagegen_provider.engine.keys import derive_seed, image_file_name, row_seed, safe_id
from imagegen_provider.wire.request import MAX_SEED

from ._support import all_files, current, history, image_files, numbered, run_batch, write_prompts

HOSTILE_IDS = [
    "../x",
    "/etc/passwd",
    "a/../../b",
    "\x00\n",
    "x" * 500,
    ".",
    "..",
    "猫/🐱",
    "café",
    "x",  # the plain id "../x" would clean to
    "a_.._.._b",  # what "a/../../b" cleans to
    "..\\..\\windows",
    "~/.ssh/id_rsa",
    " ",
]


# -- seeds -------------------------------------------------------------------------------------------------


def test_derived_seed_is_stable_in_range_and_depends_on_every_input():
    seed = derive_seed(7, "p1", 0)
    assert seed == derive_seed(7, "p1", 0)
    assert 0 <= seed <= MAX_SEED
    assert len({seed, derive_seed(8, "p1", 0), derive_seed(7, "p2", 0), derive_seed(7, "p1", 1)}) == 4
    assert row_seed(MAX_SEED, 1) == MAX_SEED + 1  # never wrapped: the plan fails the image instead


def _seeds(output) -> dict[tuple[str, int], int]:
    frame = history(output)
    keys = zip(frame["prompt_id"], frame["image_index"], frame["seed"], strict=True)
    return {(p, int(i)): int(s) for p, i, s in keys}


async def test_seeds_do_not_depend_on_concurrency_or_shard_layout(tmp_path, gateway):
    ids, texts = numbered(10)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids, row_group_size=3)
    common = {"prompts": path, "base_seed": 1234, "images_per_prompt": 2}
    await run_batch(gateway, output=str(tmp_path / "serial"), max_in_flight=1, **common)
    await run_batch(gateway, output=str(tmp_path / "wide"), max_in_flight=8, **common)
    await run_batch(gateway, output=str(tmp_path / "shard-a"), row_start=0, row_stop=4, **common)
    await run_batch(gateway, output=str(tmp_path / "shard-b"), row_start=4, row_stop=10, **common)
    serial = _seeds(tmp_path / "serial")
    assert len(serial) == 20
    assert serial == _seeds(tmp_path / "wide")
    assert serial == {**_seeds(tmp_path / "shard-a"), **_seeds(tmp_path / "shard-b")}
    assert serial == {(pid, i): derive_seed(1234, pid, i) for pid in ids for i in range(2)}
    # Another base seed, other seeds.
    await run_batch(gateway, output=str(tmp_path / "other"), **{**common, "base_seed": 1235})
    assert all(_seeds(tmp_path / "other")[k] != v for k, v in serial.items())


async def test_per_row_seed_column_wins_and_every_row_records_its_seed(tmp_path, gateway):
    path = write_prompts(
        tmp_path / "p.parquet",
        ["a lighthouse", "a harbour", None, "   "],
        ids=["own", "derived", "null-prompt", "blank"],
        seed=[4242, None, None, 77],
    )
    await run_batch(gateway, prompts=path, output=str(tmp_path / "out"), images_per_prompt=2, base_seed=9)
    rows = current(tmp_path / "out")
    assert rows.loc[("own", 0), "seed"] == 4242
    assert rows.loc[("own", 1), "seed"] == 4243
    assert rows.loc[("derived", 0), "seed"] == derive_seed(9, "derived", 0)
    assert rows.loc[("blank", 1), "seed"] == 78  # failed rows record their seed too
    assert rows["seed"].notna().all()
    assert rows.loc[("own", 0), "file_name"] == "images/own/0-4242.png"


@pytest.mark.parametrize(
    ("dialect", "accepts_seed", "where"),
    [("router", None, "top"), ("indoxhub", None, "additional_params"), ("openai", None, None), ("openai", True, "top")],
)
async def test_seed_goes_on_the_wire_only_where_the_dialect_takes_it(tmp_path, gateway, dialect, accepts_seed, where):
    ids, texts = numbered(3)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    defaults = {"model": "dall-e-2", "size": "256x256"}
    if dialect != "router":
        defaults["response_format"] = "b64_json"
    summary = await run_batch(
        gateway, prompts=path, output=str(tmp_path / "out"), request_defaults=defaults, base_seed=5,
        dialect=dialect, accepts_seed=accepts_seed,
    )
    assert summary.succeeded == 3
    bodies = {body["prompt"]: body for body in gateway.stats()["last_request_bodies"]}
    recorded = current(tmp_path / "out")
    for pid, text in zip(ids, texts, strict=True):
        body = bodies[text]
        sent = body.get("seed") if where == "top" else body.get("additional_params", {}).get("seed")
        assert recorded.loc[(pid, 0), "seed"] == derive_seed(5, pid, 0)
        if where is None:
            assert "seed" not in body and "seed" not in body.get("additional_params", {})
        else:
            assert sent == derive_seed(5, pid, 0)


# -- images per prompt and file layout ---------------------------------------------------------------------


async def test_three_images_per_prompt(tmp_path, gateway):
    ids, texts = numbered(2)
    path = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = tmp_path / "out"
    summary = await run_batch(gateway, prompts=path, output=str(output), images_per_prompt=3, base_seed=3)
    assert (summary.total_images, summary.succeeded) == (6, 6)
    assert gateway.stats()["generation_requests"] == 6
    assert all(body["n"] == 1 for body in gateway.stats()["last_request_bodies"])
    rows = current(output)
    assert len(rows) == 6
    for pid in ids:
        seeds = [int(rows.loc[(pid, i), "seed"]) for i in range(3)]
        assert len(set(seeds)) == 3
        for index, seed in enumerate(seeds):
            name = f"images/{pid}/{index}-{seed}.png"
            assert rows.loc[(pid, index), "file_name"] == name
            assert rows.loc[(pid, index), "image_uri"] == f"file://{output}/{name}"
            with Image.open(output / name) as image:
                assert (image.format, image.size) == ("PNG", (256, 256))
    assert image_files(output) == sorted(rows["file_name"])


# -- hostile ids -------------------------------------------------------------------------------------------


def test_safe_id_is_one_harmless_segment_and_injective():
    names = {safe_id(pid) for pid in HOSTILE_IDS}
    assert len(names) == len(HOSTILE_IDS)
    for pid in HOSTILE_IDS:
        name = safe_id(pid)
        assert name not in ("", ".", "..")
        assert "/" not in name and "\\" not in name and "\x00" not in name
        assert name.isascii() and len(name) <= 100
        path = posixpath.normpath(posixpath.join("out", image_file_name(pid, 0, 1, "png")))
        assert path.startswith("out/images/")
    assert safe_id("p001") == "p001"  # safe ids stay readable
    for a, b in itertools.combinations(["a/b", "a_b", "a:b", "a b", "a\\b"], 2):
        assert safe_id(a) != safe_id(b)


async def test_hostile_ids_never_write_outside_the_output_and_never_collide(tmp_path, gateway):
    texts = [f"a quiet meadow {i}" for i in range(len(HOSTILE_IDS))]
    prompts = write_prompts(tmp_path / "prompts.parquet", texts, ids=HOSTILE_IDS)
    output = tmp_path / "nested" / "out"
    summary = await run_batch(gateway, prompts=prompts, output=str(output), images_per_prompt=2)
    assert summary.succeeded == 2 * len(HOSTILE_IDS)
    # Nothing anywhere under the test's folder (the output's parent and beyond) but the prompts and the output.
    for path in all_files(tmp_path):
        assert path == tmp_path / "prompts.parquet" or output in path.parents, path
    rows = current(output)
    assert sorted(rows.index.get_level_values(0).unique()) == sorted(HOSTILE_IDS)
    folders = {pid: posixpath.dirname(rows.loc[(pid, 0), "file_name"]) for pid in HOSTILE_IDS}
    assert len(set(folders.values())) == len(HOSTILE_IDS)
    for pid, folder in folders.items():
        assert folder == f"images/{safe_id(pid)}"
        assert rows.loc[(pid, 1), "file_name"].startswith(folder + "/")
    assert image_files(output) == sorted(rows["file_name"])
    for name in rows["file_name"]:
        Image.open(io.BytesIO((output / name).read_bytes())).verify()

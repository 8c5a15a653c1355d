"""The CLI side of issue 9/13: ``imagegen run --rows`` finalizes against its own rows, ``imagegen finalize
--verify`` exits non-zero on a changed image, ``imagegen contact-sheet`` writes the sheet."""

from __future__ import annotations

import json

import pandas as pd
from PIL import Image

from imagegen_provider.cli import main

from ._support import numbered, write_prompts

_REQUEST = ["--model", "dall-e-2", "--size", "256x256", "--response-format", "b64_json", "--progress-interval", "60"]


def test_rows_run_finalize_verify_and_contact_sheet(tmp_path, capsys):
    ids, texts = numbered(60)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids, row_group_size=16)
    output = tmp_path / "out"
    # Before: the shard's finalize checked the whole table and reported 50 missing images.
    assert main(["run", prompts, str(output), "--rows", "0:10", *_REQUEST]) == 0
    summary = json.loads((output / "run_summary.json").read_text())
    assert (summary["expected_images"], summary["missing"], summary["complete"]) == (10, 0, True)
    assert (output / "contact_sheet.png").is_file()

    dataset = pd.read_parquet(output / "metadata.parquet")
    victim = output / dataset["file_name"].iloc[0]
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes: only --verify sees it
    victim.write_bytes(bytes(data))
    common = ["finalize", str(output), "--prompts", prompts, "--rows", "0:10", "--no-contact-sheet"]
    assert main(common) == 0
    capsys.readouterr()
    assert main([*common, "--verify"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert (printed["damaged"], printed["complete"], printed["verified"]) == (1, False, True)

    (output / "contact_sheet.png").unlink()
    assert main(["contact-sheet", str(output)]) == 0
    with Image.open(output / "contact_sheet.png") as sheet:
        assert sheet.size[0] > 0
    assert main(["contact-sheet", str(tmp_path / "nothing")]) == 1

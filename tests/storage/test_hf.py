"""A finalized output loads as a Hugging Face image dataset with ``load_image_dataset``, on S3 as locally."""

from __future__ import annotations

import io
import uuid

import datasets
import PIL.Image
import s3fs

from imagegen_provider.engine import finalize_output
from imagegen_provider.engine.hf import load_image_dataset

from ..engine._support import numbered, run_batch, write_prompts


def _offline(monkeypatch, tmp_path) -> None:
    for variable, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(variable, value)


async def test_s3_output_loads_as_an_image_dataset(tmp_path, gateway_factory, s3_server, monkeypatch):
    _offline(monkeypatch, tmp_path)
    from imagegen_gateway import GatewayConfig

    ids, texts = numbered(5)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    options = s3_server["storage_options"]
    output = f"s3://{s3_server['bucket']}/hf-{uuid.uuid4().hex[:8]}"
    # One image refused by the gateway: the dataset holds the four stored ones, each with its image.
    refusing = gateway_factory(GatewayConfig(content_policy_trigger="number 2"))
    await run_batch(refusing, prompts=prompts, output=output, output_storage_options=options)
    finalize_output(output, prompts=prompts, output_storage_options=options, contact_sheet=False)

    loaded = load_image_dataset(output, options, cache_dir=str(tmp_path / "hf" / "cache"))
    assert isinstance(loaded, datasets.Dataset)
    assert loaded.num_rows == 4
    assert sorted(loaded["prompt_id"]) == [i for i in ids if i != "p002"]
    assert all(example["image"].size == (256, 256) for example in loaded)
    assert set(loaded["status"]) == {"succeeded"}
    first = loaded.filter(lambda row: row["prompt_id"] == "p000")[0]
    stored = s3fs.S3FileSystem(**options).cat_file(f"{output.removeprefix('s3://')}/{first['file_name']}")
    assert first["image"].tobytes() == PIL.Image.open(io.BytesIO(stored)).tobytes()  # the stored image itself


async def test_local_output_loads_the_same_way(tmp_path, gateway, monkeypatch):
    _offline(monkeypatch, tmp_path)
    ids, texts = numbered(3)
    prompts = write_prompts(tmp_path / "p.parquet", texts, ids=ids)
    output = str(tmp_path / "out")
    await run_batch(gateway, prompts=prompts, output=output)
    finalize_output(output, prompts=prompts, contact_sheet=False)
    loaded = load_image_dataset(output, cache_dir=str(tmp_path / "hf" / "cache"))
    assert sorted(loaded["prompt_id"]) == ids
    assert all(example["image"].size == (256, 256) for example in loaded)

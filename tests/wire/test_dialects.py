"""Dialects: the exact JSON body each gateway gets, built from the seeds' own examples."""

from __future__ import annotations

import json

import pytest

from imagegen_provider.wire import DIALECTS, Dialect, ImageRequest, RequestValidationError, WireBody, get_dialect
from imagegen_provider.wire.dialects import INDOXHUB, OPENAI, ROUTER

from ._support import case_ids, fixture_cases

SEED_REQUESTS = fixture_cases("requests")
BYOK = "sk-byok-never-log-me-0123456789"

# Seed 000: IndoxHub's documented top-level request fields.
INDOXHUB_DOCUMENTED = {"prompt", "model", "provider", "size", "n", "quality", "style", "response_format",
                       "additional_params", "byok_api_key"}
# Seed 004: the router's documented request fields.
ROUTER_DOCUMENTED = {"model", "prompt", "aspect_ratio", "background", "input_references", "n", "output_compression",
                     "output_format", "provider", "quality", "resolution", "seed", "size", "stream"}
GOOGLE_ONLY = {"negative_prompt": "blurry", "aspect_ratio": "1:1", "guidance_scale": 7.5, "enhance_prompt": True,
               "add_watermark": False}


def body(dialect: str, accepts_seed: bool | None = None, **params) -> WireBody:
    return get_dialect(dialect).build_body(ImageRequest.build(**params), accepts_seed=accepts_seed)


# --- the seeds' examples, body for body ----------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "case"), SEED_REQUESTS, ids=case_ids(SEED_REQUESTS))
def test_seed_example_body(fixture, case):
    wire = body(case["dialect"], case["accepts_seed"], **case["params"])
    assert wire.json == case["expected_body"]
    assert sorted(wire.dropped) == sorted(case["expected_dropped"])
    assert json.loads(json.dumps(wire.json)) == wire.json  # plain JSON, nothing exotic


def test_seed_003_minimal_example():
    wire = body("openai", prompt="A cute baby sea otter")
    assert wire == WireBody(json={"prompt": "A cute baby sea otter", "n": 1}, dropped=())


def test_seed_000_example_is_sent_unchanged_by_indoxhub():
    example = {"model": "openai/dall-e-3", "prompt": "A serene mountain landscape at sunset, photorealistic",
               "size": "1024x1024", "n": 1}
    wire = body("indoxhub", **example)
    assert wire.json == example
    assert "additional_params" not in wire.json
    assert wire.dropped == ()


# --- openai ------------------------------------------------------------------------------------------------


def test_openai_drops_seed_by_default():
    wire = body("openai", model="gpt-image-1", prompt="otter", seed=42)
    assert "seed" not in wire.json
    assert wire.dropped == ("seed",)


def test_openai_sends_seed_when_the_connection_accepts_it():
    wire = body("openai", accepts_seed=True, model="gpt-image-1", prompt="otter", seed=42)
    assert wire.json["seed"] == 42
    assert "seed" not in wire.dropped


def test_openai_seed_zero_is_still_a_seed():
    assert body("openai", accepts_seed=True, prompt="otter", seed=0).json["seed"] == 0


def test_openai_drops_google_and_router_only_fields_and_lists_them():
    wire = body("openai", model="imagen-3", prompt="lake", quality="hd", resolution="1K",
                input_references=["https://example.com/a.png"], **GOOGLE_ONLY)
    assert wire.json == {"model": "imagen-3", "prompt": "lake", "n": 1, "quality": "hd"}
    assert set(wire.dropped) == {*GOOGLE_ONLY, "resolution", "input_references"}


def test_openai_sends_every_documented_openai_field_top_level():
    params = {"model": "gpt-image-1", "prompt": "otter", "n": 2, "size": "1536x1024", "quality": "high",
              "user": "user-1234", "background": "opaque", "output_format": "webp", "output_compression": 70,
              "moderation": "low", "stream": True, "partial_images": 2}
    wire = body("openai", **params)
    assert wire.json == params
    assert wire.dropped == ()


def test_openai_merges_additional_params_top_level_without_overriding():
    wire = body("openai", model="imagen-3", prompt="lake", n=2, size="1024x1024",
                additional_params={"watermark": False, "model": "evil-override", "n": 9, "size": "16x16",
                                   "prompt": "other", "extra_body": {"x": 1}})
    assert wire.json == {"model": "imagen-3", "prompt": "lake", "n": 2, "size": "1024x1024", "watermark": False,
                         "extra_body": {"x": 1}}
    assert "additional_params" not in wire.json


def test_openai_drops_provider_name_and_byok_key():
    wire = body("openai", model="dall-e-3", prompt="lake", provider="openai", byok_api_key=BYOK)
    assert wire.json == {"model": "dall-e-3", "prompt": "lake", "n": 1}
    assert set(wire.dropped) == {"provider", "byok_api_key"}
    assert BYOK not in json.dumps(wire.json) and BYOK not in repr(wire)


def test_openai_rejects_provider_object():
    request = ImageRequest.build(prompt="lake", provider={"order": ["openai"]})
    with pytest.raises(RequestValidationError) as caught:
        OPENAI.build_body(request)
    assert caught.value.fields == ["provider"]
    assert "takes a provider name, not an object" in str(caught.value)


# --- indoxhub ----------------------------------------------------------------------------------------------


def test_indoxhub_top_level_is_documented_and_specific_fields_are_nested():
    wire = body("indoxhub", model="openai/gpt-image-1", provider="openai", prompt="lake", size="1024x1024", n=2,
                quality="high", background="transparent", output_format="png", moderation="low",
                byok_api_key=BYOK, seed=5, **GOOGLE_ONLY)
    assert set(wire.json) <= INDOXHUB_DOCUMENTED
    assert wire.json == {
        "model": "openai/gpt-image-1", "provider": "openai", "prompt": "lake", "size": "1024x1024", "n": 2,
        "quality": "high", "byok_api_key": BYOK,
        "additional_params": {**GOOGLE_ONLY, "seed": 5, "background": "transparent", "output_format": "png",
                              "moderation": "low"},
    }
    assert wire.dropped == ()


def test_indoxhub_output_compression_is_nested():
    wire = body("indoxhub", model="openai/gpt-image-1", prompt="lake", output_format="jpeg", output_compression=40)
    assert wire.json["additional_params"] == {"output_format": "jpeg", "output_compression": 40}
    assert "output_compression" not in wire.json


def test_indoxhub_callers_additional_params_win():
    wire = body("indoxhub", model="google/imagen-3", prompt="lake", seed=42, negative_prompt="fog",
                additional_params={"seed": 7, "sample_image_size": "2K"})
    assert wire.json["additional_params"] == {"seed": 7, "negative_prompt": "fog", "sample_image_size": "2K"}


def test_indoxhub_additional_params_alone_are_sent():
    wire = body("indoxhub", model="google/imagen-3", prompt="lake", additional_params={"person_generation": "allow"})
    assert wire.json == {"model": "google/imagen-3", "prompt": "lake", "n": 1,
                         "additional_params": {"person_generation": "allow"}}


def test_indoxhub_seed_dropped_when_connection_says_so():
    wire = body("indoxhub", accepts_seed=False, model="google/imagen-3", prompt="lake", seed=42)
    assert "additional_params" not in wire.json
    assert wire.dropped == ("seed",)


def test_indoxhub_sends_byok_key_but_it_never_leaks_from_the_request():
    request = ImageRequest.build(model="openai/dall-e-3", prompt="lake", byok_api_key=BYOK)
    wire = INDOXHUB.build_body(request)
    assert wire.json["byok_api_key"] == BYOK
    assert BYOK not in json.dumps(request.public_params())
    assert BYOK not in repr(request)
    assert BYOK not in str(request)


def test_indoxhub_rejects_provider_object_naming_the_field():
    request = ImageRequest.build(model="openai/dall-e-3", prompt="lake", provider={"name": "openai"})
    with pytest.raises(RequestValidationError) as caught:
        INDOXHUB.build_body(request)
    assert caught.value.fields == ["provider"]
    assert "indoxhub" in str(caught.value)


def test_indoxhub_drops_what_it_cannot_carry():
    wire = body("indoxhub", model="openai/gpt-image-1", prompt="lake", stream=True, partial_images=2,
                resolution="1K", input_references=["https://example.com/a.png"])
    assert wire.json == {"model": "openai/gpt-image-1", "prompt": "lake", "n": 1}
    assert set(wire.dropped) == {"stream", "partial_images", "resolution", "input_references"}


# --- router ------------------------------------------------------------------------------------------------


def test_router_passes_provider_object_through():
    provider = {"order": ["fal", "replicate"], "allow_fallbacks": False, "options": {"fal": {"safety_tolerance": 5}}}
    wire = body("router", model="black-forest-labs/flux", prompt="lake", provider=provider)
    assert wire.json["provider"] == provider
    assert wire.dropped == ()


def test_router_sends_seed_ratio_resolution_and_references_top_level():
    refs = ["https://example.com/ref.png", "data:image/png;base64,iVBORw0KGgo="]
    wire = body("router", model="google/imagen-4", prompt="lake", seed=42, aspect_ratio="9:16", resolution="4K",
                input_references=refs)
    assert wire.json == {"model": "google/imagen-4", "prompt": "lake", "n": 1, "seed": 42, "aspect_ratio": "9:16",
                         "resolution": "4K", "input_references": refs}
    assert set(wire.json) <= ROUTER_DOCUMENTED


def test_router_drops_string_provider():
    wire = body("router", model="google/imagen-4", prompt="lake", provider="google")
    assert "provider" not in wire.json
    assert wire.dropped == ("provider",)


def test_router_drops_undocumented_fields():
    wire = body("router", model="dall-e-3", prompt="lake", style="vivid", response_format="url", user="u-1",
                negative_prompt="fog", guidance_scale=3.0, enhance_prompt=True, add_watermark=True,
                byok_api_key=BYOK)
    assert wire.json == {"model": "dall-e-3", "prompt": "lake", "n": 1}
    assert set(wire.dropped) == {"style", "response_format", "user", "negative_prompt", "guidance_scale",
                                 "enhance_prompt", "add_watermark", "byok_api_key"}


def test_router_seed_can_be_disabled():
    wire = body("router", accepts_seed=False, model="google/imagen-4", prompt="lake", seed=1)
    assert "seed" not in wire.json and wire.dropped == ("seed",)


def test_router_additional_params_merge_without_overriding():
    wire = body("router", model="google/imagen-4", prompt="lake", seed=1,
                additional_params={"seed": 999, "safety_filter_level": "block_few"})
    assert wire.json["seed"] == 1
    assert wire.json["safety_filter_level"] == "block_few"


# --- registry --------------------------------------------------------------------------------------------------


def test_dialect_registry():
    assert set(DIALECTS) == {"openai", "indoxhub", "router"}
    assert get_dialect("openai") is OPENAI
    assert get_dialect("IndoxHub") is INDOXHUB
    assert get_dialect("ROUTER") is ROUTER
    assert get_dialect(ROUTER) is ROUTER
    assert all(d.path == "/images/generations" for d in DIALECTS.values())


@pytest.mark.parametrize("name", ["anthropic", "", "open-ai", "litellm"])
def test_get_dialect_unknown_name(name):
    with pytest.raises(ValueError, match="unknown dialect") as caught:
        get_dialect(name)
    assert "openai, indoxhub, router" in str(caught.value)


def test_custom_dialect_object_is_used_as_is():
    custom = Dialect(name="minimal", top_level=frozenset({"prompt", "model"}))
    assert get_dialect(custom) is custom
    wire = custom.build_body(ImageRequest.build(prompt="lake", model="m", n=3))
    assert wire.json == {"prompt": "lake", "model": "m"}
    assert wire.dropped == ("n",)


def test_build_body_is_deterministic_and_does_not_mutate_the_request():
    request = ImageRequest.build(model="google/imagen-3", prompt="lake", seed=3, additional_params={"k": 1})
    before = request.model_dump()
    first, second = INDOXHUB.build_body(request), INDOXHUB.build_body(request)
    assert first == second
    first.json["additional_params"]["k"] = 2
    assert request.model_dump() == before
    assert INDOXHUB.build_body(request).json["additional_params"]["k"] == 1

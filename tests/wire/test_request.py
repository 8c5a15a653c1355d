"""The request model itself: typed fields, ranges, extra="forbid", secrets, and the seeds' own examples."""

from __future__ import annotations

import pydantic
import pytest

from imagegen_provider.wire import ImageRequest, RequestValidationError, Violation
from imagegen_provider.wire.request import MAX_SEED

from ._support import fixture_cases

SEED_REQUESTS = fixture_cases("requests")


def rejected(field: str, rule: str, **params) -> RequestValidationError:
    """Build ``params``; assert it fails on ``field`` with a rule containing ``rule``; return the error."""
    params.setdefault("prompt", "a red fox in the snow")
    with pytest.raises(RequestValidationError) as caught:
        ImageRequest.build(**params)
    error = caught.value
    assert field in error.fields, f"{field!r} not named in {error.violations}"
    matching = [v for v in error.violations if v.field == field]
    assert any(rule.lower() in v.rule.lower() for v in matching), f"rule {rule!r} not in {matching}"
    assert field in str(error)
    return error


def accepted(**params) -> ImageRequest:
    params.setdefault("prompt", "a red fox in the snow")
    request = ImageRequest.build(**params)
    for key, value in params.items():
        if key != "byok_api_key":
            assert getattr(request, key) == value
    return request


# --- the seeds' own request examples -----------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "case"), SEED_REQUESTS, ids=[f"{f[:3]}-{c['name']}" for f, c in SEED_REQUESTS])
def test_seed_examples_are_valid_requests(fixture, case):
    request = ImageRequest.build(**case["params"])
    assert request.prompt == case["params"]["prompt"]
    assert request.model == case["params"].get("model")


# --- prompt --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [None, "dall-e-2", "dall-e-3", "gpt-image-1", "imagen-3"])
def test_empty_prompt_rejected_for_every_model(model):
    rejected("prompt", "at least 1 character", prompt="", model=model)


def test_missing_prompt_rejected():
    with pytest.raises(RequestValidationError) as caught:
        ImageRequest.build(model="dall-e-3")
    assert caught.value.fields == ["prompt"]
    assert "required" in caught.value.violations[0].rule.lower()


def test_one_character_prompt_accepted():
    accepted(prompt="x")


# --- n -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 11, -1, 100])
@pytest.mark.parametrize("model", [None, "dall-e-2", "gpt-image-1", "imagen-3"])
def test_n_outside_1_to_10_rejected(model, n):
    rule = "greater than or equal to 1" if n < 1 else "less than or equal to 10"
    rejected("n", rule, n=n, model=model)


@pytest.mark.parametrize("n", [1, 10])
@pytest.mark.parametrize("model", [None, "dall-e-2", "gpt-image-1", "gpt-image-2", "imagen-3"])
def test_n_boundaries_accepted(model, n):
    assert accepted(n=n, model=model).n == n


def test_n_defaults_to_one():
    assert ImageRequest.build(prompt="x").n == 1


# --- seed ----------------------------------------------------------------------------------------


def test_max_seed_is_int32_max():
    assert MAX_SEED == 2**31 - 1


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1])
def test_seed_in_range_accepted(seed):
    assert accepted(seed=seed).seed == seed


@pytest.mark.parametrize(("seed", "rule"), [(-1, "greater than or equal to 0"), (2**31, "less than or equal to"),
                                            (2**32, "less than or equal to")])
def test_seed_out_of_range_rejected(seed, rule):
    rejected("seed", rule, seed=seed)


# --- output_compression / partial_images ranges ------------------------------------------------------


@pytest.mark.parametrize(("value", "rule"), [(101, "less than or equal to 100"), (-1, "greater than or equal to 0")])
def test_output_compression_out_of_range_rejected(value, rule):
    rejected("output_compression", rule, model="gpt-image-1", output_format="jpeg", output_compression=value)


@pytest.mark.parametrize(("value", "rule"), [(4, "less than or equal to 3"), (-1, "greater than or equal to 0")])
def test_partial_images_out_of_range_rejected(value, rule):
    rejected("partial_images", rule, model="gpt-image-1", stream=True, partial_images=value)


# --- aspect_ratio format -------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", ["1:1", "16:9", "9:16", "21:9", "3:2", "100:1"])
def test_aspect_ratio_format_accepted(ratio):
    assert accepted(aspect_ratio=ratio).aspect_ratio == ratio


@pytest.mark.parametrize(
    "ratio", ["16x9", "16/9", "wide", "16:", ":9", "1:1:1", "1000:1", " 16:9", "16:9 ", "0:9", "16:0", "0:0"]
)
def test_aspect_ratio_format_rejected(ratio):
    rejected("aspect_ratio", "pattern", aspect_ratio=ratio)


# --- size shape (every model) ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["1024x1024", "auto", "2K", "4k", "1536x864", "64x64"])
def test_size_shapes_accepted_for_unknown_models(size):
    assert accepted(size=size, model="imagen-3").size == size


@pytest.mark.parametrize("size", ["1024*1024", "1024X1024", "1024x", "x1024", "large", "", "1024 x 1024", "0K",
                                  "00x00", "1024x1024x3"])
def test_malformed_size_rejected(size):
    rejected("size", "WIDTHxHEIGHT", size=size, model="imagen-3")


# --- literals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("quality", "ultra"), ("style", "bold"), ("response_format", "png"), ("output_format", "gif"),
     ("background", "white"), ("moderation", "high")],
)
def test_unknown_literal_values_rejected(field, value):
    rejected(field, "Input should be", **{field: value})


# --- extra="forbid" -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["foo", "negative_promt", "image_size", "num_images", "api_key"])
def test_unknown_field_rejected_and_named(field):
    error = rejected(field, "Extra inputs are not permitted", **{field: "x"})
    assert error.fields == [field]


def test_every_unknown_field_is_named():
    with pytest.raises(RequestValidationError) as caught:
        ImageRequest.build(prompt="x", width=512, height=512)
    assert sorted(caught.value.fields) == ["height", "width"]


def test_plain_constructor_also_forbids_extra_fields():
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        ImageRequest(prompt="x", steps=30)


# --- input_references ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "refs",
    [
        ["https://example.com/a.png"],
        ["http://example.com/a.png", "data:image/png;base64,iVBORw0KGgo="],
        [{"url": "https://example.com/a.png"}, {"image_url": "data:image/webp;base64,UklGR"}],
    ],
)
def test_input_references_accepted(refs):
    assert accepted(input_references=refs).input_references == refs


@pytest.mark.parametrize(
    "refs",
    [["ftp://example.com/a.png"], ["/tmp/a.png"], ["data:text/plain;base64,aGk="], [{"path": "/tmp/a.png"}],
     [{"url": 42}]],
)
def test_input_references_rejected(refs):
    rejected("input_references", "http(s) URL", input_references=refs)


# --- build(): one error type, all violations, context --------------------------------------------------------


def test_build_reports_every_violation_at_once():
    with pytest.raises(RequestValidationError) as caught:
        ImageRequest.build(prompt="x", n=0, seed=-5, quality="ultra")
    assert sorted(caught.value.fields) == ["n", "quality", "seed"]


def test_build_raises_request_validation_error_not_pydantic():
    with pytest.raises(RequestValidationError) as caught:
        ImageRequest.build(prompt="", n=0)
    assert not isinstance(caught.value, pydantic.ValidationError)
    assert isinstance(caught.value, ValueError)
    assert all(isinstance(v, Violation) for v in caught.value.violations)
    assert caught.value.fatal is False and caught.value.retryable is False


def test_build_context_prefixes_the_message():
    with pytest.raises(RequestValidationError) as caught:
        ImageRequest.build(prompt="x", n=11, context="row 17")
    assert caught.value.context == "row 17"
    assert str(caught.value).startswith("row 17: invalid image request: n: ")


def test_request_is_frozen():
    request = ImageRequest.build(prompt="x")
    with pytest.raises(pydantic.ValidationError):
        request.n = 2  # type: ignore[misc]


# --- the BYOK key --------------------------------------------------------------------------------------------

BYOK = "sk-byok-do-not-leak-0123456789"


def test_byok_key_never_in_public_params_repr_or_str():
    request = ImageRequest.build(prompt="x", model="openai/gpt-image-1", byok_api_key=BYOK, user="u-1")
    assert "byok_api_key" not in request.public_params()
    assert BYOK not in str(request.public_params())
    assert BYOK not in repr(request)
    assert BYOK not in str(request)
    assert BYOK not in request.model_dump_json()
    assert BYOK not in str(request.model_dump())
    assert request.byok_api_key.get_secret_value() == BYOK


def test_wire_fields_reveal_the_byok_key_and_skip_unset_fields():
    request = ImageRequest.build(prompt="x", byok_api_key=BYOK, size="1024x1024")
    assert request.wire_fields() == {"prompt": "x", "n": 1, "size": "1024x1024", "byok_api_key": BYOK}


def test_public_params_drop_prompt_and_unset_fields():
    request = ImageRequest.build(prompt="secret-ish prompt", model="dall-e-3", quality="hd", seed=3)
    assert request.public_params() == {"model": "dall-e-3", "n": 1, "quality": "hd", "seed": 3}

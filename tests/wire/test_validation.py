"""Per-model-family rules (seed 003's OpenAI spec, seed 002's limits, seed 004's size conflicts).

Every rule: the bad input is rejected with the field and the rule named, and the boundary is accepted.
"""

from __future__ import annotations

import pytest

from imagegen_provider.wire import ImageRequest, ModelFamily, RequestValidationError, check_model_rules, model_family
from imagegen_provider.wire.validation import bare_model_name

GPT_IMAGE_MODELS = ["gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "openai/gpt-image-1"]
GPT_IMAGE_2_MODELS = ["gpt-image-2", "gpt-image-2-2026-04-21", "openai/gpt-image-2"]
ALL_GPT = GPT_IMAGE_MODELS + GPT_IMAGE_2_MODELS
DALL_E = ["dall-e-2", "dall-e-3", "openai/dall-e-2", "openai/dall-e-3"]
UNKNOWN = ["imagen-3", "black-forest-labs/flux", "stable-diffusion-xl", "google/imagen-4", None]


def rejected(field: str, rule: str, **params) -> RequestValidationError:
    params.setdefault("prompt", "a lighthouse in a storm")
    with pytest.raises(RequestValidationError) as caught:
        ImageRequest.build(**params)
    error = caught.value
    assert field in error.fields, f"{field!r} not named in {error.violations}"
    rules = [v.rule for v in error.violations if v.field == field]
    assert any(rule.lower() in r.lower() for r in rules), f"rule {rule!r} not in {rules}"
    assert field in str(error) and rule.lower() in str(error).lower()
    return error


def accepted(**params) -> ImageRequest:
    params.setdefault("prompt", "a lighthouse in a storm")
    request = ImageRequest.build(**params)
    assert check_model_rules(request) == []
    return request


# --- model families --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("dall-e-2", ModelFamily.DALL_E_2),
        ("dall-e-3", ModelFamily.DALL_E_3),
        ("openai/dall-e-3", ModelFamily.DALL_E_3),
        ("OpenAI/DALL-E-3", ModelFamily.DALL_E_3),
        ("azure/openai/dall-e-2", ModelFamily.DALL_E_2),
        ("gpt-image-1", ModelFamily.GPT_IMAGE),
        ("gpt-image-1-mini", ModelFamily.GPT_IMAGE),
        ("gpt-image-1.5", ModelFamily.GPT_IMAGE),
        ("openai/gpt-image-1", ModelFamily.GPT_IMAGE),
        ("chatgpt-image-latest", ModelFamily.GPT_IMAGE),
        ("gpt-image-2", ModelFamily.GPT_IMAGE_2),
        ("gpt-image-2-2026-04-21", ModelFamily.GPT_IMAGE_2),
        ("openai/gpt-image-2", ModelFamily.GPT_IMAGE_2),
        ("imagen-3", ModelFamily.OTHER),
        ("black-forest-labs/flux", ModelFamily.OTHER),
        ("stable-diffusion-xl", ModelFamily.OTHER),
        ("gpt-4o", ModelFamily.OTHER),
        (None, ModelFamily.OTHER),
    ],
)
def test_model_family(model, family):
    assert model_family(model) is family


def test_bare_model_name_strips_provider_prefix():
    assert bare_model_name("openai/dall-e-3") == "dall-e-3"
    assert bare_model_name(" OpenAI/GPT-Image-1 ") == "gpt-image-1"
    assert bare_model_name(None) == ""


# --- prompt length ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "limit"),
    [("dall-e-2", 1000), ("dall-e-3", 4000), ("openai/dall-e-3", 4000), ("gpt-image-1", 32000),
     ("gpt-image-1.5", 32000), ("gpt-image-1-mini", 32000), ("gpt-image-2", 32000)],
)
def test_prompt_length_limit(model, limit):
    assert len(accepted(model=model, prompt="p" * limit).prompt) == limit
    error = rejected("prompt", f"accepts at most {limit}", model=model, prompt="p" * (limit + 1))
    assert f"{limit + 1} characters" in str(error)
    assert error.fields == ["prompt"]


def test_dall_e_2_limit_is_stricter_than_dall_e_3():
    rejected("prompt", "at most 1000", model="dall-e-2", prompt="p" * 4000)
    accepted(model="dall-e-3", prompt="p" * 4000)


@pytest.mark.parametrize("model", UNKNOWN)
def test_unknown_models_have_no_prompt_limit(model):
    accepted(model=model, prompt="p" * 40000)


# --- n ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["dall-e-3", "openai/dall-e-3"])
@pytest.mark.parametrize("n", [2, 10])
def test_dall_e_3_only_n_1(model, n):
    error = rejected("n", "dall-e-3 supports only n=1", model=model, n=n)
    assert error.fields == ["n"]


@pytest.mark.parametrize("model", ["dall-e-3", "openai/dall-e-3"])
def test_dall_e_3_n_1_accepted(model):
    accepted(model=model, n=1)


@pytest.mark.parametrize("model", ["dall-e-2", *ALL_GPT, *UNKNOWN])
def test_other_models_accept_n_up_to_10(model):
    accepted(model=model, n=10)


# --- sizes -----------------------------------------------------------------------------------------

SIZE_CASES = [
    # (model, accepted sizes, rejected sizes)
    ("dall-e-2", ["256x256", "512x512", "1024x1024"], ["1792x1024", "1536x1024", "128x128", "2048x2048", "auto", "2K"]),
    ("dall-e-3", ["1024x1024", "1792x1024", "1024x1792"], ["256x256", "512x512", "1536x1024", "1024x1536", "auto"]),
    ("gpt-image-1", ["1024x1024", "1536x1024", "1024x1536", "auto"], ["1792x1024", "256x256", "2048x2048", "2K"]),
    ("gpt-image-1.5", ["1024x1024", "1536x1024", "1024x1536", "auto"], ["1024x1792", "512x512"]),
    ("gpt-image-1-mini", ["1024x1536", "auto"], ["1536x864"]),
]


ALLOWED_SIZE_CASES = [(prefix + m, s) for prefix in ("", "openai/") for m, ok, _ in SIZE_CASES for s in ok]
OTHER_SIZE_CASES = [(prefix + m, s) for prefix in ("", "openai/") for m, _, bad in SIZE_CASES for s in bad]


@pytest.mark.parametrize(("model", "size"), ALLOWED_SIZE_CASES)
def test_allowed_sizes_accepted(model, size):
    assert accepted(model=model, size=size).size == size


@pytest.mark.parametrize(("model", "size"), OTHER_SIZE_CASES)
def test_other_sizes_rejected(model, size):
    error = rejected("size", "is not supported by", model=model, size=size)
    assert error.fields == ["size"]
    assert repr(size) in str(error)


def test_size_rule_lists_the_allowed_sizes():
    error = rejected("size", "use one of 1024x1024, 1792x1024, 1024x1792", model="dall-e-3", size="512x512")
    assert "dall-e-3" in error.violations[0].rule


GPT_IMAGE_2_ACCEPTED = [
    "3840x2160",  # the maximum
    "2160x3840",  # the maximum, portrait
    "1008x3024",  # exactly 1:3
    "3024x1008",  # exactly 3:1
    "1536x864",  # the seed's example
    "1024x1024", "1536x1024", "1024x1536", "2560x1440", "16x16", "auto",
]
GPT_IMAGE_2_REJECTED = [
    ("3856x2160", "maximum size for gpt-image-2 is 3840x2160"),  # edge beyond 3840
    ("3840x2176", "maximum size for gpt-image-2 is 3840x2160"),  # more pixels than 3840x2160
    ("4096x4096", "maximum size"),
    ("1000x1000", "divisible by 16"),
    ("1024x1000", "divisible by 16"),
    ("1030x1024", "divisible by 16"),
    ("4096x1024", "between 1:3 and 3:1"),
    ("1008x3040", "between 1:3 and 3:1"),  # a hair past 1:3
    ("3040x1008", "between 1:3 and 3:1"),
    ("2K", "must be 'auto' or WIDTHxHEIGHT"),
]


@pytest.mark.parametrize("model", GPT_IMAGE_2_MODELS)
@pytest.mark.parametrize("size", GPT_IMAGE_2_ACCEPTED)
def test_gpt_image_2_sizes_accepted(model, size):
    accepted(model=model, size=size)


@pytest.mark.parametrize("model", GPT_IMAGE_2_MODELS)
@pytest.mark.parametrize(("size", "rule"), GPT_IMAGE_2_REJECTED)
def test_gpt_image_2_sizes_rejected(model, size, rule):
    error = rejected("size", rule, model=model, size=size)
    assert error.fields == ["size"]


@pytest.mark.parametrize("model", UNKNOWN)
@pytest.mark.parametrize("size", ["2048x2048", "1000x1000", "4096x1024", "2K", "auto"])
def test_unknown_models_get_only_generic_size_checks(model, size):
    accepted(model=model, size=size)


@pytest.mark.parametrize("model", ["imagen-3", "black-forest-labs/flux"])
def test_unknown_models_seed_example(model):
    request = accepted(model=model, size="2048x2048", n=4)
    assert (request.size, request.n) == ("2048x2048", 4)


# --- quality ---------------------------------------------------------------------------------------

QUALITY = {
    "dall-e-2": (["standard", "auto"], ["hd", "low", "medium", "high"]),
    "dall-e-3": (["standard", "hd", "auto"], ["low", "medium", "high"]),
    "gpt-image-1": (["low", "medium", "high", "auto"], ["standard", "hd"]),
    "gpt-image-2": (["low", "medium", "high", "auto"], ["standard", "hd"]),
}


@pytest.mark.parametrize(("model", "quality"), [(m, q) for m, (ok, _) in QUALITY.items() for q in ok])
def test_quality_accepted_per_family(model, quality):
    accepted(model=model, quality=quality)


@pytest.mark.parametrize(("model", "quality"), [(m, q) for m, (_, bad) in QUALITY.items() for q in bad])
def test_quality_rejected_per_family(model, quality):
    error = rejected("quality", "is not supported by", model=model, quality=quality)
    assert error.fields == ["quality"]


@pytest.mark.parametrize("quality", ["standard", "hd", "low", "medium", "high", "auto"])
@pytest.mark.parametrize("model", UNKNOWN)
def test_unknown_models_accept_any_documented_quality(model, quality):
    accepted(model=model, quality=quality)


# --- style -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["vivid", "natural"])
@pytest.mark.parametrize("model", ["dall-e-3", "openai/dall-e-3", "imagen-3", None])
def test_style_accepted_for_dall_e_3_and_unknown_models(model, style):
    accepted(model=model, style=style)


@pytest.mark.parametrize("model", ["dall-e-2", *ALL_GPT])
def test_style_rejected_for_other_openai_models(model):
    error = rejected("style", "only dall-e-3 accepts style", model=model, style="vivid")
    assert error.fields == ["style"]


# --- response_format -----------------------------------------------------------------------------------


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
@pytest.mark.parametrize("model", ALL_GPT)
def test_response_format_rejected_for_gpt_image_models(model, response_format):
    error = rejected(
        "response_format", "does not take response_format", model=model, response_format=response_format
    )
    assert error.fields == ["response_format"]


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
@pytest.mark.parametrize("model", [*DALL_E, *UNKNOWN])
def test_response_format_accepted_for_dall_e_and_unknown_models(model, response_format):
    accepted(model=model, response_format=response_format)


# --- GPT-only parameters ---------------------------------------------------------------------------------

GPT_ONLY = [
    ("background", "opaque"),
    ("output_format", "png"),
    ("moderation", "low"),
    ("stream", True),
    ("stream", False),
]


@pytest.mark.parametrize("model", DALL_E)
@pytest.mark.parametrize(("field", "value"), GPT_ONLY)
def test_gpt_only_params_rejected_for_dall_e(model, field, value):
    error = rejected(field, "only the GPT image models accept", model=model, **{field: value})
    assert error.fields == [field]


@pytest.mark.parametrize("model", DALL_E)
def test_gpt_only_compression_and_partials_rejected_for_dall_e(model):
    rejected("output_compression", "only the GPT image models accept", model=model, output_format="jpeg",
             output_compression=50)
    rejected("partial_images", "only the GPT image models accept", model=model, stream=True, partial_images=2)


@pytest.mark.parametrize("model", [*ALL_GPT, *UNKNOWN])
def test_gpt_params_accepted_for_gpt_and_unknown_models(model):
    accepted(model=model, background="opaque", output_format="jpeg", output_compression=60, moderation="low",
             stream=True, partial_images=2)


# --- output_compression ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
@pytest.mark.parametrize("compression", [0, 100, 55])
@pytest.mark.parametrize("model", ["gpt-image-1", "gpt-image-2", "black-forest-labs/flux"])
def test_output_compression_accepted_with_jpeg_or_webp(model, compression, fmt):
    assert accepted(model=model, output_format=fmt, output_compression=compression).output_compression == compression


@pytest.mark.parametrize("fmt", ["png", None])
@pytest.mark.parametrize("compression", [0, 100])
@pytest.mark.parametrize("model", ["gpt-image-1", "black-forest-labs/flux"])
def test_output_compression_rejected_without_jpeg_or_webp(model, compression, fmt):
    params = {"output_format": fmt} if fmt else {}
    error = rejected("output_compression", "only allowed with output_format 'jpeg' or 'webp'", model=model,
                     output_compression=compression, **params)
    assert error.fields == ["output_compression"]


def test_output_compression_101_rejected_even_with_jpeg():
    error = rejected("output_compression", "less than or equal to 100", model="gpt-image-1", output_format="jpeg",
                     output_compression=101)
    assert error.fields == ["output_compression"]


# --- transparent background ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "webp", None])
@pytest.mark.parametrize("model", ["gpt-image-1", "gpt-image-2", "imagen-3"])
def test_transparent_background_accepted_with_alpha_formats(model, fmt):
    accepted(model=model, background="transparent", **({"output_format": fmt} if fmt else {}))


@pytest.mark.parametrize("model", ["gpt-image-1", "gpt-image-2", "imagen-3"])
def test_transparent_background_rejected_with_jpeg(model):
    error = rejected("background", "'transparent' needs output_format 'png' or 'webp'", model=model,
                     background="transparent", output_format="jpeg")
    assert error.fields == ["background"]


@pytest.mark.parametrize("background", ["opaque", "auto"])
def test_non_transparent_background_accepted_with_jpeg(background):
    accepted(model="gpt-image-1", background=background, output_format="jpeg")


# --- partial_images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("partials", [1, 3])
@pytest.mark.parametrize("model", ["gpt-image-1", "gpt-image-2"])
def test_partial_images_accepted_with_stream(model, partials):
    accepted(model=model, stream=True, partial_images=partials)


@pytest.mark.parametrize("stream", [None, False])
@pytest.mark.parametrize("partials", [1, 3])
def test_partial_images_rejected_without_stream(partials, stream):
    params = {"stream": stream} if stream is not None else {}
    error = rejected("partial_images", "only allowed with stream=true", model="gpt-image-1", partial_images=partials,
                     **params)
    assert error.fields == ["partial_images"]


def test_partial_images_zero_is_the_default_and_needs_no_stream():
    accepted(model="gpt-image-1", partial_images=0)


def test_partial_images_4_rejected_even_with_stream():
    rejected("partial_images", "less than or equal to 3", model="gpt-image-1", stream=True, partial_images=4)


# --- size vs resolution / aspect_ratio (router, seed 004) ----------------------------------------------------

CONFLICTS = [
    ({"size": "1024x1024", "aspect_ratio": "16:9"}, "conflicts with aspect_ratio='16:9'"),
    ({"size": "1536x1024", "aspect_ratio": "1:1"}, "conflicts with aspect_ratio"),
    ({"size": "2K", "resolution": "4K"}, "conflicts with resolution='4K'"),
    ({"size": "2048x2048", "resolution": "2K"}, "conflicts with resolution"),
    ({"size": "4K", "resolution": "high"}, "conflicts with resolution"),
]
CONSISTENT = [
    {"size": "1024x1024", "aspect_ratio": "1:1"},
    {"size": "1536x1024", "aspect_ratio": "3:2"},
    {"size": "1792x1024", "aspect_ratio": "7:4"},
    {"size": "2K", "aspect_ratio": "16:9"},
    {"size": "2K", "resolution": "2K"},
    {"size": "4k", "resolution": "4K", "aspect_ratio": "9:16"},
    {"size": "auto", "resolution": "4K", "aspect_ratio": "16:9"},
    {"resolution": "4K", "aspect_ratio": "21:9"},
]


@pytest.mark.parametrize("model", ["black-forest-labs/flux", "google/imagen-4", None])
@pytest.mark.parametrize(("params", "rule"), CONFLICTS)
def test_size_conflicting_with_resolution_or_aspect_ratio_rejected(model, params, rule):
    error = rejected("size", rule, model=model, **params)
    assert error.fields == ["size"]
    assert "pass one or the other" in str(error)


@pytest.mark.parametrize("model", ["black-forest-labs/flux", "google/imagen-4", None])
@pytest.mark.parametrize("params", CONSISTENT)
def test_consistent_size_resolution_aspect_ratio_accepted(model, params):
    accepted(model=model, **params)


def test_size_conflicting_with_both_reports_both():
    error = rejected("size", "conflicts with resolution", size="1024x1024", resolution="2K", aspect_ratio="16:9")
    assert error.fields == ["size", "size"]
    assert "conflicts with aspect_ratio" in str(error)


# --- provider-prefixed model ids get the bare model's rules --------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field", "rule"),
    [
        ({"model": "openai/dall-e-3", "n": 2}, "n", "only n=1"),
        ({"model": "openai/dall-e-3", "size": "512x512"}, "size", "not supported by dall-e-3"),
        ({"model": "openai/dall-e-3", "prompt": "p" * 4001}, "prompt", "dall-e-3 accepts at most 4000"),
        ({"model": "openai/dall-e-2", "style": "vivid"}, "style", "only dall-e-3"),
        ({"model": "openai/gpt-image-1", "response_format": "url"}, "response_format", "does not take response_format"),
        ({"model": "azure/openai/gpt-image-2", "size": "1000x1000"}, "size", "divisible by 16"),
    ],
)
def test_provider_prefixed_models_get_the_bare_rules(params, field, rule):
    rejected(field, rule, **params)


def test_seed_000_example_gets_dall_e_3_rules():
    accepted(model="openai/dall-e-3", prompt="A serene mountain landscape at sunset, photorealistic",
             size="1024x1024", n=1)
    rejected("size", "not supported by dall-e-3", model="openai/dall-e-3", prompt="x", size="1536x1024")


# --- several rules at once -------------------------------------------------------------------------------


def test_every_broken_rule_is_reported():
    with pytest.raises(RequestValidationError) as caught:
        ImageRequest.build(model="dall-e-3", prompt="p" * 4001, n=2, size="512x512", quality="high",
                           background="transparent", output_format="jpeg")
    assert set(caught.value.fields) == {"prompt", "n", "size", "quality", "background", "output_format"}


def test_check_model_rules_returns_violations_without_raising():
    request = ImageRequest(prompt="x", model="dall-e-3", n=3)  # the plain constructor skips the model rules
    violations = check_model_rules(request)
    assert [(v.field, v.rule) for v in violations] == [("n", "dall-e-3 supports only n=1")]

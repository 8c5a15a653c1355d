"""The response normaliser, driven by one fixture per seed document, plus every malformed shape and streams."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest

from imagegen_provider.wire import (
    GatewayError,
    GenerationResult,
    MalformedResponseError,
    Usage,
    inspect_image,
    normalize_response,
    normalize_stream,
    normalize_usage,
)

from ._support import SEED_FIXTURES, b64, case_ids, fixture_cases, image_bytes, load_fixture

SEED_RESPONSES = fixture_cases("responses")
SEED_ERRORS = fixture_cases("error_responses")


def check_result(result: GenerationResult, expected: dict[str, Any]) -> None:
    assert isinstance(result, GenerationResult)
    assert vars(result.usage) == expected["usage"]
    for key in ("reported_cost_usd", "request_id", "provider", "model", "created", "output_format", "size",
                "quality", "background"):
        assert getattr(result, key) == expected[key], key
    assert len(result.images) == len(expected["images"])
    for image, want in zip(result.images, expected["images"], strict=False):
        assert image.url == want["url"]
        assert image.revised_prompt == want["revised_prompt"]
        if want["inline"] is None:
            assert image.data is None
        else:
            info = inspect_image(image.data)
            assert (info.format, info.width, info.height) == (want["inline"]["format"], want["inline"]["width"],
                                                               want["inline"]["height"])
    assert result.partial_images == []


def with_unknown_fields(value: Any) -> Any:
    """A deep copy of ``value`` with unknown keys added to every object, at every level."""
    if isinstance(value, dict):
        out = {key: with_unknown_fields(item) for key, item in value.items()}
        out["x_unknown_field"] = {"nested": [1, "two", None]}
        out["zz_future_flag"] = True
        return out
    if isinstance(value, list):
        return [with_unknown_fields(item) for item in value]
    return copy.deepcopy(value)


# --- the seeds' documented responses ------------------------------------------------------------------------


def test_there_is_one_fixture_per_seed_with_responses():
    for name in SEED_FIXTURES:
        fixture = load_fixture(name)
        assert fixture["seed"].startswith(name[:3])
        assert fixture["responses"], name


@pytest.mark.parametrize(("fixture", "case"), SEED_RESPONSES, ids=case_ids(SEED_RESPONSES))
def test_seed_response_from_bytes(fixture, case):
    raw = json.dumps(case["body"]).encode()
    check_result(normalize_response(raw, headers=case["headers"]), case["expected"])


@pytest.mark.parametrize(("fixture", "case"), SEED_RESPONSES, ids=case_ids(SEED_RESPONSES))
def test_seed_response_from_str_and_mapping(fixture, case):
    check_result(normalize_response(json.dumps(case["body"]), headers=case["headers"]), case["expected"])
    check_result(normalize_response(case["body"], headers=case["headers"]), case["expected"])


@pytest.mark.parametrize(("fixture", "case"), SEED_RESPONSES, ids=case_ids(SEED_RESPONSES))
def test_unknown_fields_at_every_level_are_ignored(fixture, case):
    noisy = with_unknown_fields(case["body"])
    assert noisy != case["body"]
    check_result(normalize_response(json.dumps(noisy).encode(), headers=case["headers"]), case["expected"])


@pytest.mark.parametrize(("fixture", "case"), SEED_ERRORS, ids=case_ids(SEED_ERRORS))
def test_seed_error_envelopes(fixture, case):
    with pytest.raises(GatewayError) as caught:
        normalize_response(json.dumps(case["body"]).encode())
    error = caught.value
    assert type(error).__name__ == case["error"]
    assert error.status == case["status"]
    assert error.request_id == case["request_id"]
    assert case["message"] in str(error)


def test_indoxhub_envelope_details():
    body = load_fixture("000_indoxhub.json")["responses"][0]["body"]
    result = normalize_response(json.dumps(body))
    assert result.reported_cost_usd == pytest.approx(0.04)
    assert result.request_id == "550e8400-e29b-41d4-a716-446655440000"
    assert (result.provider, result.model) == ("openai", "dall-e-3")
    assert result.images[0].url == "https://cdn.example.com/images/generated-image.png"
    assert result.images[0].data is None


def test_openai_usage_details_and_top_level_echo():
    result = normalize_response(load_fixture("003_openai.json")["responses"][0]["body"])
    assert result.usage == Usage(input_tokens=50, output_tokens=4160, total_tokens=4210, input_text_tokens=40,
                                 input_image_tokens=10, output_text_tokens=10, output_image_tokens=4150)
    assert (result.size, result.quality, result.output_format, result.background) == (
        "1024x1536", "medium", "png", "opaque")
    assert result.reported_cost_usd is None


def test_gateway_without_usage_gives_empty_usage():
    result = normalize_response(load_fixture("002_ai_gateway.json")["responses"][0]["body"])
    assert result.usage.is_empty
    assert result.reported_cost_usd is None


# --- usage shapes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "canonical", "cost"),
    [
        # OpenAI (seed 003)
        ({"input_tokens": 5, "output_tokens": 7, "total_tokens": 12,
          "input_tokens_details": {"text_tokens": 4, "image_tokens": 1},
          "output_tokens_details": {"image_tokens": 6, "text_tokens": 1}},
         Usage(5, 7, 12, 4, 1, 1, 6), None),
        # chat-style (seed 001)
        ({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}, Usage(5, 7, 12), None),
        # IndoxHub (seed 000)
        ({"tokens_prompt": 5, "tokens_completion": 7, "tokens_total": 12, "cost": 0.04, "latency": 5200.0},
         Usage(5, 7, 12), 0.04),
        # router (seed 004): OpenAI shape plus cost
        ({"input_tokens": 5, "output_tokens": 7, "total_tokens": 12, "cost": 0.167}, Usage(5, 7, 12), 0.167),
        # total derived when missing
        ({"input_tokens": 5, "output_tokens": 7}, Usage(5, 7, 12), None),
        ({"prompt_tokens": 5, "completion_tokens": 0}, Usage(5, 0, 5), None),
        # numbers as strings / integral floats, costs as strings, cost_usd
        ({"input_tokens": "5", "output_tokens": 7.0, "cost": "0.5"}, Usage(5, 7, 12), 0.5),
        ({"tokens_prompt": 1, "cost_usd": 0.25}, Usage(input_tokens=1), 0.25),
        # junk is ignored, not fatal
        ({"input_tokens": True, "output_tokens": "lots", "cost": "free", "input_tokens_details": [1, 2]},
         Usage(), None),
        ({}, Usage(), None),
        (None, Usage(), None),
        ([1, 2, 3], Usage(), None),
        ("usage", Usage(), None),
    ],
)
def test_normalize_usage(usage, canonical, cost):
    got, got_cost = normalize_usage(usage)
    assert got == canonical
    assert got_cost == (pytest.approx(cost) if cost is not None else None)


def test_openai_shape_wins_over_aliases():
    usage, _ = normalize_usage({"input_tokens": 1, "prompt_tokens": 2, "tokens_prompt": 3, "output_tokens": 4,
                                "completion_tokens": 5, "total_tokens": 6, "tokens_total": 7})
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (1, 4, 6)


# --- request ids ---------------------------------------------------------------------------------------------


def url_body(**extra) -> dict[str, Any]:
    return {"created": 1, "data": [{"url": "https://cdn.example.com/a.png"}], **extra}


def test_request_id_from_body():
    assert normalize_response(url_body(request_id="body-id"), headers={"x-request-id": "hdr"}).request_id == "body-id"


@pytest.mark.parametrize("header", ["x-request-id", "X-Request-ID", "X-REQUEST-ID", "request-id"])
def test_request_id_from_header(header):
    assert normalize_response(url_body(), headers={header: "req_abc123"}).request_id == "req_abc123"


def test_no_request_id_anywhere():
    assert normalize_response(url_body()).request_id is None


def test_provider_from_header_when_body_has_none():
    assert normalize_response(url_body(), headers={"X-Provider": "fal"}).provider == "fal"


# --- images --------------------------------------------------------------------------------------------------


def test_b64_image_bytes_are_exact(png, jpeg, webp):
    result = normalize_response({"data": [{"b64_json": b64(png)}, {"b64_json": b64(jpeg)}, {"b64_json": b64(webp)}]})
    assert [image.data for image in result.images] == [png, jpeg, webp]
    assert [inspect_image(image.data).format for image in result.images] == ["png", "jpeg", "webp"]


def test_data_url_prefix_is_tolerated(png):
    result = normalize_response({"data": [{"b64_json": "data:image/png;base64," + b64(png)}]})
    assert result.images[0].data == png


def test_b64_preferred_but_url_kept(png):
    result = normalize_response({"data": [{"b64_json": b64(png), "url": "https://cdn.example.com/a.png"}]})
    assert result.images[0].data == png
    assert result.images[0].url == "https://cdn.example.com/a.png"


def test_mixed_images_keep_their_order(png):
    result = normalize_response({"data": [{"url": "https://cdn.example.com/1.png"}, {"b64_json": b64(png)}]})
    assert result.images[0].url == "https://cdn.example.com/1.png" and result.images[0].data is None
    assert result.images[1].data == png


# --- success:false on a 200 ------------------------------------------------------------------------------------


def test_success_false_is_a_gateway_error_with_the_message():
    body = {"request_id": "r-1", "success": False, "message": "Model openai/dall-e-4 is not available", "data": []}
    with pytest.raises(GatewayError) as caught:
        normalize_response(json.dumps(body).encode())
    error = caught.value
    assert not isinstance(error, MalformedResponseError)
    assert error.status == 200
    assert error.request_id == "r-1"
    assert "Model openai/dall-e-4 is not available" in str(error)


def test_success_false_without_message():
    with pytest.raises(GatewayError, match="success=false"):
        normalize_response({"success": False, "data": [{"url": "https://cdn.example.com/a.png"}]})


def test_success_false_message_never_leaks_keys():
    key = "byok-key-0123456789abcdef"
    body = {"success": False, "message": f"Invalid BYOK key {key} (also sk-proj-abcdef123456)"}
    with pytest.raises(GatewayError) as caught:
        normalize_response(json.dumps(body), secrets=[key])
    assert key not in str(caught.value)
    assert "sk-proj-abcdef123456" not in str(caught.value)
    assert "Invalid BYOK key" in str(caught.value)


def test_success_true_with_empty_message_is_fine():
    assert normalize_response(url_body(success=True, message="")).images


# --- malformed 200s --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html><body>502 Bad Gateway</body></html>", "body is not JSON"),
        (b"", "body is not JSON"),
        (b"{\"data\": [", "body is not JSON"),
        (b"\xff\xfe\x00garbage", "body is not JSON"),
        (b"[{\"url\": \"https://cdn.example.com/a.png\"}]", "body is not a JSON object"),
        (b"\"just a string\"", "body is not a JSON object"),
        (b"null", "body is not a JSON object"),
        (b"{\"created\": 1}", "no data in response"),
        (b"{\"created\": 1, \"data\": []}", "no data in response"),
        (b"{\"created\": 1, \"data\": null}", "no data in response"),
        (b"{\"created\": 1, \"data\": {\"url\": \"https://cdn.example.com/a.png\"}}", "no data in response"),
        (b"{\"data\": [{\"revised_prompt\": \"x\"}]}", "data[0] has neither b64_json nor url"),
        (b"{\"data\": [{\"url\": null, \"b64_json\": null}]}", "data[0] has neither b64_json nor url"),
        (b"{\"data\": [{\"url\": \"\", \"b64_json\": \"\"}]}", "data[0] has neither b64_json nor url"),
        (b"{\"data\": [{\"url\": \"https://a/b.png\"}, \"oops\"]}", "data[1] is not an object"),
        (b"{\"data\": [{\"b64_json\": \"not base64 at all!\"}]}", "bad base64"),
        (b"{\"data\": [{\"b64_json\": \"iVBORw0KGgo\"}]}", "bad base64"),  # missing padding
        (b"{\"data\": [{\"b64_json\": \"<string>\"}]}", "bad base64"),  # seed 003's placeholder
        (b"{\"data\": [{\"b64_json\": \"data:image/png;base64,\"}]}", "empty b64_json"),
    ],
)
def test_malformed_responses(body, reason):
    with pytest.raises(MalformedResponseError) as caught:
        normalize_response(body, headers={"x-request-id": "req-9"})
    error = caught.value
    assert reason in error.reason
    assert f"malformed response: {reason}" in str(error)
    assert error.retryable is True


def test_not_json_keeps_request_id_and_a_short_excerpt():
    body = b"<html><head><title>502 Bad Gateway</title></head><body>" + b"x" * 50_000 + b"</body></html>"
    with pytest.raises(MalformedResponseError) as caught:
        normalize_response(body, headers={"X-Request-Id": "req-html"})
    error = caught.value
    assert error.request_id == "req-html"
    assert "502 Bad Gateway" in error.body_excerpt
    assert len(error.body_excerpt) <= 301
    assert len(str(error)) < 500


def test_bad_base64_names_the_request():
    with pytest.raises(MalformedResponseError) as caught:
        normalize_response({"request_id": "req-b64", "data": [{"b64_json": "@@@@"}]})
    assert caught.value.request_id == "req-b64"
    assert "request_id=req-b64" in str(caught.value)


def test_malformed_excerpt_is_redacted():
    with pytest.raises(MalformedResponseError) as caught:
        normalize_response(b"oops, upstream said: Incorrect API key provided: sk-proj-abcdef123456",
                           secrets=["sk-proj-abcdef123456"])
    assert "sk-proj-abcdef123456" not in str(caught.value)


# --- streams -----------------------------------------------------------------------------------------------------

PARTIAL = "image_generation.partial_image"
COMPLETED = "image_generation.completed"
STREAM_USAGE = {"input_tokens": 50, "output_tokens": 1056, "total_tokens": 1106,
                "input_tokens_details": {"text_tokens": 50, "image_tokens": 0},
                "output_tokens_details": {"image_tokens": 1056, "text_tokens": 0}}


def partial_event(data: bytes, index: int) -> tuple[str, str]:
    return PARTIAL, json.dumps({"type": PARTIAL, "b64_json": b64(data), "partial_image_index": index,
                                "created_at": 1713833620, "size": "1024x1024", "quality": "low",
                                "background": "opaque", "output_format": "png"})


def completed_event(data: bytes, **extra) -> tuple[str, str]:
    return COMPLETED, json.dumps({"type": COMPLETED, "b64_json": b64(data), "created_at": 1713833628,
                                  "size": "1024x1024", "quality": "low", "background": "opaque",
                                  "output_format": "png", "usage": STREAM_USAGE, **extra})


@pytest.fixture
def partial_pngs():
    from ._support import image_bytes

    return [image_bytes("PNG", (2, 2), (i * 60, 0, 0)) for i in range(3)]


@pytest.fixture
def final_png():
    from ._support import image_bytes

    return image_bytes("PNG", (4, 4), (0, 0, 255))


def stream_events(partials: list[bytes], final: bytes) -> list[tuple[str, str]]:
    return [*(partial_event(p, i) for i, p in enumerate(partials)), completed_event(final), ("", "[DONE]")]


def test_stream_drops_partials_by_default(partial_pngs, final_png):
    result = normalize_stream(stream_events(partial_pngs, final_png), headers={"X-Request-ID": "req_stream"})
    assert [image.data for image in result.images] == [final_png]
    assert result.partial_images == []
    assert result.request_id == "req_stream"
    assert result.usage == Usage(50, 1056, 1106, 50, 0, 0, 1056)
    assert (result.created, result.size, result.quality, result.background, result.output_format) == (
        1713833628, "1024x1024", "low", "opaque", "png")
    assert inspect_image(result.images[0].data).width == 4


def test_stream_keeps_partials_when_asked(partial_pngs, final_png):
    result = normalize_stream(stream_events(partial_pngs, final_png), keep_partials=True)
    assert result.partial_images == partial_pngs
    assert [image.data for image in result.images] == [final_png]


def test_stream_done_sentinel_and_blank_events_are_ignored(final_png):
    events = [("", ""), ("message", "[DONE]"), completed_event(final_png), ("", " [DONE] \n")]
    assert normalize_stream(events).images[0].data == final_png


def test_stream_event_type_may_come_from_the_sse_event_name(final_png):
    data = json.dumps({"b64_json": b64(final_png), "revised_prompt": "an otter"})
    result = normalize_stream([(COMPLETED, data)])
    assert result.images[0].data == final_png
    assert result.images[0].revised_prompt == "an otter"


def test_stream_with_n_completed_events(partial_pngs, final_png):
    result = normalize_stream([completed_event(final_png), completed_event(partial_pngs[0])])
    assert [image.data for image in result.images] == [final_png, partial_pngs[0]]


@pytest.mark.parametrize(
    "event",
    [
        ("error", json.dumps({"error": {"message": "Your request was rejected by the safety system",
                                        "code": "moderation_blocked"}})),
        ("", json.dumps({"type": "error", "error": {"message": "Your request was rejected by the safety system"}})),
        ("error", json.dumps({"message": "Your request was rejected by the safety system"})),
    ],
)
def test_stream_error_event_is_a_gateway_error(event, partial_pngs):
    with pytest.raises(GatewayError) as caught:
        normalize_stream([partial_event(partial_pngs[0], 0), event], headers={"x-request-id": "req_err"})
    assert "rejected by the safety system" in str(caught.value)
    assert caught.value.request_id == "req_err"
    assert not isinstance(caught.value, MalformedResponseError)


@pytest.mark.parametrize(
    "events",
    [
        [],
        [("", "[DONE]")],
        [partial_event(b"\x89PNG\r\n\x1a\n", 0), ("", "[DONE]")],
    ],
    ids=["empty", "done-only", "partial-only"],
)
def test_stream_without_completed_event(events):
    with pytest.raises(MalformedResponseError, match=r"without an image_generation\.completed event"):
        normalize_stream(events)


def test_stream_event_not_json():
    with pytest.raises(MalformedResponseError, match="is not JSON"):
        normalize_stream([(COMPLETED, "{not json")])


def test_stream_completed_without_image():
    with pytest.raises(MalformedResponseError, match="completed event without b64_json"):
        normalize_stream([(COMPLETED, json.dumps({"type": COMPLETED, "usage": STREAM_USAGE}))])


def test_stream_completed_with_bad_base64():
    with pytest.raises(MalformedResponseError, match="bad base64"):
        normalize_stream([(COMPLETED, json.dumps({"type": COMPLETED, "b64_json": "%%%"}))])


def test_stream_unknown_events_and_fields_are_ignored(final_png):
    events = [("response.created", json.dumps({"type": "response.created", "id": "x"})),
              ("keepalive", json.dumps(["not", "an", "object"])),
              completed_event(final_png, x_unknown={"a": 1})]
    assert normalize_stream(events).images[0].data == final_png


def test_b64_roundtrip_sanity(png):
    # guards the fixtures themselves: the PNG they embed is a real one
    embedded = load_fixture("003_openai.json")["responses"][0]["body"]["data"][0]["b64_json"]
    info = inspect_image(base64.b64decode(embedded))
    assert (info.format, info.width, info.height) == ("png", 2, 3)
    assert inspect_image(png).format == "png"


def test_stream_error_message_is_redacted_and_short():
    message = "upstream rejected key sk-proj-abcdef123456 " + "z" * 5000
    with pytest.raises(GatewayError) as caught:
        normalize_stream([("error", json.dumps({"error": {"message": message}}))])
    assert "sk-proj-abcdef123456" not in str(caught.value)
    assert "upstream rejected key ***" in str(caught.value)
    assert len(str(caught.value)) < 500


# --- untrusted numbers ------------------------------------------------------------------------------------


def _body(usage, n: int = 1) -> dict:
    return {"created": 1, "data": [{"b64_json": b64(image_bytes("PNG"))}] * n, "usage": usage}


@pytest.mark.parametrize(
    "cost",
    [float("nan"), "NaN", "nan", float("inf"), "inf", "-Infinity", -0.01, "-3", 1000.01, "1e9", "lots", [1],
     {"usd": 1}],
)
def test_unbelievable_reported_cost_is_unknown_with_a_warning(caplog, cost):
    import logging

    caplog.set_level(logging.WARNING)
    result = normalize_response(json.dumps(_body({"cost": cost}), allow_nan=True))
    assert result.reported_cost_usd is None
    assert "usage.cost" in caplog.text


@pytest.mark.parametrize(("cost", "n", "expected"), [(0.04, 1, 0.04), ("0.08", 2, 0.08), (0, 1, 0.0),
                                                     (1500.0, 2, 1500.0), (999.0, 1, 999.0)])
def test_believable_reported_cost_is_kept(cost, n, expected):
    assert normalize_response(_body({"cost": cost}, n)).reported_cost_usd == pytest.approx(expected)


@pytest.mark.parametrize(
    ("usage", "field"),
    [
        ({"input_tokens": -5, "output_tokens": 10}, "usage.input_tokens"),
        ({"input_tokens": 5, "output_tokens": 10**12}, "usage.output_tokens"),
        ({"prompt_tokens": -1, "completion_tokens": 3}, "usage.prompt_tokens"),
        ({"tokens_prompt": 1, "tokens_completion": 2, "tokens_total": -3}, "usage.tokens_total"),
        ({"input_tokens": 1, "output_tokens": 2, "output_tokens_details": {"image_tokens": -9}},
         "usage.output_tokens_details.image_tokens"),
    ],
)
def test_unbelievable_token_counts_are_unknown_and_never_summed(caplog, usage, field):
    import logging

    caplog.set_level(logging.WARNING)
    result = normalize_response(_body(usage))
    values = vars(result.usage)
    assert all(v is None or 0 <= v <= 10_000_000 for v in values.values()), values
    assert field in caplog.text
    # A bad part makes the sum unknown too, never a sum of what is left.
    if field in ("usage.input_tokens", "usage.output_tokens", "usage.prompt_tokens"):
        assert result.usage.total_tokens is None


def test_litellm_headers_give_cost_and_request_id():
    body = {"created": 1, "data": [{"b64_json": b64(image_bytes("PNG"))}]}
    result = normalize_response(body, headers={"x-litellm-response-cost": "0.042", "x-litellm-call-id": "call-7"})
    assert (result.reported_cost_usd, result.request_id) == (pytest.approx(0.042), "call-7")
    both = normalize_response(body, headers={"x-litellm-call-id": "call-7", "x-request-id": "req-1"})
    assert both.request_id == "req-1"
    # The body's cost wins over the header; an absurd header is as unknown as an absurd body.
    header = {"x-litellm-response-cost": "0.5"}
    assert normalize_response(_body({"cost": 0.01}), headers=header).reported_cost_usd == 0.01
    assert normalize_response(body, headers={"x-litellm-response-cost": "nan"}).reported_cost_usd is None
    assert normalize_response(body, headers={"x-litellm-response-cost": "-1"}).reported_cost_usd is None


def test_stream_cost_and_litellm_id():
    event = json.dumps({"type": "image_generation.completed", "b64_json": b64(image_bytes("PNG")),
                        "usage": {"input_tokens": -1, "output_tokens": 3, "cost": "inf"}})
    result = normalize_stream([("image_generation.completed", event)], headers={"x-litellm-call-id": "c1"})
    assert result.request_id == "c1" and result.reported_cost_usd is None
    assert result.usage.input_tokens is None and result.usage.total_tokens is None


def test_data_url_in_url_is_an_inline_image():
    png = image_bytes("PNG")
    body = {"created": 1, "data": [{"url": "data:image/png;base64," + b64(png)}]}
    [image] = normalize_response(body).images
    assert image.data == png and image.url is None


@pytest.mark.parametrize("url", ["data:text/plain;base64,aGVsbG8=", "data:image/png,rawbytes",
                                 "data:image/png;base64,!!!not-base64!!!"])
def test_bad_data_urls_are_malformed(url):
    with pytest.raises(MalformedResponseError):
        normalize_response({"created": 1, "data": [{"url": url}]})

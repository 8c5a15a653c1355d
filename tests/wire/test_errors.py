"""error_from_response: the typed error per status, its message, and that keys never reach it."""

from __future__ import annotations

import json

import pytest

from imagegen_provider.wire import (
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    ContentPolicyError,
    GatewayConnectionError,
    GatewayError,
    ImageDownloadError,
    ImageExpiredError,
    ImageGenError,
    InsufficientBalanceError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    RequestValidationError,
    ServerError,
    Violation,
    error_from_response,
    redact,
)
from imagegen_provider.wire.errors import CircuitOpenError, ClientConfigurationError, UnexpectedError, excerpt

NGINX_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>"
    b"\r\n<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>\r\n"
)


def openai_error(message: str, code: str | None = None, type_: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


# --- status → class -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls", "fatal", "retryable"),
    [
        (400, BadRequestError, False, False),
        (401, AuthenticationError, True, False),
        (402, InsufficientBalanceError, True, False),
        (403, PermissionDeniedError, True, False),
        (404, NotFoundError, False, False),
        (408, RequestTimeoutError, False, True),
        (429, RateLimitError, False, True),
        (500, ServerError, False, True),
        (502, BadGatewayError, False, True),
        (503, ServerError, False, True),
        (504, ServerError, False, True),
        (520, ServerError, False, True),
        (409, GatewayError, False, False),
        (422, GatewayError, False, False),
    ],
)
def test_status_maps_to_typed_error(status, cls, fatal, retryable):
    error = error_from_response(status, openai_error("something went wrong", code="x"), request_id="req_1")
    assert type(error) is cls
    assert isinstance(error, GatewayError) and isinstance(error, ImageGenError)
    assert error.fatal is fatal
    assert error.retryable is retryable
    assert error.status == status
    assert error.code == "x"
    assert error.error_type == cls.__name__
    assert str(error).startswith(f"HTTP {status} | something went wrong")
    assert "request_id=req_1" in str(error)


@pytest.mark.parametrize(
    "body",
    [
        openai_error("Your request was rejected as a result of our safety system.", code="content_policy_violation"),
        openai_error("Your request was rejected by the safety system.", code="moderation_blocked",
                     type_="image_generation_user_error"),
        json.dumps({"error": {"message": "blocked", "type": "moderation_blocked"}}).encode(),
    ],
)
def test_400_content_policy(body):
    error = error_from_response(400, body)
    assert type(error) is ContentPolicyError
    assert isinstance(error, BadRequestError)
    assert error.fatal is False and error.retryable is False


def test_plain_400_is_bad_request():
    error = error_from_response(400, openai_error("Invalid size '999x999'.", code="invalid_value"))
    assert type(error) is BadRequestError
    assert error.code == "invalid_value"
    assert "Invalid size '999x999'." in str(error)


def test_content_policy_code_on_other_statuses_keeps_the_status_class():
    assert type(error_from_response(403, openai_error("blocked", code="moderation_blocked"))) is PermissionDeniedError


def test_429_carries_retry_after():
    body = openai_error("Rate limit reached for images per minute", code="rate_limit_exceeded")
    error = error_from_response(429, body, retry_after=12.5)
    assert type(error) is RateLimitError
    assert error.retry_after == 12.5
    assert error.retryable is True


def test_429_without_retry_after():
    assert error_from_response(429, b"").retry_after is None


# --- bodies that are not an OpenAI error envelope ------------------------------------------------------------------


def test_502_nginx_html():
    error = error_from_response(502, NGINX_502, request_id="req_502")
    assert type(error) is BadGatewayError
    assert isinstance(error, ServerError) and error.retryable
    text = str(error)
    assert "non-JSON" in text and "HTML" in text
    assert "502 Bad Gateway" in error.body_excerpt
    assert "\n" not in text and "\r" not in text
    assert "request_id=req_502" in text


def test_non_json_plain_text_body():
    error = error_from_response(503, b"upstream connect error or disconnect/reset before headers")
    assert type(error) is ServerError
    assert "non-JSON error body" in str(error)
    assert "HTML" not in str(error).split(" | body: ")[0]
    assert "upstream connect error" in error.body_excerpt


def test_indoxhub_error_envelope():
    body = json.dumps({"request_id": "ih-77", "success": False, "message": "Insufficient credits: balance $0.00",
                       "data": None}).encode()
    error = error_from_response(402, body)
    assert type(error) is InsufficientBalanceError and error.fatal
    assert error.request_id == "ih-77"
    assert "Insufficient credits: balance $0.00" in str(error)
    assert "request_id=ih-77" in str(error)


def test_header_request_id_wins_over_body():
    body = json.dumps({"request_id": "from-body", "success": False, "message": "nope"}).encode()
    assert error_from_response(400, body, request_id="from-header").request_id == "from-header"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (json.dumps({"detail": "Not Found"}).encode(), "Not Found"),
        (json.dumps({"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]}).encode(), "field required"),
        (json.dumps({"error": "model not found"}).encode(), "model not found"),
        (json.dumps({"message": "No such model: dall-e-4"}).encode(), "No such model: dall-e-4"),
        (b"", "no error message"),
        (b"{}", "no error message"),
        (json.dumps(["a", "list"]).encode(), "no error message"),
    ],
)
def test_error_message_from_other_envelopes(body, message):
    error = error_from_response(404, body)
    assert type(error) is NotFoundError
    assert message in str(error)


# --- size of the message ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"<html>" + b"<p>error</p>" * 10_000 + b"</html>",
        b"x" * 100_000,
        json.dumps({"error": {"message": "m" * 100_000, "code": "too_long"}}).encode(),
        json.dumps({"success": False, "message": "m" * 100_000}).encode(),
        json.dumps({"detail": [{"msg": "bad", "input": "p" * 100_000}]}).encode(),
    ],
    ids=["html", "text", "openai-json", "indoxhub-json", "fastapi-json"],
)
def test_message_stays_short_for_a_100kb_body(body):
    assert len(body) >= 100_000
    error = error_from_response(500, body, request_id="req_big")
    text = str(error)
    assert "HTTP 500" in text and "request_id=req_big" in text
    assert len(error.body_excerpt) <= 301
    assert len(text) <= 1000


def test_excerpt_is_single_line_and_truncated():
    text = excerpt(b"line one\nline two\t\ttabbed   " + b"y" * 1000)
    assert text.startswith("line one line two tabbed y")
    assert len(text) == 301 and text.endswith("…")
    assert excerpt(None) == ""
    assert excerpt("short") == "short"


# --- keys never reach a message ----------------------------------------------------------------------------------

OPENAI_401 = openai_error(
    "Incorrect API key provided: sk-proj-abcdef123456. You can find your API key at "
    "https://platform.openai.com/account/api-keys.", code="invalid_api_key")


def assert_absent(secret: str, error: GatewayError) -> None:
    for text in (str(error), repr(error), error.body_excerpt, " ".join(map(str, error.args))):
        assert secret not in text


def test_echoed_openai_key_is_redacted():
    error = error_from_response(401, OPENAI_401)
    assert type(error) is AuthenticationError and error.fatal
    assert_absent("sk-proj-abcdef123456", error)
    assert_absent("abcdef123456", error)
    assert "Incorrect API key provided: ***" in str(error)


@pytest.mark.parametrize(
    "secret", ["my-gateway-key-Zx81Qw", "aigw_sk_your_api_key_123", "sk-gateway-xxxxxxxx", "AIzaSyD-0123456789"]
)
@pytest.mark.parametrize("shape", ["openai-json", "indoxhub-json", "text", "html"])
def test_known_secret_is_redacted_whatever_the_body(secret, shape):
    bodies = {
        "openai-json": openai_error(f"Invalid key {secret}"),
        "indoxhub-json": json.dumps({"success": False, "message": f"Invalid key {secret}"}).encode(),
        "text": f"Invalid key {secret}".encode(),
        "html": f"<html><body>Authorization: Bearer {secret}</body></html>".encode(),
    }
    error = error_from_response(401, bodies[shape], secrets=[secret, None])
    assert_absent(secret, error)


def test_secret_cut_by_the_excerpt_limit_does_not_leak_a_prefix():
    secret = "rawkey0123456789abcdefghij"
    for padding in range(280, 300):
        body = ("e" * padding + " " + secret + " tail").encode()
        error = error_from_response(401, body, secrets=[secret])
        # the excerpt stops around character 300; no piece of the key may survive the cut
        assert secret[:6] not in str(error), padding


def test_bearer_token_in_body_is_redacted():
    body = b'{"error": {"message": "bad header Authorization: Bearer abc.def-ghi_jkl=="}}'
    error = error_from_response(401, body)
    assert "abc.def-ghi_jkl" not in str(error)


# --- redact ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        ("Authorization: Bearer xyz", "Bearer xyz"),
        ("authorization: bearer eyJhbGciOi.payload.sig", "eyJhbGciOi"),
        ("key sk-proj-abcdef123456 rejected", "sk-proj-abcdef123456"),
        ("key sk-abcdefghijkl rejected", "sk-abcdefghijkl"),
        ("gateway key aigw_sk_your_api_key", "aigw_sk_your_api_key"),
        ("gateway key sk-gateway-xxxxxxxx", "sk-gateway-xxxxxxxx"),
    ],
)
def test_redact_patterns(text, gone):
    out = redact(text)
    assert gone not in out
    assert "***" in out


def test_redact_known_secrets_and_keeps_the_rest():
    assert redact("token=opaque-secret-value; user=bob", ["opaque-secret-value"]) == "token=***; user=bob"
    assert redact("nothing to hide here") == "nothing to hide here"
    # too-short or missing secrets are not "redacted" everywhere (that would destroy the message)
    assert redact("a b c", ["a", None, ""]) == "a b c"


# --- the other error types ----------------------------------------------------------------------------------


def test_request_validation_error_names_fields():
    error = RequestValidationError([Violation("n", "dall-e-3 supports only n=1"), Violation("size", "bad")],
                                   context="row 3")
    assert error.fields == ["n", "size"]
    assert str(error) == "row 3: invalid image request: n: dall-e-3 supports only n=1; size: bad"
    assert not error.fatal and not error.retryable


def test_malformed_response_error_message():
    error = MalformedResponseError("no data in response", request_id="r-5", body_excerpt="{}")
    assert str(error) == "malformed response: no data in response | request_id=r-5 | body: {}"
    assert error.retryable and not error.fatal


def test_transport_and_download_errors():
    assert GatewayConnectionError("reset").retryable is True
    expired = ImageExpiredError("gone", status=404)
    assert isinstance(expired, ImageDownloadError) and expired.status == 404
    assert not expired.retryable and not expired.fatal


def test_gateway_error_without_status():
    error = GatewayError("stream broke", status=None)
    assert str(error) == "gateway error | stream broke"


# --- class flags (how callers classify errors) ---------------------------------------------------------------


def _all_error_classes() -> list[type[ImageGenError]]:
    import imagegen_provider.transport.body  # noqa: F401  (ResponseTooLargeError)

    found, pending = [], [ImageGenError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_every_error_class_carries_the_three_flags():
    classes = _all_error_classes()
    assert len(classes) >= 20
    for cls in classes:
        for flag in ("retryable", "fatal", "permanent"):
            assert isinstance(getattr(cls, flag), bool), (cls, flag)
        # A row's own fault is never worth retrying, and never stops the run.
        assert not (cls.permanent and (cls.retryable or cls.fatal)), cls
        assert not (cls.fatal and cls.retryable), cls


@pytest.mark.parametrize(
    ("cls", "retryable", "fatal", "permanent"),
    [
        (ContentPolicyError, False, False, True),
        (RequestValidationError, False, False, True),
        (BadRequestError, False, False, True),
        (AuthenticationError, False, True, False),
        (InsufficientBalanceError, False, True, False),
        (PermissionDeniedError, False, True, False),
        (CircuitOpenError, False, True, False),
        (ClientConfigurationError, False, True, False),
        (RateLimitError, True, False, False),
        (ServerError, True, False, False),
        (GatewayConnectionError, True, False, False),
        (MalformedResponseError, True, False, False),
        (ImageDownloadError, False, False, False),
        (NotFoundError, False, False, False),
        (UnexpectedError, False, False, False),
    ],
)
def test_flags_per_class(cls, retryable, fatal, permanent):
    assert (cls.retryable, cls.fatal, cls.permanent) == (retryable, fatal, permanent)


# --- a key in any encoding -------------------------------------------------------------------------------------


def _encoded_forms(secret: str) -> dict[str, str]:
    import base64
    from urllib.parse import quote, quote_plus

    raw = secret.encode()
    forms = {
        "quote": quote(secret, safe=""),
        "quote-lower-hex": quote(secret, safe="").replace("%2D", "%2d").replace("%2B", "%2b"),
        "quote_plus": quote_plus(secret),
        "reversed": secret[::-1],
    }
    for prefix in (b"", b"Bearer ", b"user:", b"x", b"xy"):
        for name, encode in (("std", base64.b64encode), ("urlsafe", base64.urlsafe_b64encode)):
            text = encode(prefix + raw).decode()
            forms[f"b64-{name}-{prefix.decode() or 'alone'}"] = text
            forms[f"b64-{name}-{prefix.decode() or 'alone'}-unpadded"] = text.rstrip("=")
    return forms


SECRETS = ["sk-proj-Abc+def/123_456-XYZ", "TOPSECRET-gw-key-7f3a9c", "byok key with spaces & symbols!"]


@pytest.mark.parametrize("secret", SECRETS)
def test_encoded_secrets_are_redacted(secret):
    import base64

    for name, form in _encoded_forms(secret).items():
        out = redact(f"upstream said: {form} (end)", [secret])
        assert form not in out, name
        assert "upstream said:" in out and "(end)" in out, name
        # What is left of an encoded form cannot be decoded back into the key (or a long piece of it).
        for word in out.split():
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    decoded = decode(word + "=" * (-len(word) % 4)).decode("latin-1")
                except ValueError:
                    continue
                assert secret[:8] not in decoded and secret[-8:] not in decoded, (name, word)


def test_encoded_byok_key_is_redacted_from_gateway_errors():
    import base64

    byok = "provider-byok-9f8e7d6c"
    body = json.dumps({"error": {"message": "bad key " + base64.b64encode(byok.encode()).decode()
                                 + " / " + byok[::-1]}}).encode()
    error = error_from_response(401, body, secrets=["gateway-key-xyz", byok])
    for text in (str(error), error.body_excerpt):
        assert base64.b64encode(byok.encode()).decode()[:20] not in text
        assert byok[::-1] not in text

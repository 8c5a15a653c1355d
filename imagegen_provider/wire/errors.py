"""Typed errors for everything that can go wrong between a prompt and a stored image.

Every error message is built from data we control: status, request id and a short, redacted excerpt of
the response body. API keys never reach a message (see :func:`redact`).
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote, quote_plus

_EXCERPT_CHARS = 300

# Gateways echo keys back in 401 bodies ("Incorrect API key provided: sk-abc..."). We redact the key we
# know about, and anything shaped like a bearer token or a provider key, in case the echo is a different key.
_SECRET_PATTERNS = [
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"\b(?:sk|pk|rk|aigw_sk|sk-gateway)[-_][A-Za-z0-9_-]{6,}"),
]


def _base64_cores(data: bytes) -> set[str]:
    """Substrings that any base64 text containing ``data`` holds, whatever its alignment: for each of the three
    offsets, the characters that encode only bytes of ``data`` (standard and URL-safe alphabets). This catches the
    key inside ``base64("Bearer <key>")`` or ``base64("user:<key>")`` as well as alone, padded or not."""
    cores: set[str] = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data).decode("ascii").rstrip("=")
        # Characters touching the prefix or the (unknown) bytes after the key are not fixed: drop them.
        start = -(-offset * 4 // 3)
        stop = (offset + len(data)) * 4 // 3
        core = encoded[start:stop]
        if len(core) >= 6:
            cores.update({core, core.replace("+", "-").replace("/", "_")})
    return cores


def _secret_forms(secret: str) -> set[str]:
    """The spellings of ``secret`` that leak it: itself, reversed, URL-encoded (quote and quote_plus, either hex
    case), and base64 (std and URL-safe, padded or not, alone or inside a longer encoded text)."""
    forms = {secret, secret[::-1]}
    for encoded in (quote(secret, safe=""), quote_plus(secret), quote(secret)):
        forms.update({encoded, re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), encoded)})
    forms.update(_base64_cores(secret.encode("utf-8")))
    forms.update(_base64_cores(f"Bearer {secret}".encode()))
    return forms


@functools.lru_cache(maxsize=64)
def _secret_pattern(secret: str) -> re.Pattern[str]:
    # Longest first, so that a form containing another is removed whole.
    forms = sorted(_secret_forms(secret), key=len, reverse=True)
    return re.compile("|".join(re.escape(form) for form in forms))


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Remove known secrets (in any of the encodings above) and anything that looks like an API key."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = _secret_pattern(secret).sub("***", text)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub("***", text)
    return text


def excerpt(body: bytes | str | None, secrets: Iterable[str | None] = (), limit: int = _EXCERPT_CHARS) -> str:
    """A short, single-line, redacted excerpt of a response body for error messages."""
    if body is None:
        return ""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    # Redact before cutting: a key straddling the cut would otherwise leave its first characters behind.
    text = " ".join(redact(text, secrets).split())
    if len(text) > limit:
        text = text[:limit] + "…"
    return text


class ImageGenError(Exception):
    """Base class of every error raised by this package.

    Callers classify errors by the three class flags, never by class names. An error is never changed after it
    is raised: how many attempts were made, and what was paid for, travel in the client's ``GenerationFailed``.
    """

    #: Asking again may succeed (429, 5xx, timeouts, dropped connections, a corrupt 200).
    retryable: ClassVar[bool] = False
    #: Stop the whole run: no other request can succeed either (401/402/403, circuit open, storage).
    fatal: ClassVar[bool] = False
    #: The row's own fault (content policy, validation): the same row fails again, other rows are fine.
    permanent: ClassVar[bool] = False

    @property
    def error_type(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Violation:
    """One broken rule of a request: which field, which rule."""

    field: str
    rule: str

    def __str__(self) -> str:
        return f"{self.field}: {self.rule}"


class RequestValidationError(ImageGenError, ValueError):
    """The request breaks a documented rule; raised before any money is spent."""

    permanent = True

    def __init__(self, violations: list[Violation], *, context: str | None = None) -> None:
        self.violations = violations
        self.context = context
        prefix = f"{context}: " if context else ""
        super().__init__(prefix + "invalid image request: " + "; ".join(str(v) for v in violations))

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.violations]


class GatewayError(ImageGenError):
    """The gateway answered with an error status (or an error envelope)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None,
        request_id: str | None = None,
        body_excerpt: str = "",
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.request_id = request_id
        self.body_excerpt = body_excerpt
        self.code = code
        self.retry_after = retry_after
        parts = [f"HTTP {status}" if status is not None else "gateway error", message]
        if request_id:
            parts.append(f"request_id={request_id}")
        if body_excerpt:
            parts.append(f"body: {body_excerpt}")
        super().__init__(" | ".join(parts))


class BadRequestError(GatewayError):
    """400: the gateway rejected the request (bad parameter, unsupported model)."""

    permanent = True


class ContentPolicyError(BadRequestError):
    """400: the prompt was refused by the provider's safety system. Fails the image, not the batch."""


class AuthenticationError(GatewayError):
    """401: the API key is missing or wrong."""

    fatal = True


class InsufficientBalanceError(GatewayError):
    """402: the account has no money left."""

    fatal = True


class PermissionDeniedError(GatewayError):
    """403: the key may not use this model or endpoint."""

    fatal = True


class NotFoundError(GatewayError):
    """404: wrong base URL or path, or unknown model."""


class RequestTimeoutError(GatewayError):
    """408: the gateway gave up waiting for us."""

    retryable = True


class RateLimitError(GatewayError):
    """429: too many requests. Carries the Retry-After interval when the gateway sent one."""

    retryable = True


class ServerError(GatewayError):
    """5xx: the gateway or its upstream failed."""

    retryable = True


class BadGatewayError(ServerError):
    """502: the upstream provider failed; the body is often an HTML page from a proxy."""


class GatewayConnectionError(ImageGenError):
    """The connection failed or dropped, or timed out, before a response arrived."""

    retryable = True


class CircuitOpenError(ImageGenError):
    """Nothing succeeded for ``breaker_seconds`` while every answer was a 429, a 5xx or a transport error: the
    gateway is down or refusing everything, and waiting longer only holds the run up."""

    fatal = True


class ClientConfigurationError(ImageGenError):
    """The client cannot send at all (a base URL with a bad port or scheme): every request would fail alike."""

    fatal = True


class UnexpectedError(ImageGenError):
    """An exception nobody anticipated while generating, turned into an error of this package so that one
    image fails (with its attempts and payments on record) instead of the whole run."""


class MalformedResponseError(ImageGenError):
    """A 200 response we cannot use: not JSON, no data, bad base64, not an image.

    Retried: the image is lost either way, and asking again is the quickest way to get it.
    """

    retryable = True

    def __init__(self, reason: str, *, request_id: str | None = None, body_excerpt: str = "") -> None:
        self.reason = reason
        self.request_id = request_id
        self.body_excerpt = body_excerpt
        parts = [f"malformed response: {reason}"]
        if request_id:
            parts.append(f"request_id={request_id}")
        if body_excerpt:
            parts.append(f"body: {body_excerpt}")
        super().__init__(" | ".join(parts))


class ImageDownloadError(ImageGenError):
    """The image URL returned by the gateway could not be fetched."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class ImageExpiredError(ImageDownloadError):
    """The image URL answered 403/404: gateway URLs expire (about 60 minutes for OpenAI)."""


_STATUS_CLASSES: dict[int, type[GatewayError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientBalanceError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: RequestTimeoutError,
    429: RateLimitError,
    502: BadGatewayError,
}

_CONTENT_POLICY_MARKERS = ("content_policy", "moderation_blocked", "safety system", "content policy")


def _error_fields(payload: Any) -> tuple[str | None, str | None]:
    """(message, code) from the error envelopes gateways use: OpenAI's ``{"error": {...}}``,
    IndoxHub's ``{"success": false, "message": ...}``, FastAPI's ``{"detail": ...}``."""
    if not isinstance(payload, Mapping):
        return None, None
    error = payload.get("error")
    if isinstance(error, Mapping):
        message = error.get("message")
        code = error.get("code") or error.get("type")
        return (str(message) if message is not None else None), (str(code) if code is not None else None)
    if isinstance(error, str):
        return error, None
    for key in ("message", "detail"):
        value = payload.get(key)
        if value:
            return (value if isinstance(value, str) else json.dumps(value)), None
    return None, None


def error_from_response(
    status: int,
    body: bytes,
    *,
    request_id: str | None = None,
    retry_after: float | None = None,
    secrets: Iterable[str | None] = (),
) -> GatewayError:
    """Build the typed error for a non-2xx response."""
    body_excerpt = excerpt(body, secrets)
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = None
    message, code = _error_fields(payload)
    if isinstance(payload, Mapping) and not request_id:
        request_id = payload.get("request_id") if isinstance(payload.get("request_id"), str) else None
    if payload is None and body:
        message = "non-JSON error body (HTML from a proxy?)" if b"<" in body[:200] else "non-JSON error body"
    # The gateway's message is as untrusted as the body: redacted, and as short as the excerpt.
    message = excerpt(message or "no error message", secrets)

    cls = _STATUS_CLASSES.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else GatewayError
    if cls is BadRequestError and any(m in f"{code} {message}".lower() for m in _CONTENT_POLICY_MARKERS):
        cls = ContentPolicyError
    return cls(
        message,
        status=status,
        request_id=request_id,
        body_excerpt=body_excerpt,
        code=code,
        retry_after=retry_after,
    )

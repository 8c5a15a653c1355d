"""When and how long to retry: tenacity, with a wait that honours the gateway's Retry-After."""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_random_exponential,
)

from imagegen_provider.wire.errors import ImageGenError, RateLimitError

#: Retry-After values beyond this are capped: an image batch would rather fail one image than sleep for hours.
MAX_RETRY_AFTER_SECONDS = 300.0


def header_lookup(headers: Mapping[str, str]) -> Mapping[str, str]:
    """``headers`` with case-insensitive lookups: ``httpx.Headers`` as they are, plain mappings lower-cased."""
    if isinstance(headers, httpx.Headers):
        return headers
    return {str(key).lower(): value for key, value in headers.items()}


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    # "inf" or "nan" would pause forever (or not at all): a broken header, not an instruction.
    return value if math.isfinite(value) else None


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI), or ``Retry-After`` as seconds or an HTTP date."""
    headers = header_lookup(headers)
    millis = headers.get("retry-after-ms")
    if millis:
        value_ms = _finite(millis.strip())
        if value_ms is not None:
            return max(0.0, value_ms / 1000.0)
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    seconds = _finite(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def is_retryable(exc: BaseException) -> bool:
    """408, 429, 5xx, timeouts and dropped connections are retried; 400/401/402/403/404 are not."""
    if isinstance(exc, ImageGenError):
        return exc.retryable
    if isinstance(exc, httpx.UnsupportedProtocol):
        # A URL (or a redirect) to something that is not http(s): asking again cannot help.
        return False
    return isinstance(exc, httpx.TransportError)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = MAX_RETRY_AFTER_SECONDS
    #: Extra attempts allowed when the last answer was a 429: being told to wait is not a failure of the
    #: request, and an image should not be lost to a busy gateway after five polite refusals.
    rate_limited_attempts: int = 20

    def should_retry(self, error: BaseException, attempts: int) -> bool:
        """Whether to send again after ``attempts`` attempts ended in ``error``."""
        if not is_retryable(error):
            return False
        limit = max(1, self.max_attempts)
        if isinstance(error, RateLimitError):
            limit += self.rate_limited_attempts
        return attempts < limit

    def delay(self, error: BaseException, attempts: int) -> float:
        """Seconds to wait before attempt ``attempts + 1``: the gateway's Retry-After (capped), else full-jitter
        exponential backoff (uniform in 0 .. initial * 2^(attempts-1), at most ``backoff_max``)."""
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float):
            return min(self.max_retry_after, float(retry_after)) + 0.05 * (attempts % 5)
        ceiling = min(self.backoff_max, self.backoff_initial * 2.0 ** max(0, attempts - 1))
        return random.uniform(0.0, ceiling)

    def stop(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        limit = max(1, self.max_attempts)
        if isinstance(exc, RateLimitError):
            limit += self.rate_limited_attempts
        return state.attempt_number >= limit

    def wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float):
            # The gateway said when; a little jitter keeps retries from landing together.
            return min(self.max_retry_after, float(retry_after)) + 0.05 * (state.attempt_number % 5)
        return float(wait_random_exponential(multiplier=self.backoff_initial, max=self.backoff_max)(state))

    def retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=self.stop,
            wait=self.wait,
            retry=retry_if_exception(is_retryable),
            reraise=True,
        )

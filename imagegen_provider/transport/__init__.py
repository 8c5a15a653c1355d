"""Transport: async httpx client, retries, rate limiter, circuit breaker, capped bodies, image download."""

from imagegen_provider.transport.client import (
    Generation,
    GenerationFailed,
    ImageGenClient,
    Timeouts,
    VerifiedImage,
)
from imagegen_provider.transport.download import ImageDownloader
from imagegen_provider.transport.ratelimit import RateLimiter, RateLimits
from imagegen_provider.transport.retry import RetryPolicy, is_retryable, parse_retry_after

__all__ = [
    "Generation", "GenerationFailed", "ImageDownloader", "ImageGenClient", "RateLimiter", "RateLimits",
    "RetryPolicy", "Timeouts", "VerifiedImage", "is_retryable", "parse_retry_after",
]

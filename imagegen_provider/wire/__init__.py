"""The wire protocol: request model, per-model validation, dialects, response normaliser, errors. No I/O."""

from imagegen_provider.wire.dialects import DIALECTS, Dialect, WireBody, get_dialect
from imagegen_provider.wire.errors import (
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
from imagegen_provider.wire.imageinfo import inspect_image
from imagegen_provider.wire.normalize import normalize_response, normalize_stream, normalize_usage
from imagegen_provider.wire.request import ImageRequest
from imagegen_provider.wire.result import GeneratedImage, GenerationResult, ImageInfo, Usage
from imagegen_provider.wire.validation import ModelFamily, check_model_rules, model_family

__all__ = [
    "DIALECTS", "AuthenticationError", "BadGatewayError", "BadRequestError", "ContentPolicyError", "Dialect",
    "GatewayConnectionError", "GatewayError", "GeneratedImage", "GenerationResult", "ImageDownloadError",
    "ImageExpiredError",
    "ImageGenError", "ImageInfo", "ImageRequest", "InsufficientBalanceError", "MalformedResponseError",
    "ModelFamily", "NotFoundError", "PermissionDeniedError", "RateLimitError", "RequestTimeoutError",
    "RequestValidationError", "ServerError", "Usage", "Violation", "WireBody", "check_model_rules",
    "error_from_response", "get_dialect", "inspect_image", "model_family", "normalize_response",
    "normalize_stream", "normalize_usage", "redact",
]

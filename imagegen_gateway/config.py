"""Every knob of the bundled gateway, in one frozen dataclass, plus its command-line form.

The CLI (``imagegen gateway``) and ``python -m imagegen_gateway`` both build their parser with
:func:`add_gateway_arguments` and turn it into a config with :func:`config_from_args`, so the ``--help`` text
written here is the gateway's documentation. The defaults describe a well-behaved gateway: any non-empty key
is accepted, no limits, no faults.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from imagegen_gateway.render import DETAILS

ResponseFormat = Literal["url", "b64_json"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

DEFAULT_MODELS: tuple[str, ...] = (
    "dall-e-2",
    "dall-e-3",
    "gpt-image-1",
    "gpt-image-1-mini",
    "gpt-image-1.5",
    "imagen-3",
    "openai/dall-e-3",
    "openai/gpt-image-1",
    "google/imagen-4",
    "black-forest-labs/flux-schnell",
)

_RATES = (
    "fail_502_rate",
    "fail_503_rate",
    "fail_500_rate",
    "drop_rate",
    "corrupt_b64_rate",
    "envelope_failure_rate",
)


@dataclass(frozen=True)
class GatewayConfig:
    """Behaviour of one gateway instance. All fault rates are probabilities in ``[0, 1]``."""

    #: ``None`` accepts any non-empty bearer key; a string accepts only that key.
    api_key: str | None = None
    #: Prepaid balance in USD; ``None`` is unlimited. Requests the balance cannot cover get 402.
    balance_usd: float | None = None
    #: Requests per minute (token bucket); ``None`` is unlimited.
    rpm: float | None = None
    #: Images per minute (``n`` counts); ``None`` is unlimited.
    ipm: float | None = None
    #: Capacity of the request bucket; ``None`` means one second's worth (at least 1).
    burst: float | None = None
    #: Capacity of the image bucket; ``None`` means one second's worth (at least 1).
    image_burst: float | None = None
    #: Send ``x-ratelimit-*`` headers. ``False`` is the "hidden limit" mode: 429 + Retry-After only.
    rate_limit_headers: bool = True
    #: Send ``Retry-After`` / ``retry-after-ms`` on 429. ``False`` exercises clients' fallback backoff.
    retry_after_header: bool = True
    #: Added delay before each response, uniform in ``(min, max)`` seconds; ``None`` is none.
    latency: tuple[float, float] | None = None
    fail_502_rate: float = 0.0
    fail_503_rate: float = 0.0
    fail_500_rate: float = 0.0
    #: Send part of a 200 response, then abort the connection (the image was generated and charged).
    drop_rate: float = 0.0
    #: A 200 whose ``b64_json`` is not valid base64.
    corrupt_b64_rate: float = 0.0
    #: IndoxHub route only: a 200 whose envelope says ``success: false``.
    envelope_failure_rate: float = 0.0
    #: Seed of the fault and latency draws; ``None`` draws from system entropy.
    fault_seed: int | None = None
    #: How long a returned image URL stays downloadable.
    url_ttl_seconds: float = 3600.0
    #: How many URL images are kept (least recently used are evicted, and then 404).
    url_cache_size: int = 2000
    #: How many encoded images the renderer keeps (benchmarks request the same image many times).
    render_cache_size: int = 256
    #: ``flat`` images encode to a few KB; ``photo`` ones have the entropy (and size) of real model output.
    image_detail: str = "flat"
    #: Default ``response_format`` of non-GPT models when the request names none (OpenAI's is ``url``).
    default_response_format: ResponseFormat = "url"
    #: A prompt containing this word (case-insensitive) is refused as a content-policy violation.
    content_policy_trigger: str | None = "forbidden-content"
    #: Base of returned image URLs (e.g. behind a proxy); ``None`` uses the request's own host.
    public_base_url: str | None = None
    #: Model ids listed by ``GET /v1/models``. Generation accepts any model.
    models: tuple[str, ...] = field(default=DEFAULT_MODELS)

    def __post_init__(self) -> None:
        if isinstance(self.latency, (int, float)):
            object.__setattr__(self, "latency", (float(self.latency), float(self.latency)))
        elif self.latency is not None:
            object.__setattr__(self, "latency", (float(self.latency[0]), float(self.latency[1])))
        problems = []
        for name in _RATES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name} must be between 0 and 1, got {value}")
        for name in ("rpm", "ipm", "burst", "image_burst"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                problems.append(f"{name} must be a positive number, got {value}")
        if self.latency is not None:
            low, high = self.latency
            if low < 0 or high < low:
                problems.append(f"latency must be (min, max) with 0 <= min <= max, got {self.latency}")
        if self.balance_usd is not None and self.balance_usd < 0:
            problems.append("balance_usd must not be negative")
        if self.url_ttl_seconds <= 0:
            problems.append("url_ttl_seconds must be positive")
        if self.image_detail not in DETAILS:
            problems.append(f"image_detail must be one of {', '.join(DETAILS)}")
        if self.url_cache_size < 1 or self.render_cache_size < 0:
            problems.append("url_cache_size must be >= 1 and render_cache_size >= 0")
        if self.default_response_format not in ("url", "b64_json"):
            problems.append("default_response_format must be 'url' or 'b64_json'")
        if self.api_key is not None and not self.api_key:
            problems.append("api_key must be None (accept any key) or a non-empty string")
        if problems:
            raise ValueError("invalid gateway config: " + "; ".join(problems))


def parse_latency(text: str) -> tuple[float, float] | None:
    """``"0.3-1.5"`` → ``(0.3, 1.5)``; ``"0.5"`` → ``(0.5, 0.5)``; ``"0"`` → ``None``."""
    low_text, sep, high_text = text.strip().partition("-")
    try:
        low = float(low_text)
        high = float(high_text) if sep else low
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SECONDS or MIN-MAX seconds, got {text!r}") from None
    if low < 0 or high < low:
        raise argparse.ArgumentTypeError(f"latency needs 0 <= MIN <= MAX, got {text!r}")
    return None if high == 0 else (low, high)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_gateway_arguments(parser: argparse.ArgumentParser, *, server_options: bool = True) -> None:
    """Add every gateway option to ``parser``.

    :param server_options: also add ``--host``, ``--port`` and ``--log-level`` (pass ``False`` when the
        caller defines its own).
    """
    if server_options:
        server = parser.add_argument_group("server")
        server.add_argument("--host", default=DEFAULT_HOST, help=f"Interface to listen on (default {DEFAULT_HOST}).")
        server.add_argument(
            "--port",
            type=int,
            default=DEFAULT_PORT,
            help=f"TCP port to listen on; 0 picks a free port (default {DEFAULT_PORT}). "
            "The actual address is printed once the gateway is listening.",
        )
        server.add_argument(
            "--log-level",
            default="warning",
            choices=("critical", "error", "warning", "info", "debug"),
            help="uvicorn log level (default warning; 'info' logs every request).",
        )

    account = parser.add_argument_group("account")
    account.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help="Accept only this bearer key (anything else gets 401). Default: any non-empty key is accepted.",
    )
    account.add_argument(
        "--balance-usd",
        metavar="USD",
        type=float,
        default=None,
        help="Prepaid balance in USD. Each generated image is charged (dall-e-2 $0.02, dall-e-3 $0.04-0.12, "
        "gpt-image by tokens, other models $0.01); a request the balance cannot cover gets 402. "
        "Default: unlimited.",
    )

    limits = parser.add_argument_group("rate limits (token buckets)")
    limits.add_argument(
        "--rpm",
        metavar="N",
        type=_positive,
        default=None,
        help="Requests per minute. A request that finds the bucket empty gets 429. Default: unlimited.",
    )
    limits.add_argument(
        "--ipm",
        metavar="N",
        type=_positive,
        default=None,
        help="Images per minute; a request for n images takes n tokens. Default: unlimited.",
    )
    limits.add_argument(
        "--burst",
        metavar="N",
        type=_positive,
        default=None,
        help="Capacity of the request bucket (how many requests may arrive at once). "
        "Default: one second's worth of --rpm, at least 1.",
    )
    limits.add_argument(
        "--image-burst",
        metavar="N",
        type=_positive,
        default=None,
        help="Capacity of the image bucket. Default: one second's worth of --ipm, at least 1.",
    )
    limits.add_argument(
        "--no-rate-limit-headers",
        dest="rate_limit_headers",
        action="store_false",
        help="Hidden-limit mode: do not send x-ratelimit-limit/remaining/reset-requests|images headers "
        "(429 responses still carry Retry-After).",
    )
    limits.add_argument(
        "--no-retry-after",
        dest="retry_after_header",
        action="store_false",
        help="Send 429 responses without Retry-After / retry-after-ms, to exercise clients' own backoff.",
    )

    faults = parser.add_argument_group("fault injection (probabilities between 0 and 1; default 0)")
    faults.add_argument(
        "--latency",
        type=parse_latency,
        default=None,
        metavar="SECONDS|MIN-MAX",
        help="Delay every generation response (after rate limiting): a fixed '0.5' or uniform '0.3-1.5' seconds.",
    )
    faults.add_argument(
        "--fail-502-rate", type=_rate, default=0.0, metavar="P",
        help="Answer 502 with an nginx HTML page, like a proxy in front of a failed upstream.",
    )
    faults.add_argument(
        "--fail-503-rate", type=_rate, default=0.0, metavar="P",
        help="Answer 503 (JSON error, Retry-After: 1): the service is overloaded.",
    )
    faults.add_argument(
        "--fail-500-rate", type=_rate, default=0.0, metavar="P", help="Answer 500 with a JSON server error."
    )
    faults.add_argument(
        "--drop-rate",
        type=_rate,
        metavar="P",
        default=0.0,
        help="Abort the connection half-way through a 200 response. The image WAS generated and charged "
        "(stats: charged_images), so a client retry pays twice - as with real gateways.",
    )
    faults.add_argument(
        "--corrupt-b64-rate", type=_rate, default=0.0, metavar="P",
        help="Answer 200 with a b64_json that is not valid base64 (not charged).",
    )
    faults.add_argument(
        "--envelope-failure-rate",
        type=_rate,
        metavar="P",
        default=0.0,
        help="IndoxHub route only: answer 200 with {\"success\": false, \"message\": ...} (not charged).",
    )
    faults.add_argument(
        "--fault-seed",
        metavar="SEED",
        type=int,
        default=None,
        help="Seed the fault and latency draws so a run's fault sequence is reproducible. Default: random.",
    )

    images = parser.add_argument_group("images")
    images.add_argument(
        "--url-ttl-seconds",
        metavar="SECONDS",
        type=_positive,
        default=3600.0,
        help="How long image URLs (response_format=url) stay downloadable; afterwards GET /files/... is 404 "
        "(default 3600, like OpenAI's 60 minutes).",
    )
    images.add_argument(
        "--url-cache-size", metavar="N", type=int, default=2000,
        help="How many URL images are kept in memory; older ones are evicted and then 404 (default 2000).",
    )
    images.add_argument(
        "--render-cache-size", metavar="N", type=int, default=256,
        help="How many encoded images are cached, keyed by their parameters (default 256).",
    )
    images.add_argument(
        "--image-detail", choices=DETAILS, default="flat",
        help="flat (default): images encode to a few KB, fast for tests. photo: smooth noise gives images the "
        "size of real model output (a 1024x1024 PNG is about 2 MB), for client benchmarks; slower to render "
        "(cached).",
    )
    images.add_argument(
        "--default-response-format",
        choices=("url", "b64_json"),
        default="url",
        help="response_format of dall-e and other non-GPT models when the request names none "
        "(default url, as OpenAI). GPT image models always return b64_json.",
    )
    images.add_argument(
        "--content-policy-trigger",
        metavar="WORD",
        default="forbidden-content",
        help="Prompts containing this word are refused with 400 content_policy_violation "
        "(default 'forbidden-content'; '' disables).",
    )
    images.add_argument(
        "--public-base-url",
        metavar="URL",
        default=None,
        help="Base of returned image URLs when clients reach the gateway through a proxy or another host name. "
        "Default: the host the request was sent to.",
    )


def config_from_mapping(options: Mapping[str, Any]) -> GatewayConfig:
    """A config from a plain mapping (the ``local_gateway`` connection extra), allow-listed to its fields.

    :raises ValueError: an unknown option, or a value :class:`GatewayConfig` refuses.
    """
    known = {f.name for f in fields(GatewayConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown local_gateway option(s): {', '.join(unknown)}")
    values = dict(options)
    for name in ("latency", "models"):
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    return GatewayConfig(**values)


def config_from_args(ns: argparse.Namespace) -> GatewayConfig:
    """The :class:`GatewayConfig` described by parsed :func:`add_gateway_arguments` options."""
    return GatewayConfig(
        api_key=ns.api_key,
        balance_usd=ns.balance_usd,
        rpm=ns.rpm,
        ipm=ns.ipm,
        burst=ns.burst,
        image_burst=ns.image_burst,
        rate_limit_headers=ns.rate_limit_headers,
        retry_after_header=ns.retry_after_header,
        latency=ns.latency,
        fail_502_rate=ns.fail_502_rate,
        fail_503_rate=ns.fail_503_rate,
        fail_500_rate=ns.fail_500_rate,
        drop_rate=ns.drop_rate,
        corrupt_b64_rate=ns.corrupt_b64_rate,
        envelope_failure_rate=ns.envelope_failure_rate,
        fault_seed=ns.fault_seed,
        url_ttl_seconds=ns.url_ttl_seconds,
        url_cache_size=ns.url_cache_size,
        render_cache_size=ns.render_cache_size,
        image_detail=ns.image_detail,
        default_response_format=ns.default_response_format,
        content_policy_trigger=ns.content_policy_trigger or None,
        public_base_url=ns.public_base_url,
    )

"""Every knob of the bundled gateway, declared once: a field of the frozen :class:`GatewayConfig` whose
metadata (:class:`Option`) carries its command-line flag, parser, check and ``--help`` text.

The CLI (``imagegen gateway``), ``python -m imagegen_gateway`` (:func:`add_gateway_arguments`,
:func:`config_from_args`) and the ``local_gateway`` connection extra (:func:`config_from_mapping`) are all
derived from those fields, so the ``--help`` text written here is the gateway's documentation. The defaults
describe a well-behaved gateway: any non-empty key is accepted, no limits, no faults.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from imagegen_gateway.limiter import SHAPES

ResponseFormatName = Literal["url", "b64_json"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

#: Image detail levels: ``flat`` encodes to a few KB (fast tests); ``photo`` adds smooth noise so that encoded
#: sizes are those of real model output (a 1024x1024 PNG of about 2 MB), for benchmarks of the client.
DETAILS = ("flat", "photo")

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

#: ``--help`` group of each option, in display order.
GROUPS = {
    "account": "account",
    "limits": "rate limits (token bucket, sliding or calendar-minute fixed window)",
    "faults": "fault injection (probabilities between 0 and 1; default 0)",
    "images": "images",
    "batch": "batch API (/v1/files, /v1/batches; openai dialect only)",
}

Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Option:
    """How one :class:`GatewayConfig` field appears on the command line and what values it takes."""

    help: str
    group: str
    #: Reads the command-line text; ``None`` for a boolean switch (``--name`` or, when on by default, ``--no-…``).
    parse: Callable[[str], Any] | None = str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    #: The flag, when it is not the field name in kebab case (switches that are on by default: ``--no-…``).
    flag: str | None = None
    #: Returns what is wrong with a value, or ``None``.
    check: Check | None = None


def option(default: Any, help: str, group: str, **details: Any) -> Any:
    """A :class:`GatewayConfig` field with its :class:`Option`."""
    return field(default=default, metadata={"option": Option(help=help, group=group, **details)})


def _probability(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else f"must be between 0 and 1, got {value}"


def _positive_or_none(value: float | None) -> str | None:
    if value is None or (value > 0 and math.isfinite(value)):
        return None
    return f"must be a positive number, got {value}"


def _latency_range(value: tuple[float, float] | None) -> str | None:
    if value is None or 0 <= value[0] <= value[1]:
        return None
    return f"must be (min, max) with 0 <= min <= max, got {value}"


def _one_of(*allowed: str) -> Check:
    return lambda value: None if value in allowed else f"must be one of {', '.join(allowed)}"


def _at_least(low: int) -> Check:
    return lambda value: None if value >= low else f"must be >= {low}"


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if _probability(value) is not None:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _word_or_none(text: str) -> str | None:
    return text or None


@dataclass(frozen=True)
class GatewayConfig:
    """Behaviour of one gateway instance. All fault rates are probabilities in ``[0, 1]``."""

    api_key: str | None = option(
        None, "Accept only this bearer key (anything else gets 401). Default: any non-empty key is accepted.",
        "account", metavar="KEY",
        check=lambda v: None if v is None or v else "must be None (accept any key) or a non-empty string",
    )
    balance_usd: float | None = option(
        None, "Prepaid balance in USD. Each generated image is charged at the list prices of the engine's "
        "prices.json (dall-e per image, GPT image models by tokens, unlisted models $0.01); a request the balance "
        "cannot cover gets 402. Default: unlimited.",
        "account", parse=float, metavar="USD", check=lambda v: None if v is None or v >= 0 else "must not be negative",
    )
    rpm: float | None = option(
        None, "Requests per minute. A request that finds the bucket empty gets 429. Default: unlimited.",
        "limits", parse=_positive, metavar="N", check=_positive_or_none,
    )
    ipm: float | None = option(
        None, "Images per minute; a request for n images takes n tokens. Default: unlimited.",
        "limits", parse=_positive, metavar="N", check=_positive_or_none,
    )
    burst: float | None = option(
        None, "Capacity of the request bucket (how many requests may arrive at once). Default: one second's worth "
        "of --rpm, at least 1.", "limits", parse=_positive, metavar="N", check=_positive_or_none,
    )
    image_burst: float | None = option(
        None, "Capacity of the image bucket. Default: one second's worth of --ipm, at least 1.",
        "limits", parse=_positive, metavar="N", check=_positive_or_none,
    )
    limiter: str = option(
        "token-bucket", "Shape of the --rpm/--ipm limits: token-bucket (refills continuously, --burst at once), "
        "sliding-window (at most N accepted in any 60 s) or fixed-window (at most N per calendar minute, refused "
        "requests counted too, like LiteLLM's proxy with enforce_model_rate_limits).",
        "limits", choices=SHAPES, check=_one_of(*SHAPES),
    )
    rate_limit_headers: bool = option(
        True, "Hidden-limit mode: do not send x-ratelimit-limit/remaining/reset-requests|images headers "
        "(429 responses still carry Retry-After).", "limits", parse=None, flag="--no-rate-limit-headers",
    )
    retry_after_header: bool = option(
        True, "Send 429 responses without Retry-After / retry-after-ms, to exercise clients' own backoff.",
        "limits", parse=None, flag="--no-retry-after",
    )
    latency: tuple[float, float] | None = option(
        None, "Delay every generation response (after rate limiting): a fixed '0.5' or uniform '0.3-1.5' seconds.",
        "faults", parse=lambda text: parse_latency(text), metavar="SECONDS|MIN-MAX", check=_latency_range,
    )
    fail_502_rate: float = option(
        0.0, "Answer 502 with an nginx HTML page, like a proxy in front of a failed upstream.",
        "faults", parse=_rate, metavar="P", check=_probability,
    )
    fail_503_rate: float = option(
        0.0, "Answer 503 (JSON error, Retry-After: 1): the service is overloaded.",
        "faults", parse=_rate, metavar="P", check=_probability,
    )
    fail_500_rate: float = option(
        0.0, "Answer 500 with a JSON server error.", "faults", parse=_rate, metavar="P", check=_probability,
    )
    drop_rate: float = option(
        0.0, "Abort the connection half-way through a 200 response. The image WAS generated and charged "
        "(stats: charged_images), so a client retry pays twice - as with real gateways.",
        "faults", parse=_rate, metavar="P", check=_probability,
    )
    corrupt_b64_rate: float = option(
        0.0, "Answer 200 with a b64_json that is not valid base64 (not charged).",
        "faults", parse=_rate, metavar="P", check=_probability,
    )
    envelope_failure_rate: float = option(
        0.0, "IndoxHub route only: answer 200 with {\"success\": false, \"message\": ...} (not charged).",
        "faults", parse=_rate, metavar="P", check=_probability,
    )
    fault_seed: int | None = option(
        None, "Seed the fault and latency draws so a run's fault sequence is reproducible. Default: random.",
        "faults", parse=int, metavar="SEED",
    )
    url_ttl_seconds: float = option(
        3600.0, "How long image URLs (response_format=url) stay downloadable; afterwards GET /files/... is 404 "
        "(default 3600, like OpenAI's 60 minutes).", "images", parse=_positive, metavar="SECONDS",
        check=lambda v: None if v > 0 else "must be positive",
    )
    url_cache_size: int = option(
        2000, "How many URL images are kept in memory; older ones are evicted and then 404 (default 2000).",
        "images", parse=int, metavar="N", check=_at_least(1),
    )
    render_cache_size: int = option(
        256, "How many encoded images are cached, keyed by their parameters (default 256).",
        "images", parse=int, metavar="N", check=_at_least(0),
    )
    image_detail: str = option(
        "flat", "flat (default): images encode to a few KB, fast for tests. photo: smooth noise gives images the "
        "size of real model output (a 1024x1024 PNG is about 2 MB), for client benchmarks; slower to render "
        "(cached).", "images", choices=DETAILS, check=_one_of(*DETAILS),
    )
    default_response_format: ResponseFormatName = option(  # noqa: RUF009 - option() is a dataclass field()
        "url", "response_format of dall-e and other non-GPT models when the request names none "
        "(default url, as OpenAI). GPT image models always return b64_json.",
        "images", choices=("url", "b64_json"), check=_one_of("url", "b64_json"),
    )
    content_policy_trigger: str | None = option(
        "forbidden-content", "Prompts containing this word are refused with 400 content_policy_violation "
        "(default 'forbidden-content'; '' disables).", "images", parse=_word_or_none, metavar="WORD",
    )
    public_base_url: str | None = option(
        None, "Base of returned image URLs when clients reach the gateway through a proxy or another host name. "
        "Default: the host the request was sent to.", "images", metavar="URL",
    )
    repeat_unseeded: bool = option(
        False, "A request without a seed gets the seed derived from its prompt, so identical requests get identical "
        "(cached) images, for benchmarks. Default: a fresh random seed per request, so that repeated requests "
        "differ as a real model's do (the seed is written on the image).", "images", parse=None,
    )
    batch_delay: float = option(
        0.0, "Seconds a batch waits (validating, then in_progress with no line done) before its lines are worked "
        "on (default 0). Gives tests and demos time to see a batch in progress, cancel it or kill its client.",
        "batch", parse=float, metavar="SECONDS", check=lambda v: None if v >= 0 else "must not be negative",
    )
    batch_line_failure_rate: float = option(
        0.0, "Probability that a batch line fails with a 500 server_error written to the batch's error file "
        "(not charged).", "batch", parse=_rate, metavar="P", check=_probability,
    )
    batch_expire_after_lines: int | None = option(
        None, "A batch expires after this many of its lines are done: what finished is in its output file, the "
        "rest is in its error file with code batch_expired (as OpenAI does at the end of the 24 h window). "
        "Default: batches never expire.", "batch", parse=int, metavar="N",
        check=lambda v: None if v is None or v >= 0 else "must be >= 0",
    )
    batch_discount: float | None = option(
        None, "Batch lines are charged this fraction of the synchronous price. Default: the fraction the price "
        "table (prices.json 'batch') gives the model, 0.5 (OpenAI's batch discount) unless it says otherwise.",
        "batch", parse=_rate, metavar="FRACTION", check=lambda v: None if v is None else _probability(v),
    )
    batch_max_requests: int = option(
        50_000, "Most lines one batch input file may hold (default 50000, OpenAI's limit); more fail the batch "
        "at validation.", "batch", parse=int, metavar="N", check=_at_least(1),
    )
    batch_max_file_bytes: int = option(
        200 * 1024 * 1024, "Largest accepted upload to /v1/files, in bytes (default 200 MB, OpenAI's batch input "
        "limit); a larger upload gets 400.", "batch", parse=int, metavar="BYTES", check=_at_least(1),
    )
    #: Model ids listed by ``GET /v1/models`` (not a command-line option). Generation accepts any model.
    models: tuple[str, ...] = field(default=DEFAULT_MODELS)

    def __post_init__(self) -> None:
        latency: Any = self.latency
        if isinstance(latency, (int, float)):
            object.__setattr__(self, "latency", (float(latency), float(latency)))
        elif latency is not None:
            object.__setattr__(self, "latency", (float(latency[0]), float(latency[1])))
        problems = []
        for item, spec in options():
            value = getattr(self, item.name)
            problem = spec.check(value) if spec.check is not None else None
            if problem:
                problems.append(f"{item.name} {problem}")
        if problems:
            raise ValueError("invalid gateway config: " + "; ".join(problems))


def options() -> list[tuple[Any, Option]]:
    """``(field, Option)`` of every command-line knob, in declaration order."""
    return [(item, item.metadata["option"]) for item in fields(GatewayConfig) if "option" in item.metadata]


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


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
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


def add_gateway_arguments(parser: argparse.ArgumentParser, *, server_options: bool = True) -> None:
    """Add every gateway option (one per :class:`GatewayConfig` field with an :class:`Option`) to ``parser``.

    :param server_options: also add ``--host``, ``--port`` and ``--log-level`` (pass ``False`` when the
        caller defines its own).
    """
    if server_options:
        _add_server_arguments(parser)
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for item, spec in options():
        flag = spec.flag or "--" + item.name.replace("_", "-")
        target = groups[spec.group]
        if spec.parse is None:
            action = "store_false" if item.default else "store_true"
            target.add_argument(flag, dest=item.name, action=action, default=item.default, help=spec.help)
            continue
        target.add_argument(flag, dest=item.name, type=spec.parse, default=item.default, metavar=spec.metavar,
                            choices=spec.choices, help=spec.help)


def config_from_args(ns: argparse.Namespace) -> GatewayConfig:
    """The :class:`GatewayConfig` described by parsed :func:`add_gateway_arguments` options."""
    return GatewayConfig(**{item.name: getattr(ns, item.name) for item, _ in options()})


def config_from_mapping(options: Mapping[str, Any]) -> GatewayConfig:
    """A config from a plain mapping (the ``local_gateway`` connection extra), allow-listed to its fields.

    :raises ValueError: an unknown option, or a value :class:`GatewayConfig` refuses.
    """
    known = {item.name for item in fields(GatewayConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown local_gateway option(s): {', '.join(unknown)}")
    values = dict(options)
    for name in ("latency", "models"):
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    return GatewayConfig(**values)

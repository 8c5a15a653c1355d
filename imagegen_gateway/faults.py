"""Which fault, if any, a request suffers, and the error bodies real gateways send for them.

Draws come from :class:`random.Random` instances seeded by ``fault_seed`` so a benchmark can replay the same
fault sequence. Every rate is drawn for every request, fired or not, so that the n-th request meets the same
fault whatever happened before it.
"""

from __future__ import annotations

import random
from enum import StrEnum

from imagegen_gateway.config import GatewayConfig

NGINX_502_HTML = (
    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center>"
    "<hr><center>nginx</center></body></html>"
)


class Fault(StrEnum):
    BAD_GATEWAY = "502"
    UNAVAILABLE = "503"
    SERVER_ERROR = "500"
    DROP = "drop"
    CORRUPT_B64 = "corrupt_b64"
    ENVELOPE_FAILURE = "envelope_failure"

    @property
    def charges(self) -> bool:
        """A dropped connection loses a response whose image was already made and paid for."""
        return self is Fault.DROP


# Order of precedence when several would fire: errors before the response, then damaged responses.
_ORDER: tuple[tuple[Fault, str], ...] = (
    (Fault.BAD_GATEWAY, "fail_502_rate"),
    (Fault.UNAVAILABLE, "fail_503_rate"),
    (Fault.SERVER_ERROR, "fail_500_rate"),
    (Fault.DROP, "drop_rate"),
    (Fault.CORRUPT_B64, "corrupt_b64_rate"),
    (Fault.ENVELOPE_FAILURE, "envelope_failure_rate"),
)


class FaultInjector:
    """Decides faults and latency for each generation request."""

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config
        self.reseed()

    def reseed(self) -> None:
        seed = self._config.fault_seed
        # Separate streams: turning latency on must not change which requests fail.
        self._faults = random.Random(None if seed is None else f"faults:{seed}")
        self._latency = random.Random(None if seed is None else f"latency:{seed}")

    def draw(self, *, envelope: bool) -> Fault | None:
        """The fault of the next request. ``envelope``: the route can express ``success: false``."""
        chosen = None
        for fault, attribute in _ORDER:
            rate = getattr(self._config, attribute)
            roll = self._faults.random()
            if chosen is None and rate > 0 and roll < rate:
                if fault is Fault.ENVELOPE_FAILURE and not envelope:
                    continue
                chosen = fault
        return chosen

    def latency(self) -> float:
        if self._config.latency is None:
            return 0.0
        low, high = self._config.latency
        return self._latency.uniform(low, high)


def corrupt_base64(valid: str) -> str:
    """Base64 that a strict decoder refuses: characters outside the alphabet and broken padding."""
    return "!!not-base64!!" + valid[: min(len(valid), 64)] + "=*="

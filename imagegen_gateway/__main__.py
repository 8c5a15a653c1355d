"""``python -m imagegen_gateway --port P ...``: the same options as ``imagegen gateway``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from imagegen_gateway.config import add_gateway_arguments, config_from_args
from imagegen_gateway.server import run_gateway


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m imagegen_gateway",
        description="Run the bundled OpenAI-compatible image gateway (OpenAI /v1, IndoxHub /api/v1 and router "
        "/router/v1 dialects) with optional rate limits, balance and fault injection. Counters: "
        "GET /_gateway/stats; reset: POST /_gateway/reset.",
    )
    add_gateway_arguments(parser)
    args = parser.parse_args(argv)
    run_gateway(config_from_args(args), args.host, args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()

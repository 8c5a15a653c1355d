"""The ``imagegen run`` options of Batch API mode (``--api batch``), kept apart from the CLI's other options."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagegen_provider.engine.batch import BatchOptions

API_CHOICES = ("sync", "batch")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, not {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {text!r}")
    return value


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """``--api`` and the batch options of ``imagegen run``."""
    from imagegen_provider.engine.batch import DEFAULT_BATCH_TIMEOUT
    from imagegen_provider.engine.batch_plan import DEFAULT_MAX_BYTES, DEFAULT_MAX_REQUESTS

    group = parser.add_argument_group("batch API mode (--api batch: half the price, results within 24 h)")
    group.add_argument("--api", choices=API_CHOICES, default="sync",
                       help="sync (default): one request per image. batch: the gateway's Batch API (/v1/files, "
                       "/v1/batches; openai dialect), at the batch price; rerun the same command to collect.")
    group.add_argument("--no-wait", action="store_true",
                       help="Submit the batches (and collect those that ended) and exit; a later rerun collects.")
    group.add_argument("--poll-interval", type=_positive, default=30.0, metavar="S",
                       help="Seconds between two looks at the live batches (default 30).")
    group.add_argument("--batch-timeout", type=_positive, default=DEFAULT_BATCH_TIMEOUT, metavar="S",
                       help=f"Most seconds to wait for the batches (default {DEFAULT_BATCH_TIMEOUT:g}: the 24 h "
                       "window and an hour); the batches go on, a rerun collects them.")
    group.add_argument("--batch-max-requests", type=_count, default=DEFAULT_MAX_REQUESTS, metavar="N",
                       help=f"Most requests per batch input file (default {DEFAULT_MAX_REQUESTS}).")
    group.add_argument("--batch-max-bytes", type=_count, default=DEFAULT_MAX_BYTES, metavar="BYTES",
                       help=f"Largest batch input file (default {DEFAULT_MAX_BYTES}).")
    group.add_argument("--cancel-on-stop", action="store_true",
                       help="Ctrl-C / SIGTERM also cancels the live batches (default: they go on; a rerun "
                       "collects them).")


def batch_options_from_args(args: argparse.Namespace) -> BatchOptions | None:
    """The :class:`BatchOptions` of ``--api batch``; ``None`` for sync."""
    if getattr(args, "api", "sync") != "batch":
        return None
    from imagegen_provider.engine.batch import BatchOptions

    return BatchOptions(wait=not args.no_wait, poll_interval=args.poll_interval, timeout=args.batch_timeout,
                        max_requests=args.batch_max_requests, max_bytes=args.batch_max_bytes,
                        cancel_on_stop=args.cancel_on_stop)

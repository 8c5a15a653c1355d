"""``imagegen``: the engine and the bundled gateway from the command line, without Airflow."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
from typing import Any

from imagegen_provider import __version__
from imagegen_provider.cli_batch import add_batch_arguments, batch_options_from_args

ENV_API_KEY = "IMAGEGEN_API_KEY"

#: Exit codes of ``imagegen run``: 0 all done, 1 some images failed or not attempted, 2 the run could not
#: start (nothing was sent), 3 the output refused a write (the run stopped; see the error line), and
#: 128 + signal number after SIGINT (130) or SIGTERM (143).
EXIT_INCOMPLETE, EXIT_USAGE, EXIT_OUTPUT = 1, 2, 3
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _rows(text: str) -> tuple[int, int | None]:
    start, _, stop = text.partition(":")
    try:
        first, last = int(start or 0), (int(stop) if stop else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows takes START:STOP (e.g. 0:1000), not {text!r}") from None
    if first < 0 or (last is not None and last <= first):
        raise argparse.ArgumentTypeError(f"--rows START:STOP needs 0 <= START < STOP, not {text!r}")
    return first, last


def _number(*, minimum: float, inclusive: bool, kind: type = float) -> Any:
    """An argparse type: a finite number at or above (``inclusive``) or above ``minimum``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, not {text!r}")
        return value

    return parse


def _json_object(text: str) -> dict[str, Any]:
    """A JSON object given inline or as ``@path``. The text is never echoed back: it holds credentials."""
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]!r}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON (line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, not a {type(value).__name__}")
    return value


def _add_storage_arguments(parser: argparse.ArgumentParser, *, output: bool = True, prompts: bool = True) -> None:
    storage = parser.add_argument_group(
        "storage",
        "fsspec options of the stores (credentials, endpoints), as JSON or @file.json; without them fsspec's "
        "usual environment variables and config files apply. Never printed or logged; prefer @file.json or the "
        "environment for secrets, since a command line is visible to other users of the machine.",
    )
    if output:
        storage.add_argument(
            "--storage-options", type=_json_object, metavar="JSON",
            help='Options of the output\'s filesystem, e.g. \'{"connection_string": "..."}\' for az://, '
            '\'{"profile": "data"}\' for s3://.',
        )
    if prompts:
        storage.add_argument(
            "--prompts-storage-options", type=_json_object, metavar="JSON",
            help="Options of the prompt table's filesystem (default: the output's, when both use the same protocol).",
        )


def _storage_options(args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(prompts, output) storage options; the prompt table shares the output's when on the same protocol."""
    from fsspec.core import split_protocol

    output = getattr(args, "storage_options", None)
    prompts = getattr(args, "prompts_storage_options", None)
    output_url = getattr(args, "output", None)
    if prompts is None and output is not None and output_url is not None and getattr(args, "prompts", None):
        same = (split_protocol(str(args.prompts))[0] or "file") == (split_protocol(str(output_url))[0] or "file")
        prompts = output if same else None
    return prompts, output


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", help="Parquet prompt table: a path or any fsspec URL (s3://, gs://, memory://).")
    parser.add_argument("output", help="Output folder: images/, metadata/, metadata.parquet, run_summary.json.")
    from imagegen_provider.transport.settings import add_client_arguments

    # Every client setting, declared once in ClientSettings (the same ones a connection's extras set).
    add_client_arguments(parser.add_argument_group("gateway"))
    request = parser.add_argument_group("request")
    # --model is a client setting (the gateway group): the default model of every request.
    request.add_argument("--size")
    request.add_argument("--quality")
    request.add_argument("--style")
    request.add_argument("--response-format", choices=["url", "b64_json"])
    request.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                         help="Any other request parameter, e.g. --param output_format='\"webp\"'.")
    batch = parser.add_argument_group("batch")
    batch.add_argument("--images-per-prompt", type=_number(minimum=1, inclusive=True, kind=int), default=1)
    batch.add_argument("--seed", type=int, default=0, help="Base seed (default 0).")
    batch.add_argument("--prompt-column", default="prompt")
    batch.add_argument("--id-column", default="id")
    batch.add_argument("--rows", type=_rows, help="Only rows START:STOP of the table (a shard).")
    batch.add_argument("--max-cost", type=_number(minimum=0, inclusive=True),
                       help="Stop before spending more than this many USD.")
    batch.add_argument("--dry-run", action="store_true", help="Count images and estimate cost; call nothing.")
    batch.add_argument("--no-finalize", action="store_true", help="Skip writing metadata.parquet (for shards).")
    batch.add_argument("--progress-interval", type=_number(minimum=0, inclusive=False), default=10.0)
    batch.add_argument("--flush-rows", type=_number(minimum=1, inclusive=True, kind=int), default=1000,
                       help="Metadata rows per Parquet part (default 1000).")
    batch.add_argument("--json", action="store_true", help="Print the summary as JSON only.")


def _params(items: list[str]) -> dict[str, Any]:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--param takes KEY=JSON, not {item!r}")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def _run_config(args: argparse.Namespace, settings: Any) -> Any:
    from imagegen_provider.engine.runner import RunConfig

    defaults = _params(args.param)
    for name in ("model", "size", "quality", "style", "response_format"):
        if getattr(args, name) is not None:
            defaults[name] = getattr(args, name)
    start, stop = args.rows or (0, None)
    prompts_options, output_options = _storage_options(args)
    return RunConfig(
        prompts_storage_options=prompts_options,
        output_storage_options=output_options,
        prompts=args.prompts,
        output=args.output,
        request_defaults=defaults,
        prompt_column=args.prompt_column,
        id_column=args.id_column,
        images_per_prompt=args.images_per_prompt,
        base_seed=args.seed,
        row_start=start,
        row_stop=stop,
        max_cost_usd=args.max_cost,
        dry_run=args.dry_run,
        prices=settings.prices,
        price_as=dict(settings.price_as or {}),
        # The bundled gateway charges play money: rows say so.
        simulated=not args.base_url,
        progress_interval=args.progress_interval,
        flush_rows=args.flush_rows,
    )


def _client_settings(args: argparse.Namespace) -> Any:
    from imagegen_provider.engine.preflight import check_client_settings
    from imagegen_provider.transport.settings import ClientSettings

    settings = ClientSettings.from_cli_args(
        args, api_key=os.environ.get(ENV_API_KEY) or ("local" if not args.base_url else None)
    )
    check_client_settings(settings)
    return settings


async def _generate(config: Any, settings: Any, received: list[int], batch: Any = None) -> Any:
    """Run the batch; SIGINT/SIGTERM ask the runner to stop (no new request, in-flight ones wound down).
    ``batch``: the :class:`BatchOptions` of ``--api batch`` (``None``: sync)."""
    from imagegen_provider.connect import open_client
    from imagegen_provider.engine.batch import make_runner

    if config.dry_run:
        return await make_runner(config, client=None, batch=batch).run()
    loop = asyncio.get_running_loop()
    async with open_client(settings) as client:
        runner = make_runner(config, client=client, batch=batch)

        def on_signal(number: int) -> None:
            received.append(number)
            runner.request_stop(signal.Signals(number).name)

        for number in _STOP_SIGNALS:
            loop.add_signal_handler(number, on_signal, number)
        try:
            return await runner.run()
        finally:
            for number in _STOP_SIGNALS:
                loop.remove_signal_handler(number)


async def _run(args: argparse.Namespace, received: list[int] | None = None) -> dict[str, Any]:
    from imagegen_provider.engine.finalize import finalize_output

    received = [] if received is None else received
    settings = _client_settings(args)
    config = _run_config(args, settings)
    summary = await _generate(config, settings, received, batch_options_from_args(args))
    result: dict[str, Any] = {"run": summary.to_dict()}
    if getattr(args, "no_wait", False):
        result["no_wait"] = True
    if not args.no_finalize and not args.dry_run and not received:
        report = await asyncio.to_thread(
            finalize_output,
            args.output,
            prompts=args.prompts,
            prompt_column=args.prompt_column,
            id_column=args.id_column,
            images_per_prompt=args.images_per_prompt,
            row_start=config.row_start,
            row_stop=config.row_stop,
            output_storage_options=config.output_storage_options,
            prompts_storage_options=config.prompts_storage_options,
        )
        result["dataset"] = report.brief()
    return result


def _print_summary(result: dict[str, Any]) -> None:
    run = result["run"]
    print(f"run {run['run_id']}: {run['succeeded']} succeeded, {run['failed']} failed, "
          f"{run['skipped_existing']} already done, {run['not_attempted']} not attempted "
          f"of {run['total_images']} images in {run['duration_s']:.1f}s")
    if run["dry_run"]:
        print(f"dry run: estimated cost ${run['estimated_cost_usd']:.4f} "
              f"({run['unpriced_images']} images without a known price)")
    else:
        print(f"cost ${run['cost_usd']:.4f}")
    if run.get("pending_batches"):
        print(f"batches still processing: {', '.join(run['pending_batches'])} (rerun the same command to collect)")
    elif run["stopped_reason"]:
        print(f"stopped: {run['stopped_reason']}")
    if run["failures_by_type"]:
        print("failures: " + ", ".join(f"{k}={v}" for k, v in run["failures_by_type"].items()))
    print(f"images:   {run['output_uri']}/images")
    print(f"metadata: {run['metadata_uri']}")
    if "dataset" in result:
        print(f"dataset:  {result['dataset']['dataset_uri']}")


def _exit_code(result: dict[str, Any]) -> int:
    run = result["run"]
    if run["dry_run"] or (run.get("pending_batches") and not run["failed"] and result.get("no_wait")):
        return 0  # --no-wait did what it was asked: submitted, nothing failed
    return 0 if run["failed"] == 0 and run["not_attempted"] == 0 and not run["stopped_reason"] else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from imagegen_provider.engine.lease import LeaseHeldError
    from imagegen_provider.engine.runner import OutputWriteError
    from imagegen_provider.transport.client import quiet_request_logs
    from imagegen_provider.wire.errors import ImageGenError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    received: list[int] = []
    try:
        with quiet_request_logs():
            result = asyncio.run(_run(args, received))
    except OutputWriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    except (ImageGenError, ValueError, FileNotFoundError, LeaseHeldError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if received:
        run = result["run"]
        print(
            f"stopped by {signal.Signals(received[0]).name}: {run['succeeded']} stored, {run['failed']} failed, "
            f"{run['not_attempted']} not attempted, cost ${run['cost_usd']:.4f}; metadata flushed, rerun to resume",
            file=sys.stderr,
        )
        return 128 + received[0]
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_summary(result)
    return _exit_code(result)


def _cmd_gateway(args: argparse.Namespace) -> int:
    from imagegen_gateway.config import config_from_args
    from imagegen_gateway.server import run_gateway

    run_gateway(config_from_args(args), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _cmd_finalize(args: argparse.Namespace) -> int:
    from imagegen_provider.engine.finalize import LiveShardError, finalize_output

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start, stop = args.rows or (0, None)
    prompts_options, output_options = _storage_options(args)
    try:
        report = finalize_output(
            args.output,
            output_storage_options=output_options,
            prompts_storage_options=prompts_options,
            prompts=args.prompts,
            prompt_column=args.prompt_column,
            id_column=args.id_column,
            images_per_prompt=args.images_per_prompt,
            row_start=start,
            row_stop=stop,
            verify=args.verify,
            contact_sheet=not args.no_contact_sheet,
        )
    except (ValueError, FileNotFoundError, LiveShardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.brief(), indent=2))
    return 0 if report.complete else 1


def _cmd_contact_sheet(args: argparse.Namespace) -> int:
    from imagegen_provider.engine.contact_sheet import write_contact_sheet

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pages = write_contact_sheet(args.output, max_pages=args.max_pages)
    print("\n".join(pages) if pages else f"nothing on record in {args.output}")
    return 0 if pages else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from imagegen_provider.engine.shards import plan_shards

    try:
        shards = plan_shards(
            args.prompts,
            shard_size=args.shard_size,
            max_shards=args.max_shards,
            prompt_column=args.prompt_column,
            id_column=args.id_column,
            storage_options=args.prompts_storage_options,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(shards))
    return 0


def _add_column_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-column", default="prompt", help="Column holding the prompts (default prompt).")
    parser.add_argument("--id-column", default="id", help="Column holding the prompt ids (default id).")


def build_parser() -> argparse.ArgumentParser:
    from imagegen_gateway.config import add_gateway_arguments

    # allow_abbrev=False: an unknown option must be an error, not a prefix of another (--api batch would be
    # read as --api-key batch).
    parser = argparse.ArgumentParser(
        prog="imagegen", description="Image datasets from Parquet prompt tables.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="Generate images for a prompt table (exit 0 only if all succeeded).", allow_abbrev=False,
        epilog="Exit codes: 0 all images stored; 1 some failed or were not attempted; 2 the run could not start "
        "(nothing was sent); 3 the output refused a write (the run stopped); 130/143 stopped by SIGINT/SIGTERM.",
    )
    _add_run_arguments(run)
    add_batch_arguments(run)
    _add_storage_arguments(run)
    run.set_defaults(func=_cmd_run)

    gateway = commands.add_parser(
        "gateway",
        allow_abbrev=False,
        help="Serve the bundled OpenAI-compatible gateway (openai /v1, indoxhub /api/v1, router /router/v1).",
        description="The bundled local gateway: deterministic images, configurable latency, limits and faults. "
        "With no options it accepts any API key and injects no faults.",
    )
    add_gateway_arguments(gateway)
    gateway.set_defaults(func=_cmd_gateway)

    finalize = commands.add_parser(
        "finalize", help="Compact metadata into metadata.parquet and check completeness.", allow_abbrev=False
    )
    finalize.add_argument("output")
    finalize.add_argument("--prompts", help="The prompt table, to list missing images.")
    finalize.add_argument("--images-per-prompt", type=int, default=1)
    finalize.add_argument("--rows", type=_rows, help="Check only rows START:STOP of the table (a shard).")
    finalize.add_argument("--verify", action="store_true", help="Also compare every image's sha256 with its record.")
    finalize.add_argument("--no-contact-sheet", action="store_true", help="Do not write contact_sheet.png.")
    _add_column_arguments(finalize)
    _add_storage_arguments(finalize)
    finalize.set_defaults(func=_cmd_finalize)

    sheet = commands.add_parser("contact-sheet", help="Write contact_sheet.png: every image as a captioned thumbnail.")
    sheet.add_argument("output")
    sheet.add_argument("--max-pages", type=int, help="At most this many pages of 64 images (default: all).")
    sheet.set_defaults(func=_cmd_contact_sheet)

    plan = commands.add_parser(
        "plan", help="Print shard descriptors (row ranges) of a prompt table as JSON.", allow_abbrev=False
    )
    plan.add_argument("prompts")
    plan.add_argument("--shard-size", type=int, default=1000)
    plan.add_argument("--max-shards", type=int, default=1024)
    _add_column_arguments(plan)
    _add_storage_arguments(plan, output=False)
    plan.set_defaults(func=_cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

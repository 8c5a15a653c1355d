"""``imagegen``: the engine and the bundled gateway from the command line, without Airflow."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from imagegen_provider import __version__

ENV_API_KEY = "IMAGEGEN_API_KEY"


def _rows(text: str) -> tuple[int, int | None]:
    start, _, stop = text.partition(":")
    try:
        return int(start or 0), (int(stop) if stop else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows takes START:STOP (e.g. 0:1000), not {text!r}") from None


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
    batch.add_argument("--images-per-prompt", type=int, default=1)
    batch.add_argument("--seed", type=int, default=0, help="Base seed (default 0).")
    batch.add_argument("--prompt-column", default="prompt")
    batch.add_argument("--id-column", default="id")
    batch.add_argument("--rows", type=_rows, help="Only rows START:STOP of the table (a shard).")
    batch.add_argument("--max-cost", type=float, help="Stop before spending more than this many USD.")
    batch.add_argument("--dry-run", action="store_true", help="Count images and estimate cost; call nothing.")
    batch.add_argument("--no-finalize", action="store_true", help="Skip writing metadata.parquet (for shards).")
    batch.add_argument("--progress-interval", type=float, default=10.0)
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


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen_provider.connect import open_client
    from imagegen_provider.engine.finalize import finalize_output
    from imagegen_provider.engine.runner import BatchRunner, RunConfig
    from imagegen_provider.transport.settings import ClientSettings

    defaults = _params(args.param)
    for name in ("model", "size", "quality", "style", "response_format"):
        if getattr(args, name) is not None:
            defaults[name] = getattr(args, name)
    start, stop = args.rows or (0, None)
    config = RunConfig(
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
        progress_interval=args.progress_interval,
    )
    settings = ClientSettings.from_cli_args(
        args, api_key=os.environ.get(ENV_API_KEY) or ("local" if not args.base_url else None)
    )
    if args.dry_run:
        summary = await BatchRunner(config, client=None).run()
    else:
        async with open_client(settings) as client:
            summary = await BatchRunner(config, client=client).run()
    result: dict[str, Any] = {"run": summary.to_dict()}
    if not args.no_finalize and not args.dry_run:
        report = await asyncio.to_thread(
            finalize_output,
            args.output,
            prompts=args.prompts,
            prompt_column=args.prompt_column,
            id_column=args.id_column,
            images_per_prompt=args.images_per_prompt,
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
    if run["stopped_reason"]:
        print(f"stopped: {run['stopped_reason']}")
    if run["failures_by_type"]:
        print("failures: " + ", ".join(f"{k}={v}" for k, v in run["failures_by_type"].items()))
    print(f"images:   {run['output_uri']}/images")
    print(f"metadata: {run['metadata_uri']}")
    if "dataset" in result:
        print(f"dataset:  {result['dataset']['dataset_uri']}")


def _exit_code(result: dict[str, Any]) -> int:
    run = result["run"]
    if run["dry_run"]:
        return 0
    return 0 if run["failed"] == 0 and run["not_attempted"] == 0 and not run["stopped_reason"] else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from imagegen_provider.transport.client import quiet_request_logs
    from imagegen_provider.wire.errors import ImageGenError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with quiet_request_logs():
            result = asyncio.run(_run(args))
    except (ImageGenError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_summary(result)
    return _exit_code(result)


def _cmd_gateway(args: argparse.Namespace) -> int:
    from imagegen_provider.gateway.config import config_from_args
    from imagegen_provider.gateway.server import run_gateway

    run_gateway(config_from_args(args), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _cmd_finalize(args: argparse.Namespace) -> int:
    from imagegen_provider.engine.finalize import finalize_output

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = finalize_output(
            args.output,
            prompts=args.prompts,
            prompt_column=args.prompt_column,
            id_column=args.id_column,
            images_per_prompt=args.images_per_prompt,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.brief(), indent=2))
    return 0 if report.complete else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from imagegen_provider.engine.shards import plan_shards

    try:
        shards = plan_shards(
            args.prompts,
            shard_size=args.shard_size,
            max_shards=args.max_shards,
            prompt_column=args.prompt_column,
            id_column=args.id_column,
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
    from imagegen_provider.gateway.config import add_gateway_arguments

    parser = argparse.ArgumentParser(prog="imagegen", description="Image datasets from Parquet prompt tables.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="Generate images for a prompt table (exit 0 only if all succeeded).")
    _add_run_arguments(run)
    run.set_defaults(func=_cmd_run)

    gateway = commands.add_parser(
        "gateway",
        help="Serve the bundled OpenAI-compatible gateway (openai /v1, indoxhub /api/v1, router /router/v1).",
        description="The bundled local gateway: deterministic images, configurable latency, limits and faults. "
        "With no options it accepts any API key and injects no faults.",
    )
    add_gateway_arguments(gateway)
    gateway.set_defaults(func=_cmd_gateway)

    finalize = commands.add_parser("finalize", help="Compact metadata into metadata.parquet and check completeness.")
    finalize.add_argument("output")
    finalize.add_argument("--prompts", help="The prompt table, to list missing images.")
    finalize.add_argument("--images-per-prompt", type=int, default=1)
    _add_column_arguments(finalize)
    finalize.set_defaults(func=_cmd_finalize)

    plan = commands.add_parser("plan", help="Print shard descriptors (row ranges) of a prompt table as JSON.")
    plan.add_argument("prompts")
    plan.add_argument("--shard-size", type=int, default=1000)
    plan.add_argument("--max-shards", type=int, default=1024)
    _add_column_arguments(plan)
    plan.set_defaults(func=_cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

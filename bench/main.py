"""``python -m bench [--quick] [--out DIR] [--cases a,b,...]``.

Exit status: 0 when every selected case ran (whatever the figures: targets are reported, never asserted);
1 when the benchmark itself broke (an exception, a client that crashed or produced no images); 130 when
interrupted. Every process started is stopped before exiting.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import report
from bench.cases import CASES, FULL, LIMITER_SHAPES, OPT_IN, QUICK, SHAPE_ROW_GROUPS, TARGETS, Ctx, with_overrides
from bench.machine import describe
from bench.procs import REGISTRY, BenchError, install_signal_handlers

RESULTS = Path(__file__).resolve().parent / "results"
#: The full run's folder is committed (the README links it); a quick run must not overwrite it.
DEFAULT_OUT = {False: RESULTS / "latest", True: RESULTS / "quick"}
def _cases(text: str | None) -> list[str]:
    if not text:
        return [c for c in CASES if c not in OPT_IN]
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    return [c for c in CASES if c in chosen]


def _shape_rows(text: str) -> tuple[str, ...]:
    chosen = tuple(c.strip() for c in text.split(",") if c.strip())
    known = (*SHAPE_ROW_GROUPS, *LIMITER_SHAPES)
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI size: N=300 per client, 1k vs 10k prompts for memory, no peers in the overhead "
                             "case, and the clients of a case run side by side (under 3 minutes on 2 cores).")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Results folder (default {DEFAULT_OUT[False]}, or {DEFAULT_OUT[True]} with --quick).")
    parser.add_argument("--cases", type=_cases, default=None,
                        help=f"Comma-separated subset of: {', '.join(CASES)} (default: all but {', '.join(sorted(OPT_IN))}).")
    parser.add_argument("--rpm", type=int, help="Override the gateway limit R of the rate-limited cases.")
    parser.add_argument("--n", type=int, help="Override N, requests per client in the rate-limited cases.")
    parser.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                        help="Run the clients of a case side by side, each with its own gateway "
                             "(default: on with --quick, off otherwise).")
    parser.add_argument("--shape-rows", type=_shape_rows, default=None,
                        help="limiter_shapes: the rows to run, comma-separated row groups "
                             f"({', '.join(SHAPE_ROW_GROUPS)}) and/or shapes ({', '.join(LIMITER_SHAPES)}); a kind "
                             "not named means all of it (default: every row). E.g. openai,litellm,proxy.")
    parser.add_argument("--keep-work", action="store_true", help="Keep the generated images and metadata.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cases = args.cases or [c for c in CASES if c not in OPT_IN]
    params = with_overrides(QUICK if args.quick else FULL, rpm=args.rpm, n=args.n, parallel=args.parallel,
                            shape_rows=args.shape_rows)
    out: Path = (args.out or DEFAULT_OUT[args.quick]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir()
    work = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    install_signal_handlers()
    results: dict[str, Any] = {
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": describe(),
        "params": {**params.__dict__, "memory_sizes": list(params.memory_sizes)},
        "targets": {k: {"op": op, "value": v, "description": d} for k, (op, v, d) in TARGETS.items()},
        "cases": {},
        "errors": [],
    }
    ctx = Ctx(params=params, out=out, work=work, log=log)
    exit_code = 0

    def run_case(name: str) -> None:
        nonlocal exit_code
        log(f"case {name}")
        case_started = time.monotonic()
        try:
            results["cases"][name] = CASES[name](ctx)
            results["cases"][name]["case_wall_s"] = round(time.monotonic() - case_started, 1)
            log(f"case {name} done in {time.monotonic() - case_started:.0f}s")
        except Exception as exc:
            exit_code = 1
            message = f"{name}: {type(exc).__name__}: {exc}"
            results["cases"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            results["errors"].append(message)
            log(f"case {name} BROKE: {message}")
            if not isinstance(exc, BenchError):
                traceback.print_exc()

    def save() -> None:
        results["total_wall_s"] = round(time.monotonic() - started, 1)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    try:
        log(f"{'quick' if params.quick else 'full'} benchmark: cases {', '.join(cases)}; R={params.rpm}/min, "
            f"N={params.n}, concurrency {params.concurrency}; results → {out}")
        for name in cases:
            run_case(name)
            REGISTRY.stop_all()
            save()
        seen = sorted({c.get("code_fingerprint") for case in results["cases"].values()
                        for c in case.get("clients", {}).values() if c.get("code_fingerprint")})
        results["code_fingerprints"] = seen
        if len(seen) > 1:
            warning = (f"the package's source changed during the run ({len(seen)} versions: {', '.join(seen)}); "
                       "see code_fingerprint per client: figures from different versions are not comparable")
            results.setdefault("warnings", []).append(warning)
            log(f"WARNING: {warning}")
        try:
            if report.plot(results, out / "requests_per_minute.png"):
                results["plot"] = str(out / "requests_per_minute.png")
        except Exception as exc:
            exit_code = 1
            results["errors"].append(f"plot: {type(exc).__name__}: {exc}")
        save()
        (out / "results.md").write_text(report.markdown(results))
        print()
        print(report.markdown(results))
        log(f"done in {time.monotonic() - started:.0f}s; exit {exit_code}; {out / 'results.md'}")
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        results["errors"].append("interrupted")
        exit_code = 130
        save()
    finally:
        REGISTRY.stop_all()
        if args.keep_work:
            log(f"work files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return exit_code

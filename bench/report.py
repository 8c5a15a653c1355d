"""``results.md`` (a table per case, targets beside the figures) and ``requests_per_minute.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import metrics
from bench.cases import TARGETS
from bench.storage import markdown as storage_markdown
from bench.verify import markdown as verify_markdown


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _s(value: float | None) -> str:
    """Seconds and other magnitudes: one decimal."""
    return _f(None if value is None else float(value), 1)


def _mb(value: float | None) -> str:
    return _f(None if value is None else float(value), 0)


def _t(record: dict[str, Any], name: str) -> str:
    target = record.get("targets", {}).get(name)
    return f"{target['status']} ({target['target']})" if target else ""


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _f(c) for c in row) + " |" for row in rows]
    return lines


def _gw(r: dict[str, Any]) -> str:
    g = r.get("gateway_cpu") or {}
    text = f"{_f(g.get('mean_core_share'), 2)} / {_f(g.get('max_1s_core_share'), 2)}"
    return text + (" **SATURATED**" if r.get("gateway_saturated") else "")


def _ratios(case: dict[str, Any]) -> list[str]:
    rows = [[pair, _f(v["utilisation"], 2), _f(v["wall_s"], 2), _f(v["cpu_s"], 2), _f(v["peak_rss_mb"], 2),
             _f(v["http_429"], 2)] for pair, v in case.get("ratios", {}).items()]
    if not rows:
        return []
    return ["", "Ratios, ours ÷ peer (utilisation: higher is better; the rest: lower is better):", "",
            *_table(["pair", "utilisation", "wall time", "CPU s", "peak RSS", "429s"], rows)]


def _rate_table(case: dict[str, Any], *, hidden: bool = False) -> list[str]:
    header = ["client", "util (gateway timeline)", "util (N / wall)", "429s", "429 share", "retries",
              "failed", "wall s", "CPU s (user+sys)", "peak RSS MB", "gateway CPU mean/max-1s"]
    if hidden:
        header[3:3] = ["converged after s", "10-s windows ≥ 0.9·R"]
    header.append("targets")
    rows = []
    for r in case["clients"].values():
        util = r["utilisation"]
        row = [r["label"], _f(util["utilisation"]),
               _f(r.get("wall_utilisation", r.get("wall_utilisation_incl_startup"))),
               str(r["http_429"]), _pct(r["share_429"]), str(r["retries"]), str(r.get("failed", 0)), _s(r["wall_s"]),
               _s(r["cpu_s"]), _mb(r["peak_rss_mb"]), _gw(r)]
        if hidden:
            conv = r.get("convergence", {})
            row[3:3] = [_s(conv.get("converged_after_s")) if conv.get("converged_after_s") is not None else "never",
                        _pct(conv.get("windows_ok_share"))]
        row.append(", ".join(x for x in (_t(r, "utilisation"), _t(r, "share_429")) if x))
        rows.append(row)
    return _table(header, rows)


def _shape_row(name: str, r: dict[str, Any], rows: int | None = None) -> list[str]:
    minutes = r.get("whole_minutes") or []
    delivered = r.get("images_delivered", r.get("succeeded"))
    of = r.get("rows") or r.get("n") or rows or "?"
    target = " ".join(f"{key} {t['status']}" for key, t in r.get("targets", {}).items()) or "–"
    span = r.get("utilisation", {}).get("utilisation")
    return [name, str(r.get("shape", "–")), str(r.get("workers", 1)), _f(r.get("throughput_over_r")),
            " / ".join(str(m) for m in minutes) or "–", _f(span), _pct(r.get("share_429")), f"{delivered} / {of}",
            _s(r.get("wall_s")), target]


def limiter_shapes_markdown(case: dict[str, Any]) -> list[str]:
    """One table: our engine's rows, the peers' rows beside them, and the run through a LiteLLM proxy."""
    rows = [_shape_row(f"imagegen engine ({key})", r, case.get("rows_per_run"))
            for key, r in case.get("runs", {}).items()]
    rows += [_shape_row(r.get("label", key), r) for key, r in case.get("peers", {}).items()]
    proxy = case.get("proxy")
    if proxy and "skipped" not in proxy:
        rows.append(_shape_row(proxy["label"], proxy))
    lines = _table(["row", "shape", "processes", "throughput/R (whole minutes)", "accepted per whole minute",
                    "accepted/min ÷ R, first to last accepted second", "429 share", "images delivered", "wall s", "target"], rows)
    lines += ["", f"R = {case.get('rpm')}/min. Targets for our engine: {case.get('targets') or 'see the proxy row'}."]
    if case.get("peers_note"):
        lines += ["", case["peers_note"] + " A run shorter than a whole calendar minute has no whole-minute "
                      "figure; its rate over its accepted span is beside it."]
    if proxy and "skipped" in proxy:
        lines += ["", f"LiteLLM proxy row skipped: {proxy['skipped']}."]
    elif proxy:
        lines += ["", f"Proxy row: {proxy['cost_filled']} of {proxy['metadata_rows']} image rows have a cost "
                      f"(sources {proxy['cost_sources']}); the proxy used {proxy['proxy_cpu_core_share']} of a core; "
                      f"its 429s are counted from its access log ({proxy['gateway_429']} reached the gateway)."]
    if case.get("engine_skipped"):
        lines += ["", f"Engine rows skipped: {case['engine_skipped']}."]
    measured = [*case.get("peers", {}).values(), *([proxy] if proxy and "skipped" not in proxy else [])]
    loads = [r.get("machine_load", {}).get("other_processes_cores") for r in measured]
    loads = [x for x in loads if x is not None]
    if loads:
        lines += ["", f"Other processes on the machine used up to {max(loads):.2f} cores during the peer and proxy "
                      "rows."]
    return lines


def markdown(results: dict[str, Any]) -> str:
    meta, params = results["machine"], results["params"]
    lines = [
        "# imagegen benchmark results",
        "",
        f"Mode: **{'quick' if params['quick'] else 'full'}**; run took {results.get('total_wall_s', 0):.0f} s "
        f"({results.get('started_at')}). Command: `{results.get('command')}`.",
        "",
        f"Machine: {meta['cpu_model']}, {meta['cpu_count_logical']} logical CPUs, {meta['ram_gb']} GB RAM, "
        f"{meta['os']}; Python {meta['python']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["packages"].items() if v) + f"; {meta.get('redis_server') or ''}.",
        "",
        f"Code: commit `{(meta['git']['commit'] or '?')[:12]}` ({meta['git'].get('commit_subject') or ''}), "
        f"uncommitted imagegen_provider diff `{meta['git']['imagegen_provider_uncommitted_diff_sha256']}`; "
        f"source fingerprint(s) seen by the clients: {', '.join(results.get('code_fingerprints') or ['?'])} "
        "(the package is under active development). "
        f"Load average at start: {meta['load_average_at_start']}.",
        "",
        "Each client runs in its own subprocess (CPU = its user+sys seconds, peak RSS = its max RSS, both from "
        "`wait4`) against its own gateway process. Utilisation = accepted 200s per minute ÷ R, from the gateway's "
        "per-second timeline (first to last accepted second), and N ÷ the client's own work time. "
        "`gateway CPU` is the share of one core the gateway used (≥ 0.85 mean is flagged as saturated). "
        "`machine load` notes how many cores other processes on the machine were using meanwhile.",
        "",
        "Targets: " + "; ".join(f"{text}" for _, _, text in TARGETS.values()) + ". A target is a goal, never an "
        "assertion: MISS does not fail the run.",
    ]
    for warning in results.get("warnings", []):
        lines += ["", f"**WARNING:** {warning}."]
    cases = results["cases"]
    for name, case in cases.items():
        lines += ["", f"## {name}", ""]
        if "error" in case:
            lines += [f"**The case broke:** `{case['error']}`"]
            continue
        if "skipped" in case:
            lines += [f"Skipped: {case['skipped']}"]
            continue
        lines += [case["description"], ""]
        if name in ("announced", "hidden"):
            lines += _rate_table(case, hidden=name == "hidden") + _ratios(case)
        elif name == "scaleout":
            lines += _rate_table(case)
            r = case["clients"]["scaleout"]
            lines += ["", "Workers:", "", *_table(
                ["worker", "succeeded", "failed", "run s", "process wall s", "CPU s", "peak RSS MB"],
                [[str(w["worker"]), str(w["succeeded"]), str(w["failed"]), _s(w["run_duration_s"]),
                  _s(w["process_wall_s"]), _s(w["cpu_s"]), _mb(w["peak_rss_mb"])] for w in r["workers"]])]
        elif name == "storage":
            lines += storage_markdown(case)
        elif name == "verify":
            lines += verify_markdown(case)
        elif name == "limiter_shapes":
            lines += limiter_shapes_markdown(case)
        elif name == "faults":
            lines += _table(
                ["client", "completion", "attempts/image", "retries", "charged images", "images kept",
                 "duplicate paid", "dropped conns", "502s", "failures", "wall s", "CPU s", "peak RSS MB",
                 "gateway CPU mean/max-1s"],
                [[r["label"], _pct(r["completion"]), _f(r["attempts_per_image"]), str(r["retries"]),
                  str(r["charged_images"]), str(r["images_kept"]), str(r["duplicate_paid_images"]),
                  str(r["dropped_connections"]), str(r["by_status"].get("502", 0)), str(r["failures"] or "–"),
                  _s(r["wall_s"]), _s(r["cpu_s"]), _mb(r["peak_rss_mb"]), _gw(r)] for r in case["clients"].values()],
            ) + _ratios(case)
        elif name == "overhead":
            base = case["baseline_cpu_ms_per_image"]
            rows = []
            for r in case["clients"].values():
                avg = r["work_cpu_ms_per_image"]
                marginal = r.get("marginal_cpu_ms_per_image")
                rows.append([r["label"], _f(avg, 2), _f(marginal, 2),
                             _f((marginal or avg) / base, 1) if base else "–", _s(r["cpu_s"]), _s(r["wall_s"]),
                             _mb(r["peak_rss_mb"]), _gw(r) if r.get("gateway_cpu") else "–", _t(r, "overhead_ratio")])
            lines += _table(["client", "CPU ms / image (average over run)", "CPU ms / image (marginal)",
                             "÷ baseline", "process CPU s", "wall s", "peak RSS MB", "gateway CPU mean/max-1s",
                             "target"], rows)
            lines += ["", f"Engine: **{case['engine_marginal_cpu_ms_per_image']} ms** of CPU per image (marginal) vs "
                          f"**{base} ms** for the bare baseline = **{case['engine_ratio_to_baseline']}×**; "
                          f"{case['engine_overhead_ms_per_image_over_baseline']} ms per image over the baseline, plus "
                          f"{case['engine_fixed_cpu_s_per_run']} s of fixed CPU per run."]
            parse = case.get("json_parse_ms_per_image")
            if parse and base:
                lines += ["", f"Parsing the {case['b64_chars']:,}-character JSON body alone (orjson) costs **{parse} ms** "
                              f"per image, {round(parse / base, 2)}× the bare baseline: any client that receives the image "
                              f"as JSON is at ≥ {round((base + parse) / base, 2)}× before it has read a byte from the "
                              f"socket."]
            if case.get("baseline_stdlib_cpu_ms_per_image"):
                lines += ["", f"The engine decodes base64 with pybase64, and so does the bare baseline the target is "
                              f"judged on. With the stdlib's decoder, as a hand-written script would do it, the bare "
                              f"baseline costs **{case['baseline_stdlib_cpu_ms_per_image']} ms** per image: the whole "
                              f"engine path is **{case['engine_ratio_to_stdlib_baseline']}×** that."]
        elif name == "memory":
            rows = [[r["label"], f"{r['n']:,}", _mb(r["peak_rss_mb"]), _s(r["cpu_s"]), _f(r["work_cpu_ms_per_image"], 2),
                     _s(r["images_per_s"]), _s(r["wall_s"]), _gw(r), _t(r, "memory_ratio")]
                    for r in case["clients"].values()]
            lines += _table(["run", "prompts", "peak RSS MB", "CPU s", "CPU ms / image", "images/s", "wall s",
                             "gateway CPU mean/max-1s", "target"], rows)
            lines += ["", f"Peak RSS ratio (large ÷ small): **{case['rss_ratio']}**."]
            if case.get("note"):
                lines += ["", f"Note: {case['note']}."]
        elif name == "batch":
            rows = [[key, str(r["succeeded"]), _mb(r["peak_rss_mb"]), f"${r['cost_per_image']}", _s(r["wall_s"]),
                     _s(r["cpu_s"]), str(r.get("batch_lines_charged_twice"))] for key, r in case["clients"].items()]
            lines += _table(["run", "images", "peak RSS MB", "cost / image", "wall s", "CPU s", "charged twice"], rows)
            lines += ["", f"Peak RSS ratio (large ÷ small batch): **{case['rss_ratio']}** "
                          f"{_t(case, 'batch_memory_ratio')}; cost per image batch ÷ sync: **{case['cost_ratio']}** "
                          f"{_t(case, 'batch_cost_ratio')}."]
        loads = [r.get("machine_load", {}).get("other_processes_cores") for r in case.get("clients", {}).values()]
        loads = [x for x in loads if x is not None]
        if loads:
            text = f"Other processes on the machine used up to {max(loads):.2f} cores during this case"
            if max(loads) > 0.5:
                text = f"**Contended:** {text[0].lower()}{text[1:]}; CPU-starved clients lose rate-limit slots"
            lines += ["", text + "."]
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in results["errors"]]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    """Accepted requests/min over time per client (10-s rolling), announced and hidden cases side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("announced", "hidden") if "clients" in results["cases"].get(name, {})]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], panels, strict=True):
        case = results["cases"][name]
        rpm = case["rpm"]
        for r in case["clients"].values():
            tl = metrics.timeline(r["timeline"])
            if not tl:
                continue
            t0 = int(r["t0_unix"])
            points = metrics.rolling_per_minute(tl, t0, max(tl))
            ax.plot([s - r["t0_unix"] for s, _ in points], [v for _, v in points],
                    label=f"{r['label']} ({r['utilisation']['utilisation']:.2f}·R)", linewidth=1.4)
        ax.axhline(rpm, color="black", linestyle="--", linewidth=1, label=f"limit R = {rpm}/min")
        goal = 0.97 if name == "announced" else 0.90
        ax.axhline(goal * rpm, color="grey", linestyle=":", linewidth=1, label=f"target {goal:g}·R")
        ax.set_title(f"{name} limit (R = {rpm}/min)")
        ax.set_xlabel("seconds since the client started")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("accepted requests / min (10-s rolling)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

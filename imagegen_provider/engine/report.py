"""Cost report over one or more outputs: cost, images and failures by day, model, provider and DAG.

Costs come from the full metadata history (``metadata/``), not the dataset table: an image that failed on
one run and succeeded on the next may have been paid twice, and both payments belong in a cost report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from imagegen_provider.engine.metadata import distinct_attempts, read_metadata
from imagegen_provider.engine.schema import COST_SIMULATED, STATUS_SUCCEEDED
from imagegen_provider.engine.storage import StorageLocation

GROUP_COLUMNS = ["day", "model", "provider", "dag_id"]
#: Reported groups: ``api`` splits sync from batch spend (rows written before the column existed are sync).
REPORT_GROUPS = [*GROUP_COLUMNS, "api"]
_READ = ["run_id", "prompt_id", "image_index", "status", "model", "provider", "dag_id", "cost_usd", "cost_source",
         "finished_at", "api"]


def build_cost_report(
    outputs: Iterable[Any],
    storage_options: Mapping[str, Any] | None = None,
    *,
    include_simulated: bool = False,
) -> pd.DataFrame:
    """One row per (day, model, provider, dag_id, api): ``images_succeeded``, ``images_failed``, ``cost_usd``,
    ``unpriced_images`` (succeeded images without a known cost). Outputs with no metadata are skipped.

    :param include_simulated: count the bundled gateway's simulated charges (``cost_source = "simulated"``) as
        spend; by default they are left out, since no money was spent.
    """
    frames = []
    for output in outputs:
        location = StorageLocation.from_url(output, storage_options)
        table = read_metadata(location, _READ)
        if table.num_rows:
            frame = table.to_pandas()
            frame["output"] = location.uri
            frames.append(frame)
    columns = [*REPORT_GROUPS, "images_succeeded", "images_failed", "cost_usd", "unpriced_images"]
    if not frames:
        return pd.DataFrame(columns=columns)
    # One row per attempt. A paid image the output refused and a later run stored from the rescue folder has
    # two rows of the same attempt (failed, then succeeded, same cost): the success is the one that counts.
    rows = pd.concat(frames, ignore_index=True)
    rows = distinct_attempts(rows, key=("output",))
    if not include_simulated:
        rows = rows[rows["cost_source"] != COST_SIMULATED]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rows["day"] = rows["finished_at"].dt.strftime("%Y-%m-%d")
    for column in ("model", "provider", "dag_id"):
        rows[column] = rows[column].fillna("unknown")
    rows["api"] = rows["api"].fillna("sync")
    rows["succeeded"] = rows["status"] == STATUS_SUCCEEDED
    rows["unpriced"] = rows["succeeded"] & rows["cost_usd"].isna()
    report = (
        rows.groupby(REPORT_GROUPS, dropna=False)
        .agg(
            images_succeeded=("succeeded", "sum"),
            images_failed=("succeeded", lambda s: int((~s).sum())),
            cost_usd=("cost_usd", "sum"),
            unpriced_images=("unpriced", "sum"),
        )
        .reset_index()
    )
    report["cost_usd"] = report["cost_usd"].round(6)
    return report[columns]


def plot_cost_report(report: pd.DataFrame, path: str) -> str:
    """Bar chart of cost per (day, model, provider, DAG), failures annotated; written as PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(report) + 2), 4.5))
    if report.empty:
        ax.text(0.5, 0.5, "no metadata yet", ha="center", va="center")
        ax.set_axis_off()
    else:
        labels = [f"{r.day}\n{r.model}\n{r.provider}\n{r.dag_id}\n{getattr(r, 'api', 'sync')}"
                  for r in report.itertuples()]
        bars = ax.bar(range(len(report)), report["cost_usd"], color="#7b5ea7")
        for bar, row in zip(bars, report.itertuples(), strict=True):
            ax.annotate(
                f"{row.images_succeeded} ok / {row.images_failed} failed",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom", fontsize=8,
            )
        ax.set_xticks(range(len(report)), labels, fontsize=7)
        ax.set_ylabel("cost (USD)")
        ax.set_title("Image generation cost by day, model, provider, DAG and api (sync/batch)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

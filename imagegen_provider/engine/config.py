"""What a run is asked to do (:class:`RunConfig`) and what it did (:class:`RunSummary`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from imagegen_provider.engine.lease import DEFAULT_STALE_AFTER
from imagegen_provider.engine.preflight import PreflightError, check_positive, check_row_range
from imagegen_provider.wire.request import ImageRequest

_RESERVED_DEFAULTS = ("prompt", "seed", "n")


@dataclass(frozen=True)
class RunConfig:
    """What to generate and where.

    :param prompts: Parquet prompt table URL (any fsspec URL).
    :param output: output folder URL; images under ``images/``, metadata under ``metadata/``.
    :param request_defaults: request parameters for every row (model, size, quality, style, ...); per-row
        columns of the same name win.
    :param images_per_prompt: images per row, each its own request with its own seed.
    :param base_seed: seeds are derived from (base_seed, prompt id, image index).
    :param row_start: first row (inclusive) of the shard to run; ``row_stop`` is exclusive.
    :param max_cost_usd: stop dispatching before spent + in-flight estimates would exceed it.
    :param dry_run: count images and estimate cost without calling the gateway.
    :param prices: price overrides shaped like ``prices.json``.
    :param price_as: model names priced as another model (``{"gw-alias": "dall-e-3"}``).
    :param labels: ``dag_id``/``task_id`` recorded on every row (set by the operator).
    :param simulated: the client is the bundled gateway: rows say ``provider="local"``, ``cost_source="simulated"``.
    :param lease_stale_seconds: a writer lease without heartbeat for this long may be taken over.
    :param stop_grace_seconds: after :meth:`BatchRunner.request_stop`, requests in flight (probably paid
        already) get this long to finish and be recorded before they are cancelled.
    """

    prompts: Any
    output: Any
    request_defaults: Mapping[str, Any] = field(default_factory=dict)
    prompt_column: str = "prompt"
    id_column: str = "id"
    images_per_prompt: int = 1
    base_seed: int = 0
    row_start: int = 0
    row_stop: int | None = None
    shard: str | None = None
    max_cost_usd: float | None = None
    dry_run: bool = False
    prices: Mapping[str, Any] | None = None
    price_as: Mapping[str, str] = field(default_factory=dict)
    run_id: str | None = None
    labels: Mapping[str, str | None] = field(default_factory=dict)
    provider: str | None = None
    simulated: bool = False
    #: fsspec options (credentials): kept out of the repr, which tracebacks and debuggers print.
    prompts_storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    output_storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    progress_interval: float = 30.0
    flush_rows: int = 1000
    flush_seconds: float = 30.0
    #: Jobs dispatched ahead of the limiter; bounds memory (default: twice the client's in-flight cap).
    max_pending: int | None = None
    lease_stale_seconds: float = DEFAULT_STALE_AFTER
    stop_grace_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1:
            raise PreflightError("images_per_prompt must be at least 1")
        check_positive("max_cost_usd", self.max_cost_usd, allow_zero=True)
        check_row_range(self.row_start, self.row_stop)
        check_positive("flush_rows", self.flush_rows, optional=False)
        for name in ("progress_interval", "flush_seconds", "lease_stale_seconds"):
            check_positive(name, getattr(self, name), optional=False)
        check_positive("stop_grace_seconds", self.stop_grace_seconds, allow_zero=True, optional=False)
        check_positive("max_pending", self.max_pending)
        reserved = [k for k in _RESERVED_DEFAULTS if k in self.request_defaults]
        if reserved:
            raise ValueError(
                f"request_defaults may not set {', '.join(reserved)}: prompts come from the table, seeds from "
                "base_seed, and images_per_prompt replaces n"
            )
        # Fail now, naming the parameter, rather than on every row.
        ImageRequest.build(context="request defaults", prompt="x", **self.request_defaults)

    @property
    def shard_label(self) -> str:
        if self.shard:
            return re.sub(r"[^A-Za-z0-9._-]+", "_", self.shard)
        if self.row_start or self.row_stop is not None:
            stop = "end" if self.row_stop is None else f"{self.row_stop:09d}"
            return f"rows-{self.row_start:09d}-{stop}"
        return "all"


@dataclass
class RunSummary:
    """Small enough for XCom."""

    run_id: str
    output_uri: str
    metadata_uri: str
    shard: str
    total_images: int
    succeeded: int
    failed: int
    skipped_existing: int
    not_attempted: int
    cost_usd: float
    duration_s: float
    images_per_minute: float
    dry_run: bool = False
    estimated_cost_usd: float | None = None
    unpriced_images: int = 0
    stopped_reason: str | None = None
    failures_by_type: dict[str, int] = field(default_factory=dict)
    #: Images a gateway returned beyond those requested: paid for (their cost is on the rows), not stored.
    extra_images: int = 0
    #: Local file holding the paid rows the output refused (see :mod:`.rescue`), if any.
    rescue_ledger: str | None = None
    #: Batch API mode: batches this run left processing (a rerun collects them), and images it submitted.
    pending_batches: list[str] = field(default_factory=list)
    submitted_images: int = 0

    @property
    def complete(self) -> bool:
        return self.failed == 0 and self.not_attempted == 0 and self.stopped_reason is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

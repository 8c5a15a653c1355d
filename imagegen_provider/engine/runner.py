"""The batch engine: one prompt table (or one row range of it) → images + metadata rows.

Usable without Airflow: ``asyncio.run(BatchRunner(config, client=client).run())``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from imagegen_provider.engine.keys import image_file_name
from imagegen_provider.engine.logs import quiet_storage_logs
from imagegen_provider.engine.metadata import METADATA_DIR, MetadataSink
from imagegen_provider.engine.plan import ImageJob, images_of, jobs_for_row
from imagegen_provider.engine.pricing import NO_COST, Cost, PriceTable
from imagegen_provider.engine.progress import Progress
from imagegen_provider.engine.prompts import PromptColumns, PromptTable
from imagegen_provider.engine.resume import ResumeState
from imagegen_provider.engine.schema import STATUS_FAILED, STATUS_SUCCEEDED
from imagegen_provider.engine.storage import StorageLocation
from imagegen_provider.transport.client import ImageGenClient
from imagegen_provider.wire.errors import ImageGenError, redact
from imagegen_provider.wire.request import ImageRequest
from imagegen_provider.wire.result import GenerationResult

log = logging.getLogger(__name__)

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
    :param labels: ``dag_id``/``task_id`` recorded on every row (set by the operator).
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
    run_id: str | None = None
    labels: Mapping[str, str | None] = field(default_factory=dict)
    provider: str | None = None
    #: fsspec options (credentials): kept out of the repr, which tracebacks and debuggers print.
    prompts_storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    output_storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    progress_interval: float = 30.0
    flush_rows: int = 1000
    flush_seconds: float = 30.0
    #: Jobs dispatched ahead of the limiter; bounds memory (default: twice the client's in-flight cap).
    max_pending: int | None = None

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1:
            raise ValueError("images_per_prompt must be at least 1")
        if self.max_cost_usd is not None and self.max_cost_usd < 0:
            raise ValueError("max_cost_usd must not be negative")
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

    @property
    def complete(self) -> bool:
        return self.failed == 0 and self.not_attempted == 0 and self.stopped_reason is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _provider_of(request: ImageRequest | None, result: GenerationResult | None, fallback: str | None) -> str | None:
    if result is not None and result.provider:
        return result.provider
    if request is not None:
        if isinstance(request.provider, str):
            return request.provider
        if request.model and "/" in request.model:
            return request.model.split("/", 1)[0]
    return fallback


class BatchRunner:
    """Runs one :class:`RunConfig` with one client.

    :param client: the gateway client; may be ``None`` for a dry run.
    :param prices: price table (default: the packaged one, with ``config.prices`` overrides).
    """

    def __init__(self, config: RunConfig, *, client: ImageGenClient | None, prices: PriceTable | None = None) -> None:
        if client is None and not config.dry_run:
            raise ValueError("a client is required unless dry_run is set")
        self.config = config
        self.client = client
        self.prices = prices or PriceTable.load(config.prices)
        self.run_id = config.run_id or f"run-{_utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.output = StorageLocation.from_url(config.output, config.output_storage_options)
        self._stop_reason: str | None = None
        #: A fatal gateway error (401/402/403) was seen: jobs still queued are never sent.
        self._fatal = False
        self._spent = 0.0
        self._reserved = 0.0
        self._priced_images = 0
        #: Paid responses whose cost is unknown (no reported cost, no list price).
        self._unpriced_paid = 0
        self._warned_unenforceable = False
        self._slots: asyncio.Semaphore | None = None
        self._failures: dict[str, int] = {}
        self._warned_dropped: set[str] = set()

    # -- planning --------------------------------------------------------------------------------

    def _open_table(self) -> PromptTable:
        table = PromptTable.open(
            self.config.prompts,
            columns=PromptColumns(prompt=self.config.prompt_column, id=self.config.id_column),
            storage_options=self.config.prompts_storage_options,
        )
        table.check_unique_ids(self.config.row_start, self.config.row_stop)
        return table

    def _jobs(self, table: PromptTable) -> Iterator[ImageJob]:
        for row in table.rows(self.config.row_start, self.config.row_stop):
            yield from jobs_for_row(
                row,
                images_per_prompt=self.config.images_per_prompt,
                base_seed=self.config.base_seed,
                defaults=self.config.request_defaults,
            )

    def _count_images(self, table: PromptTable) -> int:
        if "n" not in table.override_columns:
            stop = table.num_rows if self.config.row_stop is None else min(self.config.row_stop, table.num_rows)
            return max(0, stop - self.config.row_start) * self.config.images_per_prompt
        return sum(images_of(row, self.config.images_per_prompt) for row in table.rows(self.config.row_start, self.config.row_stop))

    def _estimate(self, job: ImageJob) -> float | None:
        request = job.request
        if request is None:
            return 0.0
        return self.prices.estimate(
            model=request.model, size=request.size, quality=request.quality, prompt_chars=len(request.prompt)
        )

    # -- running ---------------------------------------------------------------------------------

    async def run(self) -> RunSummary:
        with quiet_storage_logs():
            return await self._run()

    async def _run(self) -> RunSummary:
        started = time.monotonic()
        table = await asyncio.to_thread(self._open_table)
        total = await asyncio.to_thread(self._count_images, table)
        if self.config.dry_run:
            return self._dry_run(table, total, started)

        sink = MetadataSink(
            self.output,
            writer=self.config.shard_label,
            flush_rows=self.config.flush_rows,
            flush_seconds=self.config.flush_seconds,
            # Rows hold their request slot until journaled: once every slot waits, the group is complete.
            group_rows=max(1, self.client.limiter.limits.max_in_flight) if self.client is not None else 64,
        )
        await asyncio.to_thread(sink.recover)
        state = await asyncio.to_thread(ResumeState.load, self.output)
        progress = Progress(total=total)
        log.info(
            "Run %s: %d images from %s (rows %s) → %s; %d already stored, %d failed before (retrying them)",
            self.run_id, total, self.config.prompts, self.config.shard_label, self.output.uri,
            len(state.done), state.failed,
        )
        reporter = asyncio.create_task(self._report(progress))
        try:
            await self._dispatch(table, state, sink, progress)
        finally:
            reporter.cancel()
            await sink.flush()
        progress.log()
        not_attempted = total - progress.done - progress.skipped
        if self._stop_reason:
            log.warning("Run %s stopped early: %s", self.run_id, self._stop_reason)
        return RunSummary(
            run_id=self.run_id,
            output_uri=self.output.uri,
            metadata_uri=self.output.uri_of(METADATA_DIR),
            shard=self.config.shard_label,
            total_images=total,
            succeeded=progress.succeeded,
            failed=progress.failed,
            skipped_existing=progress.skipped,
            not_attempted=not_attempted,
            cost_usd=round(progress.cost_usd, 6),
            duration_s=round(time.monotonic() - started, 3),
            images_per_minute=round(progress.done * 60.0 / max(1e-9, time.monotonic() - started), 2),
            stopped_reason=self._stop_reason,
            failures_by_type=dict(self._failures),
        )

    def _dry_run(self, table: PromptTable, total: int, started: float) -> RunSummary:
        estimated, unpriced, invalid = 0.0, 0, 0
        for job in self._jobs(table):
            if job.request is None:
                invalid += 1
                continue
            cost = self._estimate(job)
            if cost is None:
                unpriced += 1
            else:
                estimated += cost
        log.info(
            "Dry run: %d images, estimated $%.4f (%d without a known price, %d invalid rows)",
            total, estimated, unpriced, invalid,
        )
        return RunSummary(
            run_id=self.run_id, output_uri=self.output.uri, metadata_uri=self.output.uri_of(METADATA_DIR),
            shard=self.config.shard_label, total_images=total, succeeded=0, failed=invalid, skipped_existing=0,
            not_attempted=total - invalid, cost_usd=0.0, duration_s=round(time.monotonic() - started, 3),
            images_per_minute=0.0, dry_run=True, estimated_cost_usd=round(estimated, 6), unpriced_images=unpriced,
        )

    async def _report(self, progress: Progress) -> None:
        while True:
            await asyncio.sleep(self.config.progress_interval)
            progress.log()

    def _stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
            log.error("Stopping dispatch: %s", reason)

    def _average_cost(self) -> float:
        return self._spent / self._priced_images if self._priced_images else 0.0

    def _cost_known(self) -> bool:
        """Whether a finished, paid image has told us what images cost (or that nobody can tell)."""
        return self._priced_images > 0 or self._unpriced_paid > 0

    async def _dispatch(self, table: PromptTable, state: ResumeState, sink: MetadataSink, progress: Progress) -> None:
        assert self.client is not None
        in_flight = max(1, self.client.limiter.limits.max_in_flight)
        # Held from the request until the metadata row is journaled, so that at most ``in_flight`` images are
        # ever paid for but not yet on record (what a crash can cost), and so that jobs queued behind a fatal
        # error can be dropped before they are sent.
        self._slots = asyncio.Semaphore(in_flight)
        window = asyncio.Semaphore(self.config.max_pending or 2 * in_flight)
        tasks: set[asyncio.Task[None]] = set()
        budget = self.config.max_cost_usd
        try:
            for job in self._jobs(table):
                if job.key in state.done:
                    progress.skipped += 1
                    continue
                await window.acquire()
                if self._stop_reason:
                    window.release()
                    break
                estimate = self._estimate(job)
                if estimate is None and budget is not None and not self._cost_known() and tasks:
                    # No list price: the only estimate is what this run has paid per image, and nothing has
                    # been paid yet. Send one image at a time until a cost is known rather than a whole
                    # window at an estimate of $0.
                    while tasks and not self._cost_known():
                        await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
                    if self._stop_reason:
                        window.release()
                        break
                if estimate is None:
                    # Unknown list price: budget with what this run has actually paid per image so far.
                    estimate = self._average_cost()
                    if budget is not None and self._unpriced_paid and not self._priced_images:
                        self._warn_unenforceable(job)
                if budget is not None and self._spent + self._reserved + estimate > budget + 1e-12:
                    window.release()
                    self._stop(
                        f"budget: spent ${self._spent:.4f} + in flight ${self._reserved:.4f} + next "
                        f"${estimate:.4f} would exceed max_cost_usd=${budget:.4f}"
                    )
                    break
                self._reserved += estimate
                task = asyncio.create_task(self._process(job, estimate, sink, progress))
                tasks.add(task)
                task.add_done_callback(lambda t: (tasks.discard(t), window.release()))
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=False)

    def _warn_unenforceable(self, job: ImageJob) -> None:
        if not self._warned_unenforceable:
            self._warned_unenforceable = True
            log.warning(
                "max_cost_usd cannot be enforced for model %r: it has no list price and the gateway reports no "
                "cost (set prices in the connection or operator to budget it)",
                job.request.model if job.request is not None else None,
            )

    async def _process(self, job: ImageJob, estimate: float, sink: MetadataSink, progress: Progress) -> None:
        if job.request is None:
            self._reserved -= estimate
            row = self._base_row(job, _utcnow())
            self._fail(row, "InvalidRow", job.invalid or "invalid row", None, 0)
            await self._finish(row, NO_COST, sink, progress)
            return
        assert self._slots is not None
        async with self._slots:
            cost = NO_COST
            try:
                if self._fatal:
                    # Queued behind a fatal error (bad key, no balance): never sent, so "not attempted" and
                    # no metadata row; a rerun picks it up.
                    return
                row = self._base_row(job, _utcnow())
                cost = await self._generate(job, job.request, row)
            finally:
                self._reserved -= estimate
                if cost.usd is not None:
                    self._spent += cost.usd
                    self._priced_images += 1
            await self._finish(row, cost, sink, progress)

    async def _generate(self, job: ImageJob, request: ImageRequest, row: dict[str, Any]) -> Cost:
        """Generate and store one image, filling ``row``; returns what it cost (also when a later step failed)."""
        assert self.client is not None
        paid: GenerationResult | None = None
        try:
            generation = await self.client.generate(request)
            paid = generation.result
            self._record_response(row, request, paid, generation.attempts, generation.latency_ms)
            self._warn_dropped(generation.dropped_fields)
            image = generation.images[0]
            file_name = image_file_name(job.row.prompt_id, job.image_index, job.seed, image.info.extension)
            await asyncio.to_thread(self.output.write_bytes, file_name, image.data)
            row.update(
                status=STATUS_SUCCEEDED,
                image_uri=self.output.uri_of(file_name),
                file_name=file_name,
                image_sha256=image.info.sha256,
                image_bytes=image.info.num_bytes,
                image_width=image.info.width,
                image_height=image.info.height,
                image_format=image.info.format,
                revised_prompt=image.revised_prompt,
            )
        except ImageGenError as exc:
            # A download or verification failure comes after a successful (paid) response.
            paid = paid or exc.paid_result
            if exc.paid_result is not None:
                self._record_response(row, request, exc.paid_result, exc.attempts, None)
            self._fail(row, type(exc).__name__, str(exc), getattr(exc, "status", None), exc.attempts)
            if exc.fatal:
                self._fatal = True
                self._stop(f"fatal gateway error: {row['error_message']}")
        except Exception as exc:
            log.exception("Image %s/%d failed", job.row.prompt_id, job.image_index)
            self._fail(row, type(exc).__name__, f"{type(exc).__name__}: {exc}", None, row["attempts"])
        if paid is None:
            return NO_COST
        # Paid for even when a later step (download, write) failed: the cost record is kept.
        cost = self._cost_of(request, paid)
        row.update(cost_usd=cost.usd, cost_source=cost.source)
        if cost.usd is None:
            self._unpriced_paid += 1
        return cost

    def _record_response(
        self,
        row: dict[str, Any],
        request: ImageRequest,
        result: GenerationResult,
        attempts: int,
        latency_ms: float | None,
    ) -> None:
        row.update(
            attempts=attempts,
            request_id=result.request_id,
            latency_ms=round(latency_ms, 3) if latency_ms is not None else None,
            provider=_provider_of(request, result, self.config.provider),
            model=row["model"] or result.model,
            size=result.size or row["size"],
            quality=result.quality or row["quality"],
            input_tokens=result.usage.input_tokens,
            output_tokens=result.usage.output_tokens,
            total_tokens=result.usage.total_tokens,
        )

    async def _finish(self, row: dict[str, Any], cost: Cost, sink: MetadataSink, progress: Progress) -> None:
        row["finished_at"] = _utcnow()
        await sink.add(row)
        progress.record(row["status"] == STATUS_SUCCEEDED, cost.usd)

    def _cost_of(self, request: ImageRequest, result: GenerationResult) -> Cost:
        return self.prices.cost(
            model=request.model or result.model,
            size=result.size or request.size,
            quality=result.quality or request.quality,
            usage=result.usage,
            reported_usd=result.reported_cost_usd,
            images=len(result.images),
        )

    def _fail(self, row: dict[str, Any], error_type: str, message: str, status: int | None, attempts: int) -> None:
        secrets = [self.client.api_key_for_redaction] if self.client is not None else []
        row.update(
            status=STATUS_FAILED,
            error_type=error_type,
            error_message=redact(message, secrets)[:2000],
            http_status=status,
            attempts=attempts,
        )
        self._failures[error_type] = self._failures.get(error_type, 0) + 1

    def _warn_dropped(self, dropped: tuple[str, ...]) -> None:
        new = [f for f in dropped if f not in self._warned_dropped]
        if new:
            self._warned_dropped.update(new)
            log.warning(
                "The %s dialect does not send %s to this gateway; they are recorded in metadata only",
                self.client.dialect.name if self.client else "?", ", ".join(new),
            )

    def _base_row(self, job: ImageJob, started_at: datetime) -> dict[str, Any]:
        request = job.request
        params = request.public_params() if request is not None else {
            k: v for k, v in job.params.items() if k != "byok_api_key"
        }
        params["seed"] = job.seed
        return {
            "run_id": self.run_id,
            "prompt_id": job.row.prompt_id,
            "image_index": job.image_index,
            "prompt": job.row.prompt,
            "model": params.get("model"),
            "provider": _provider_of(request, None, self.config.provider),
            "dialect": self.client.dialect.name if self.client else None,
            "size": params.get("size"),
            "quality": params.get("quality"),
            "style": params.get("style"),
            "seed": job.seed,
            "params": json.dumps(params, sort_keys=True, default=str),
            "attempts": 0,
            "started_at": started_at,
            "dag_id": self.config.labels.get("dag_id"),
            "task_id": self.config.labels.get("task_id"),
            "shard": self.config.shard_label,
        }

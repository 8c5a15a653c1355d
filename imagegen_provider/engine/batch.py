"""Batch API mode: the same prompt table, seeds, output layout and metadata, at the batch price, without a
process waiting on every image.

:class:`BatchApiRunner` is the :class:`~imagegen_provider.engine.runner.BatchRunner` with the gateway call
replaced: a run goes through four named stages, each leaving the output resumable.

1. **reattach**: the manifests of this shard (``_batches/``) that are not collected yet are refreshed from the
   gateway; a submission that crashed between upload and creation is looked up by its token.
2. **collect** every batch that ended: its output and error files are streamed line by line, each image is
   verified, stored and recorded exactly as the sync path does (same file names, same row code), at the batch
   price. Lines that never ran (expired, cancelled) leave their image free for resubmission.
3. **submit** what is neither stored nor inside a live batch: request bodies are built by the dialect exactly
   as for sync (validated before anything is uploaded), cut into input files under ``max_requests`` and
   ``max_bytes``, budgeted at the batch price; each batch's manifest is written before the next one is built.
4. **wait** (unless ``wait=False``): poll the live batches, collect each as it ends, until all ended or
   ``timeout``. A stop request ends the wait (and cancels the batches when ``cancel_on_stop``).

Rerunning the same run later collects what ended and submits nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, replace
from functools import partial

import orjson

from imagegen_provider.engine.batch_plan import (
    COLLECTED,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_REQUESTS,
    ENDED_STATES,
    BatchManifest,
    Chunk,
    ManifestStore,
    custom_id,
    jsonl_line,
    parse_custom_id,
)
from imagegen_provider.engine.budget import BudgetExceeded, Reservation
from imagegen_provider.engine.config import RunConfig, RunSummary
from imagegen_provider.engine.lease import Lease
from imagegen_provider.engine.metadata import MetadataSink
from imagegen_provider.engine.plan import ImageJob
from imagegen_provider.engine.pricing import Cost, PriceTable
from imagegen_provider.engine.progress import Progress
from imagegen_provider.engine.prompts import PromptTable
from imagegen_provider.engine.resume import ResumeState
from imagegen_provider.engine.row import MetadataRow
from imagegen_provider.engine.runner import BatchRunner, ClientOutcome
from imagegen_provider.engine.schema import API_BATCH, COST_REPORTED
from imagegen_provider.transport.batch import ENDPOINT, BatchClient, BatchInfo, ResultLine
from imagegen_provider.transport.client import Generation, ImageGenClient, VerifiedImage
from imagegen_provider.wire.errors import ImageGenError, NotFoundError, error_from_response
from imagegen_provider.wire.normalize import normalize_response
from imagegen_provider.wire.request import ImageRequest
from imagegen_provider.wire.result import GeneratedImage, GenerationResult

log = logging.getLogger(__name__)

#: Waiting is bounded even when no timeout is given: the 24 h completion window and an hour of slack.
DEFAULT_BATCH_TIMEOUT = 25 * 3600.0
_UNFINISHED = ("batch_expired", "batch_cancelled")


@dataclass(frozen=True)
class BatchOptions:
    """How batch mode submits and waits.

    :param wait: wait for the batches and collect them; ``False`` submits (and collects what already ended)
        and returns, leaving the batches to a later run.
    :param poll_interval: seconds between two looks at the live batches.
    :param timeout: most seconds to wait for them (the run then ends; a rerun collects).
    :param max_requests: most lines per input file (OpenAI: 50,000).
    :param max_bytes: largest input file (OpenAI: 200 MB).
    :param cancel_on_stop: a stop request (on_kill, a signal) also cancels the live batches.
    """

    wait: bool = True
    poll_interval: float = 30.0
    timeout: float = DEFAULT_BATCH_TIMEOUT
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_bytes: int = DEFAULT_MAX_BYTES
    cancel_on_stop: bool = False

    def __post_init__(self) -> None:
        if not (self.poll_interval > 0 and self.timeout > 0):
            raise ValueError("poll_interval and timeout must be positive")
        if not (1 <= self.max_requests <= DEFAULT_MAX_REQUESTS) or self.max_bytes < 1024:
            raise ValueError(f"max_requests must be 1..{DEFAULT_MAX_REQUESTS}, max_bytes at least 1024")


class BatchApiRunner(BatchRunner):
    """Runs one :class:`RunConfig` through the gateway's Batch API (see the module docstring).

    :param client: an open client of the ``openai`` dialect (``None`` only for a dry run).
    :param batch: submission and waiting options.
    """

    def __init__(self, config: RunConfig, *, client: ImageGenClient | None, batch: BatchOptions | None = None,
                 prices: PriceTable | None = None) -> None:
        super().__init__(config, client=client, prices=prices)
        self.options = batch or BatchOptions()
        self.manifests = ManifestStore(self.output)
        self._batches: BatchClient | None = None
        self._live: list[BatchManifest] = []
        #: Images recorded by this run (stored or failed): not submitted again by it.
        self._recorded: set[tuple[str, int]] = set()
        self._done: set[tuple[str, int]] = set()
        self._reservations: dict[tuple[str, int], Reservation] = {}
        self._wake = asyncio.Event()
        self.submitted_images = 0

    async def run(self) -> RunSummary:
        """Like :meth:`BatchRunner.run`; a dialect without a batch API is refused before anything is sent.

        :raises BatchUnsupportedError: the client's dialect has no batch API.
        """
        if self.client is not None and not self.config.dry_run:
            self._batches = BatchClient(self.client)
        summary = await super().run()
        return summary

    # -- prices: the batch price everywhere the sync path prices ---------------------------------

    def _estimate(self, job: ImageJob) -> float | None:
        estimate = super()._estimate(job)
        if estimate is None or job.request is None:
            return estimate
        return estimate * self.prices.batch_fraction(job.request.model)

    def _response_cost(self, request: ImageRequest, result: GenerationResult) -> Cost:
        cost = super()._response_cost(request, result)
        if cost.usd is None or cost.source == COST_REPORTED:
            return cost  # a gateway that reports its charge reports the batch charge
        return self.prices.batch_cost(cost, request.model or result.model)

    def _new_row(self, job: ImageJob) -> MetadataRow:
        row = super()._new_row(job)
        row.api = API_BATCH
        return row

    def _stop(self, reason: str, *, halt: bool = False) -> None:
        super()._stop(reason, halt=halt)
        self._wake.set()

    # -- the run -----------------------------------------------------------------------------------

    async def _execute(self, table: PromptTable, total: int, lease: Lease) -> Progress:
        sink = MetadataSink(self.output, writer=self.config.shard_label, flush_rows=1 << 62, flush_seconds=1e18)
        await asyncio.to_thread(sink.recover)
        await self._import_rescued(sink)
        state = await asyncio.to_thread(ResumeState.load, self.output)
        self._done = set(state.done)
        progress = Progress(total=total)
        background = [
            asyncio.create_task(self._report(progress)),
            asyncio.create_task(lease.keep_alive(partial(self._stop, halt=True))),
        ]
        try:
            await self._stages(table, sink, progress)
        finally:
            for task in background:
                task.cancel()
            await self._flush(sink)
        progress.skipped = await asyncio.to_thread(self._count_skipped, table)
        progress.log()
        return progress

    async def _stages(self, table: PromptTable, sink: MetadataSink, progress: Progress) -> None:
        live = await self._reattach()
        for manifest in [m for m in live if m.state in ENDED_STATES]:
            await self._collect(manifest, table, sink, progress)
        self._live = [m for m in live if m.live]
        if not self._halted:
            await self._submit(table, sink, progress)
        if self.options.wait and not self._halted:
            await self._wait(table, sink, progress)
        elif self._halted and self.options.cancel_on_stop:
            await self._cancel_live()
        if self._live and self._stop_reason is None:
            self._stop_reason = self._pending_message()

    def _count_skipped(self, table: PromptTable) -> int:
        """Images of this shard stored before this run (another shard's images are not this run's)."""
        return sum(1 for job in self._jobs(table) if job.key in self._done and job.key not in self._recorded)

    def _pending_message(self) -> str:
        ids = ", ".join(m.batch_id or f"(submission {m.submission})" for m in self._live[:5])
        more = f" and {len(self._live) - 5} more" if len(self._live) > 5 else ""
        return (f"{len(self._live)} batch(es) still processing ({ids}{more}): rerun the same command to collect "
                "them; nothing is submitted twice")

    def _summary(self, progress: Progress, total: int, started: float) -> RunSummary:
        summary = super()._summary(progress, total, started)
        return replace(summary, pending_batches=self.pending_batches, submitted_images=self.submitted_images)

    @property
    def pending_batches(self) -> list[str]:
        """Ids of the batches this run left live (collected by a later run)."""
        return [m.batch_id for m in self._live if m.batch_id]

    # -- stage 1: reattach ---------------------------------------------------------------------------

    async def _reattach(self) -> list[BatchManifest]:
        """This shard's manifests not collected yet, refreshed from the gateway."""
        manifests = await asyncio.to_thread(self.manifests.load_all)
        mine = [m for m in manifests if m.shard == self.config.shard_label and m.state != COLLECTED]
        kept = []
        for manifest in mine:
            if manifest.batch_id is None and not await self._resolve_pending(manifest):
                continue
            await self._refresh(manifest)
            kept.append(manifest)
        if kept:
            log.info("Reattached to %d batch(es) of earlier runs: %s", len(kept),
                     ", ".join(f"{m.batch_id} ({m.state})" for m in kept))
        return kept

    async def _resolve_pending(self, manifest: BatchManifest) -> bool:
        """A submission a crash left between upload and confirmed creation: find its batch, or free its images."""
        assert self._batches is not None
        found = await self._batches.find_submission(manifest.submission)
        if found is None:
            log.warning("Submission %s was uploaded but never became a batch: its %d images are submitted again",
                        manifest.submission, len(manifest.images))
            await asyncio.to_thread(self.manifests.drop_pending, manifest)
            return False
        manifest.batch_id = found.id
        return True

    async def _refresh(self, manifest: BatchManifest) -> None:
        assert self._batches is not None and manifest.batch_id is not None
        try:
            info = await self._batches.retrieve(manifest.batch_id)
        except NotFoundError:
            # The gateway forgot the batch (a restarted local gateway): nothing of it can be collected.
            log.warning("Batch %s is unknown to the gateway: its images are submitted again", manifest.batch_id)
            manifest.state = "failed"
        else:
            self._apply_info(manifest, info)
        await self._save(manifest)

    def _apply_info(self, manifest: BatchManifest, info: BatchInfo) -> None:
        manifest.state = info.status
        manifest.output_file_id = info.output_file_id
        manifest.error_file_id = info.error_file_id
        manifest.request_counts = {"total": info.counts.total, "completed": info.counts.completed,
                                   "failed": info.counts.failed}
        if info.errors and info.status == "failed":
            log.error("Batch %s failed at the gateway: %s", info.id, "; ".join(info.errors))

    async def _save(self, manifest: BatchManifest) -> None:
        await asyncio.to_thread(self.manifests.save, manifest)

    # -- stage 2: collect ----------------------------------------------------------------------------

    async def _collect(self, manifest: BatchManifest, table: PromptTable, sink: MetadataSink,
                       progress: Progress) -> None:
        """Store and record every answer of an ended batch; mark its manifest collected."""
        assert self._batches is not None
        jobs = await asyncio.to_thread(self._jobs_for, table, manifest.keys())
        counts = {"stored": 0, "failed": 0, "unfinished": 0, "skipped": 0}
        for file_id in (manifest.output_file_id, manifest.error_file_id):
            if file_id is None:
                continue
            async for line in self._batches.result_lines(file_id):
                outcome = await self._collect_line(line, manifest, jobs, sink, progress)
                counts[outcome] += 1
                if self._storage_error is not None:
                    return  # not collected: the rerun collects it again (stored images are skipped)
        counts["unfinished"] += len(jobs)  # never answered (a failed or forgotten batch): free again
        manifest.state, manifest.collected = COLLECTED, counts
        await self._save(manifest)
        log.info("Collected batch %s: %d stored, %d failed, %d unfinished (submitted again)", manifest.batch_id,
                 counts["stored"], counts["failed"], counts["unfinished"])

    def _jobs_for(self, table: PromptTable, keys: set[tuple[str, int]]) -> dict[tuple[str, int], ImageJob]:
        return {job.key: job for job in self._jobs(table) if job.key in keys}

    async def _collect_line(self, line: ResultLine, manifest: BatchManifest, jobs: dict[tuple[str, int], ImageJob],
                            sink: MetadataSink, progress: Progress) -> str:
        try:
            prompt_id, index, _seed = parse_custom_id(line.custom_id)
        except ValueError:
            log.warning("Batch %s answered an unknown custom_id %.80r: ignored", manifest.batch_id, line.custom_id)
            return "skipped"
        job = jobs.pop((prompt_id, index), None)
        if job is None or job.request is None:
            return "skipped"  # not ours, or answered twice
        if line.status_code is None or line.error_code in _UNFINISHED:
            return "unfinished"
        if job.key in self._done:
            return "skipped"  # stored by an earlier collection of this batch (a crash before it was marked)
        row = self._new_row(job)
        row.batch_id = manifest.batch_id
        outcome = await self._outcome_of(line, job.request)
        reservation = self._reservations.pop(job.key, None) or Reservation(usd=0.0, estimate=self._estimate(job))
        cost = self._settle(job.request, outcome, reservation)
        self._apply_outcome(row, job.request, outcome, cost)
        row.latency_ms = None  # no exchange of its own: the batch's timing is not the image's
        unstored = None
        if outcome.error is None and outcome.generation is not None:
            unstored = await self._store(job, job.request, outcome.generation, row)
        await self._record(row, sink, progress)
        if unstored is not None:
            await asyncio.to_thread(self._rescue_image, row, *unstored)
        self._recorded.add(job.key)
        if row.succeeded:
            self._done.add(job.key)
            return "stored"
        return "failed"

    async def _outcome_of(self, line: ResultLine, request: ImageRequest) -> ClientOutcome:
        """A result line as the sync path's :class:`ClientOutcome`: same parsing, same image verification."""
        assert self.client is not None
        secrets = [self.client.api_key_for_redaction]
        if line.status_code != 200 or line.body is None:
            error: ImageGenError = error_from_response(line.status_code or 500, orjson.dumps(line.body or {}),
                                                       request_id=line.request_id, secrets=secrets)
            return ClientOutcome(None, (), 1, error)
        try:
            result = normalize_response(line.body, secrets=secrets)
        except ImageGenError as exc:
            # A 200 line was charged even when its body is unusable: on record as paid (priced from the list).
            paid = GenerationResult(images=[], request_id=line.request_id)
            return ClientOutcome(None, (paid,), 1, exc)
        try:
            images = [await self._verify(image, result, request) for image in result.images]
        except ImageGenError as exc:
            return ClientOutcome(None, (result,), 1, exc)  # paid, unusable
        generation = Generation(images=images, result=result, attempts=1, latency_ms=0.0, queued_ms=0.0)
        return ClientOutcome(generation, (result,), 1)

    async def _verify(self, image: GeneratedImage, result: GenerationResult, request: ImageRequest) -> VerifiedImage:
        """The client's own check of a sync answer's image (full decode, format, download of URL images under
        the address policy): a batch image is stored only if the sync path would have stored it."""
        assert self.client is not None
        return await self.client._verified(image, result, request)

    # -- stage 3: submit -----------------------------------------------------------------------------

    async def _submit(self, table: PromptTable, sink: MetadataSink, progress: Progress) -> None:
        """Build, upload and create batches for every image neither stored nor in a live batch."""
        busy = set().union(*(m.keys() for m in self._live)) if self._live else set()
        chunk = Chunk()
        for job in self._jobs(table):
            if job.key in self._done or job.key in busy or job.key in self._recorded:
                continue
            if job.request is None:
                await self._record_invalid(job, sink, progress)
                continue
            line, estimate = self._line_of(job, job.request)
            if not chunk.fits(line, max_requests=self.options.max_requests, max_bytes=self.options.max_bytes):
                await self._send(chunk)
                chunk = Chunk()
            if self._halted or not self._admit_batch(job, estimate):
                break
            chunk.add(line, (job.row.prompt_id, job.image_index, job.seed), estimate)
        if chunk.images and not self._halted:
            await self._send(chunk)
        chunk.file.close()

    def _line_of(self, job: ImageJob, request: ImageRequest) -> tuple[bytes, float | None]:
        assert self.client is not None
        wire = self.client.dialect.build_body(request, accepts_seed=self.client.accepts_seed)
        self._warn_dropped(wire.dropped)
        line = jsonl_line(custom_id(job.row.prompt_id, job.image_index, job.seed), wire.json, endpoint=ENDPOINT)
        if len(line) > self.options.max_bytes:
            raise ValueError(f"the request of {job.row.prompt_id!r} image {job.image_index} is larger than max_bytes")
        return line, self._estimate(job)

    def _admit_batch(self, job: ImageJob, estimate: float | None) -> bool:
        """Hold the image's batch price against ``max_cost_usd``; stop submitting when it does not fit."""
        if estimate is None and self.budget.limited:
            self._stop(f"max_cost_usd cannot be enforced: model {job.params.get('model')!r} has no price "
                       "(add it with prices / --prices, or map it with price_as / --price-as)")
            return False
        try:
            self._reservations[job.key] = self.budget.admit(estimate)
        except BudgetExceeded as exc:
            self._stop(str(exc))
            return False
        return True

    async def _record_invalid(self, job: ImageJob, sink: MetadataSink, progress: Progress) -> None:
        row = self._new_row(job)
        row.fail(error_type="InvalidRow", message=self._redact(job.invalid or "invalid row"))
        self._count_failure(row)
        await self._record(row, sink, progress)
        self._recorded.add(job.key)

    async def _send(self, chunk: Chunk) -> None:
        """Upload one input file, record its manifest, create its batch, record the batch id."""
        assert self._batches is not None
        manifest = BatchManifest(submission=uuid.uuid4().hex, run_id=self.run_id, shard=self.config.shard_label,
                                 input_file_id="", images=chunk.images, estimated_cost_usd=chunk.estimated_cost_usd)
        try:
            manifest.input_file_id = await self._batches.upload(chunk.rewound(), filename=f"{self.run_id}.jsonl")
        except ImageGenError as exc:
            self._refuse_chunk(chunk, f"upload refused: {exc}")
            return
        finally:
            chunk.file.close()
        if not await self._record_manifest(manifest, chunk):
            return
        try:
            info = await self._batches.create(input_file_id=manifest.input_file_id, submission=manifest.submission,
                                              metadata={"imagegen_run": self.run_id[:500],
                                                        "imagegen_shard": self.config.shard_label[:500]})
        except ImageGenError as exc:
            await asyncio.to_thread(self.manifests.drop_pending, manifest)
            self._refuse_chunk(chunk, f"batch creation refused: {exc}")
            return
        manifest.batch_id = info.id
        self._apply_info(manifest, info)
        self._live.append(manifest)
        self.submitted_images += len(chunk.images)
        await self._record_manifest(manifest, chunk)
        log.info("Submitted batch %s: %d images, %d bytes, estimated $%s", info.id, len(chunk.images), chunk.size,
                 "?" if chunk.estimated_cost_usd is None else f"{chunk.estimated_cost_usd:.4f}")

    async def _record_manifest(self, manifest: BatchManifest, chunk: Chunk) -> bool:
        """Write the manifest; when the output refuses it, nothing more is submitted (a batch must never run
        without a record of it)."""
        try:
            await self._save(manifest)
        except Exception as exc:
            self._storage_failed(f"batch manifest {manifest.name}", exc)
            if manifest.batch_id is None:
                self._release(chunk)
            return False
        return True

    def _refuse_chunk(self, chunk: Chunk, message: str) -> None:
        self._release(chunk)
        self._stop(self._redact(message), halt=True)

    def _release(self, chunk: Chunk) -> None:
        for prompt_id, index, _ in chunk.images:
            reservation = self._reservations.pop((prompt_id, index), None)
            if reservation is not None:
                self.budget.release(reservation)

    # -- stage 4: wait -------------------------------------------------------------------------------

    async def _wait(self, table: PromptTable, sink: MetadataSink, progress: Progress) -> None:
        deadline = time.monotonic() + self.options.timeout
        while self._live and not self._halted:
            for manifest in list(self._live):
                if not await self._look(manifest):
                    continue
                if manifest.state in ENDED_STATES:
                    self._live.remove(manifest)
                    await self._collect(manifest, table, sink, progress)
            if not self._live:
                break
            log.info("%s", self._batch_line())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._stop(f"batch_timeout: waited {self.options.timeout:g} s; {self._pending_message()}")
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(self.options.poll_interval, remaining))
        if self._halted and self.options.cancel_on_stop:
            await self._cancel_live()

    async def _look(self, manifest: BatchManifest) -> bool:
        """Refresh one live batch while waiting; a gateway that fails to answer is asked again at the next poll
        (the timeout bounds the wait), one that refuses the key stops the run."""
        try:
            await self._refresh(manifest)
        except ImageGenError as exc:
            message = self._redact(str(exc))
            if exc.fatal:
                self._stop(f"fatal gateway error while waiting for batch {manifest.batch_id}: {message}", halt=True)
            else:
                log.warning("Could not look at batch %s (%s); asking again in %g s", manifest.batch_id, message,
                            self.options.poll_interval)
            return False
        return True

    def _batch_line(self) -> str:
        counts = [m.request_counts for m in self._live]
        total = sum(c.get("total", 0) for c in counts)
        done = sum(c.get("completed", 0) for c in counts)
        failed = sum(c.get("failed", 0) for c in counts)
        states = ", ".join(sorted({m.state for m in self._live}))
        return f"batches: {len(self._live)} live ({states}) | {done + failed}/{total} requests done, {failed} failed"

    async def _cancel_live(self) -> None:
        """Ask the gateway to cancel every live batch; what they finished is collected by the next run."""
        assert self._batches is not None
        for manifest in self._live:
            if manifest.batch_id is None:
                continue
            try:
                info = await self._batches.cancel(manifest.batch_id)
            except ImageGenError as exc:
                log.error("Could not cancel batch %s: %s", manifest.batch_id, self._redact(str(exc)))
                continue
            self._apply_info(manifest, info)
            await self._save(manifest)
            log.warning("Cancelled batch %s (%s)", manifest.batch_id, info.status)


def make_runner(config: RunConfig, *, client: ImageGenClient | None, batch: BatchOptions | None) -> BatchRunner:
    """The sync runner, or the batch one when ``batch`` options are given (CLI and operator)."""
    if batch is None:
        return BatchRunner(config, client=client)
    return BatchApiRunner(config, client=client, batch=batch)

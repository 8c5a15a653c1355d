"""Airflow operators: generate an image dataset from a Parquet prompt table, and finalize a sharded one."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from airflow.sdk import Asset, BaseOperator

from imagegen_provider.engine.batch import BatchOptions, make_runner
from imagegen_provider.engine.finalize import DATASET_TABLE, FinalizeReport, finalize_output
from imagegen_provider.engine.runner import BatchRunner, RunConfig, RunSummary
from imagegen_provider.engine.shards import DEFAULT_MAX_SHARDS, plan_shards
from imagegen_provider.hooks._airflow import AirflowException, AirflowFailException
from imagegen_provider.hooks.image_generation import ImageGenerationHook
from imagegen_provider.hooks.storage import resolve_store
from imagegen_provider.operators._batch import MAX_DEFERRALS, BatchSettings, check_event
from imagegen_provider.operators.links import ImageOutputLink, RunSummaryLink
from imagegen_provider.transport.client import quiet_request_logs
from imagegen_provider.wire.errors import ImageGenError

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage
    from airflow.sdk import Context

    from imagegen_provider.operators.lineage import ImageGenerationRunFacet

log = logging.getLogger(__name__)

#: The runner's failure kind for a row that never became a request (null prompt, bad override): the row's own
#: fault, like a permanent error.
INVALID_ROW = "InvalidRow"

_REQUEST_FIELDS = ("model", "size", "quality", "style", "response_format")


def _error_classes() -> dict[str, type[ImageGenError]]:
    """Every ``ImageGenError`` subclass by name: the run summary counts failures by class name (it is XCom)."""
    found: dict[str, type[ImageGenError]] = {}
    pending: list[type[ImageGenError]] = [ImageGenError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.__name__, cls)
        pending.extend(cls.__subclasses__())
    return found


def is_permanent_failure(kind: str) -> bool:
    """Whether a failure kind is the row's own fault (a task retry would fail it again): the error class's
    ``permanent`` flag, or an invalid row of the prompt table."""
    if kind == INVALID_ROW:
        return True
    cls = _error_classes().get(kind)
    return cls is not None and cls.permanent


def is_fatal_failure(kind: str) -> bool:
    """Whether a failure kind stops the whole run (bad key, no balance, open circuit, storage)."""
    cls = _error_classes().get(kind)
    return cls is not None and cls.fatal


def metadata_asset_for(output_path: Any) -> Asset | None:
    """The Asset of the dataset table ``<output>/metadata.parquet``, or ``None`` when the path is templated.

    String work only: no filesystem is touched at DAG parse time.
    """
    text = str(output_path)
    if "{{" in text or "{%" in text:
        return None
    if "://" not in text:
        text = "file://" + os.path.abspath(text)
    else:
        # ``ObjectStoragePath("s3://bucket/x", conn_id="aws")`` prints as ``s3://aws@bucket/x``: the connection
        # id is how the task reaches the data, not part of the data's identity (nor of a consumer's Asset).
        parts = urlsplit(text)
        if "@" in parts.netloc:
            text = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return Asset(uri=text.rstrip("/") + "/" + DATASET_TABLE, name=f"imagegen:{text.rstrip('/')}")


def _with_outlet(asset: Asset | bool | None, kwargs: dict[str, Any]) -> Asset | None:
    """Declare ``asset`` as the task's outlet (unless the caller set outlets) and return it, or ``None``."""
    if not isinstance(asset, Asset):
        return None
    if not kwargs.get("outlets"):
        kwargs["outlets"] = [asset]
    return asset


#: Engine warnings about the configuration rather than about events (a dialect that cannot send the seed, a
#: budget that cannot be enforced): every shard of a run would repeat them word for word.
_CONFIGURATION_WARNINGS = frozenset({"_warn_dropped", "_warn_unenforceable"})


class _ConfigurationWarningsOncePerRun(logging.Filter):
    """Lets the first shard of a mapped task say it; the other shards log the same lines at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.funcName in _CONFIGURATION_WARNINGS:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"{record.msg} (as warned by the first shard)"
        return True


class _WritesDataset(BaseOperator):
    """What both operators share: finalize the output, announce the dataset Asset, describe their lineage and
    stop cleanly when Airflow kills the task."""

    output_path: Any
    prompts_path: Any
    output_conn_id: str | None = None
    prompts_conn_id: str | None = None
    #: fsspec options of the stores: credentials, so never templated (rendered fields are shown in the UI).
    output_storage_options: Mapping[str, Any] | None = None
    prompts_storage_options: Mapping[str, Any] | None = None
    prompt_column: str
    id_column: str
    images_per_prompt: int
    metadata_asset: Asset | None
    #: The running batch and its event loop, for ``on_kill`` (set while ``execute`` runs a batch).
    _runner: BatchRunner | None = None
    _killed: str | None = None

    @property
    def writes_dataset_table(self) -> bool:
        """Whether this task writes ``metadata.parquet`` (and ``run_summary.json``)."""
        return True

    def on_kill(self) -> None:
        """Airflow's SIGTERM (a user marking the task failed, a timeout, a scheduler shutdown): stop dispatching
        at once, cancel the requests in flight, flush the journal; the output stays resumable.

        Runs in a signal handler on the thread of the event loop: it only schedules the stop.
        """
        self._killed = "task killed by Airflow (on_kill)"
        runner = self._runner
        if runner is None:
            log.info("on_kill: no batch running")
            return
        runner.request_stop(self._killed)
        log.warning("on_kill: stopping the batch; nothing more is sent, a rerun resumes from %s", self.output_path)

    def _lineage(
        self, *, run_facet: ImageGenerationRunFacet | None = None, rows: int | None = None
    ) -> OperatorLineage[Any, Any]:
        from imagegen_provider.operators.lineage import operator_lineage

        return operator_lineage(
            prompts=self.prompts_path,
            output=self.output_path,
            metadata_table=DATASET_TABLE if self.writes_dataset_table else "metadata",
            run_facet=run_facet,
            rows_written=rows,
        )

    def get_openlineage_facets_on_start(self) -> OperatorLineage[Any, Any]:
        """OpenLineage (``apache-airflow-providers-openlineage``): the prompt table in; the images folder and
        the metadata table out."""
        return self._lineage()

    def __init__(
        self,
        *,
        output_conn_id: str | None = None,
        prompts_conn_id: str | None = None,
        output_storage_options: Mapping[str, Any] | None = None,
        prompts_storage_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # Both operators take these (documented on each). A BaseOperator itself, so that Airflow finds them
        # when it checks ``.partial()``/``.expand()`` arguments (it reads the operator ``__init__``s of the MRO).
        super().__init__(**kwargs)
        self.output_conn_id = output_conn_id
        self.prompts_conn_id = prompts_conn_id
        self.output_storage_options = dict(output_storage_options) if output_storage_options else None
        self.prompts_storage_options = dict(prompts_storage_options) if prompts_storage_options else None

    def _stores(self) -> tuple[tuple[Any, Mapping[str, Any] | None], tuple[Any, Mapping[str, Any] | None]]:
        """(prompts, storage options) and (output, storage options) as the engine takes them: through the
        stores' Airflow connections when given (see :mod:`imagegen_provider.hooks.storage`)."""
        prompts = (self.prompts_path, self.prompts_storage_options)
        if self.prompts_path is not None:
            prompts = resolve_store(
                self.prompts_path, conn_id=self.prompts_conn_id, storage_options=self.prompts_storage_options,
                role="prompts",
            )
        output = resolve_store(
            self.output_path, conn_id=self.output_conn_id, storage_options=self.output_storage_options,
            role="output",
        )
        return prompts, output

    def _finalize(self) -> FinalizeReport:
        (prompts, prompts_options), (output, output_options) = self._stores()
        return finalize_output(
            output,
            output_storage_options=output_options,
            prompts_storage_options=prompts_options,
            prompts=prompts,
            prompt_column=self.prompt_column,
            id_column=self.id_column,
            images_per_prompt=self.images_per_prompt,
        )

    def _emit_dataset_event(self, context: Context, **extra: Any) -> None:
        if self.metadata_asset is not None:
            context["outlet_events"][self.metadata_asset].extra = extra


class ImageGenerationOperator(_WritesDataset):
    """Generate one image per prompt (or ``images_per_prompt``) from a Parquet table into object storage.

    Images land under ``<output_path>/images/``, metadata rows under ``<output_path>/metadata/``; an
    unsharded run then writes the dataset table ``<output_path>/metadata.parquet``. A rerun (or a task
    retry) with the same output skips every image already stored and recorded as succeeded.

    :param prompts_path: Parquet prompt table: any fsspec URL, or an ``ObjectStoragePath``. (templated)
    :param output_path: output folder: any fsspec URL, or an ``ObjectStoragePath``. (templated)
    :param output_conn_id: an Airflow connection for the output's store (an ``aws`` connection for ``s3://``,
        ``adls`` for ``abfs://``/``az://``, ``google_cloud_platform`` for ``gs://``; needs the store's provider).
    :param prompts_conn_id: the same for the prompt table's store.
    :param output_storage_options: fsspec options of the output's store (alone, or on top of the connection).
        Not templated: they hold credentials.
    :param prompts_storage_options: the same for the prompt table's store.
    :param imagegen_conn_id: the ``imagegen`` connection.
    :param model: model name; default: the connection's ``model`` extra. (templated)
    :param size: e.g. ``1024x1024``. (templated)
    :param quality: e.g. ``standard``, ``hd``, ``low``, ``high``. (templated)
    :param style: ``vivid`` or ``natural`` (dall-e-3). (templated)
    :param response_format: ``url`` or ``b64_json``. (templated)
    :param request_params: any other request parameter (``output_format``, ``negative_prompt``, ...). (templated)
    :param images_per_prompt: images per row, each its own request and seed.
    :param seed: base seed; image seeds derive from (seed, prompt id, image index). (templated)
    :param prompt_column: prompt column name.
    :param id_column: id column name (a stable id is derived when the table has none).
    :param shard: a shard descriptor from :func:`plan_prompt_shards` (``{"start", "stop", "label"}``); use
        with ``.partial(...).expand(shard=...)``. Sharded runs do not finalize: add
        :class:`ImageDatasetFinalizeOperator` after the mapped task.
    :param finalize: write ``metadata.parquet`` and ``run_summary.json`` at the end (default: when unsharded).
    :param max_cost_usd: stop dispatching before this would be exceeded. (templated)
    :param dry_run: count images and estimate cost without calling the gateway.
    :param max_failed_fraction: fail the task (so that its retry resumes) when more than this fraction of the
        attempted images failed for reasons a retry can fix. Permanent failures (invalid rows,
        content-policy refusals) never fail the task.
    :param rate_limits: overrides of the connection's limits: ``requests_per_minute``,
        ``images_per_minute``, ``max_in_flight``, ``backend``.
    :param prices: price overrides, shaped like ``imagegen_provider/data/prices.json``.
    :param metadata_asset: the Asset emitted on success; default: derived from a non-templated
        ``output_path`` when this task finalizes (none for a shard). Pass ``False`` for none.
    :param progress_interval: seconds between progress lines.
    :param api: ``sync`` (default: one request per image) or ``batch``: the gateway's Batch API at the batch
        price (OpenAI: half), same output and metadata (plus ``api`` and ``batch_id``); see docs/batch.md.
    :param deferrable: batch only: release the worker while the gateway works (default ``True``; the task
        waits on its worker when the connection is the in-process bundled gateway, host ``local``).
    :param batch_poll_interval: seconds between two looks at the batches (triggerer or worker).
    :param batch_timeout: most seconds to wait for the batches; the task then fails and its retry collects.
    :param cancel_batches_on_kill: killing the task (on a worker, or deferred on Airflow 3.3+) cancels its
        batches; what they finished is collected by the next run.
    :param batch_max_requests: most requests per batch input file (OpenAI: 50,000).
    :param batch_max_bytes: largest batch input file (OpenAI: 200 MB).
    """

    template_fields: Sequence[str] = (
        "prompts_path",
        "output_path",
        "model",
        "size",
        "quality",
        "style",
        "response_format",
        "request_params",
        "seed",
        "max_cost_usd",
        "shard",
    )
    # BaseOperator declares it a plain class attribute, so no ClassVar here.
    template_fields_renderers = {"request_params": "json", "shard": "json"}  # noqa: RUF012
    ui_color = "#f0e4ff"
    operator_extra_links = (ImageOutputLink(), RunSummaryLink())

    def __init__(
        self,
        *,
        prompts_path: Any,
        output_path: Any,
        imagegen_conn_id: str = ImageGenerationHook.default_conn_name,
        model: str | None = None,
        size: str | None = None,
        quality: str | None = None,
        style: str | None = None,
        response_format: str | None = None,
        request_params: Mapping[str, Any] | None = None,
        images_per_prompt: int = 1,
        seed: int | str = 0,
        prompt_column: str = "prompt",
        id_column: str = "id",
        shard: Mapping[str, Any] | None = None,
        finalize: bool | None = None,
        max_cost_usd: float | str | None = None,
        dry_run: bool = False,
        max_failed_fraction: float = 0.0,
        rate_limits: Mapping[str, Any] | None = None,
        prices: Mapping[str, Any] | None = None,
        metadata_asset: Asset | bool | None = None,
        progress_interval: float = 30.0,
        **kwargs: Any,
    ) -> None:
        self.batch_settings = BatchSettings.pop_from(kwargs)  # api=, deferrable=, batch_*= (see the docstring)
        if metadata_asset is None:
            # Only a task that writes metadata.parquet announces it: a shard (which does not finalize) would
            # otherwise emit the dataset's Asset event once per mapped instance, before the dataset exists.
            writes_table = finalize if finalize is not None else shard is None
            metadata_asset = metadata_asset_for(output_path) if writes_table else None
        outlet = _with_outlet(metadata_asset, kwargs)
        super().__init__(**kwargs)
        self.metadata_asset = outlet
        self.prompts_path = prompts_path
        self.output_path = output_path
        self.imagegen_conn_id = imagegen_conn_id
        self.model = model
        self.size = size
        self.quality = quality
        self.style = style
        self.response_format = response_format
        # A Mapping is copied; anything else (an XComArg, a Jinja string rendered as a native object) is
        # resolved by template rendering before execute().
        self.request_params = dict(request_params) if isinstance(request_params, Mapping) else request_params or {}
        self.images_per_prompt = images_per_prompt
        self.seed = seed
        self.prompt_column = prompt_column
        self.id_column = id_column
        self.shard = shard
        self.finalize = finalize
        self.max_cost_usd = max_cost_usd
        # Not ``self.dry_run``: that would hide ``BaseOperator.dry_run()``.
        self.estimate_only = dry_run
        self.max_failed_fraction = max_failed_fraction
        self.rate_limits = dict(rate_limits or {})
        self.prices = prices
        self.progress_interval = progress_interval

    @cached_property
    def hook(self) -> ImageGenerationHook:
        return ImageGenerationHook(imagegen_conn_id=self.imagegen_conn_id)

    @property
    def writes_dataset_table(self) -> bool:
        return self.finalize if self.finalize is not None else self.shard is None

    def _request_defaults(self) -> dict[str, Any]:
        defaults = dict(self.request_params)
        for name in _REQUEST_FIELDS:
            value = getattr(self, name)
            if value is not None:
                defaults[name] = value
        if "model" not in defaults and self.hook.settings.model:
            defaults["model"] = self.hook.settings.model
        return defaults

    def _run_config(self, context: Context) -> RunConfig:
        shard = dict(self.shard or {})
        settings = self.hook.settings
        prices = {**(settings.prices or {}), **(self.prices or {})} or None
        (prompts, prompts_options), (output, output_options) = self._stores()
        return RunConfig(
            prompts=prompts,
            output=output,
            prompts_storage_options=prompts_options,
            output_storage_options=output_options,
            request_defaults=self._request_defaults(),
            prompt_column=self.prompt_column,
            id_column=self.id_column,
            images_per_prompt=self.images_per_prompt,
            base_seed=int(self.seed),
            row_start=int(shard.get("start", 0)),
            row_stop=int(shard["stop"]) if shard.get("stop") is not None else None,
            shard=shard.get("label"),
            max_cost_usd=float(self.max_cost_usd) if self.max_cost_usd not in (None, "") else None,
            dry_run=self.estimate_only,
            prices=prices,
            run_id=context["run_id"],
            labels={"dag_id": context["dag"].dag_id, "task_id": self.task_id},
            provider=settings.provider,
            progress_interval=self.progress_interval,
            price_as=dict(settings.price_as or {}),
            # The bundled gateway's images are placeholders and its charges simulated: label the rows so.
            simulated=settings.is_local,
        )

    def _batch_options(self) -> BatchOptions | None:
        """``None`` for sync; for batch, the worker waits only when the task does not defer."""
        if not self.batch_settings.batch:
            return None
        return self.batch_settings.options(wait=not self._defers())

    def _defers(self) -> bool:
        return self.batch_settings.defers(local_gateway=self.hook.settings.is_local)

    async def _run(self, config: RunConfig) -> RunSummary:
        if config.dry_run:
            return await make_runner(config, client=None, batch=self._batch_options()).run()
        async with self.hook.get_client(**self.rate_limits) as client:
            self._runner = make_runner(config, client=client, batch=self._batch_options())
            if self._killed:  # killed while the client was opening: send nothing
                raise asyncio.CancelledError
            return await self._runner.run()

    def _generate(self, context: Context) -> RunSummary:
        config = self._run_config(context)
        self.log.info(
            "Generating from %s into %s through %s",
            self.prompts_path, self.output_path, self.hook.settings.describe(),
        )
        repeat_filter = _ConfigurationWarningsOncePerRun()
        # A logger's filters see only its own records, not its children's: attach to the runner's logger.
        runner_log = logging.getLogger(BatchRunner.__module__)
        if getattr(context.get("ti"), "map_index", -1) > 0:
            runner_log.addFilter(repeat_filter)
        try:
            with quiet_request_logs():
                return asyncio.run(self._run(config))
        except asyncio.CancelledError:
            raise AirflowException(
                f"Image generation stopped: {self._killed or 'cancelled'}; a rerun resumes from {self.output_path}"
            ) from None
        finally:
            self._runner = None
            runner_log.removeFilter(repeat_filter)

    def _name_shard(self, context: Context) -> None:
        """Name a mapped shard in the UI by its rows ("rows 0-5000") rather than its map index, unless the DAG
        set a ``map_index_template``. Airflow renders the context's template after ``execute``; the context was
        built from the mapped task, before this shard's rows were known, hence the plain string set here."""
        if self.shard is not None and not context.get("map_index_template"):
            shard = dict(self.shard)
            stop = shard.get("stop")
            context["map_index_template"] = f"rows {shard.get('start', 0)}-{'end' if stop is None else stop}"

    def execute(self, context: Context) -> dict[str, Any]:
        self._name_shard(context)
        return self._complete(context, self._generate(context), deferrals=0)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None, deferrals: int = 0) -> Any:
        """Batch mode, back from the trigger: collect on this worker what the batches produced (and submit what
        expired or failed, deferring again), then finish as ``execute`` does."""
        check_event(event, self.output_path)
        self._name_shard(context)
        return self._complete(context, self._generate(context), deferrals=deferrals + 1)

    def _complete(self, context: Context, summary: RunSummary, *, deferrals: int) -> dict[str, Any]:
        if summary.pending_batches and self._defers() and not self._killed and deferrals < MAX_DEFERRALS:
            self.log.info("Deferring while %d batch(es) run: %s", len(summary.pending_batches),
                          ", ".join(summary.pending_batches))
            self.defer(trigger=self.batch_settings.trigger(self.imagegen_conn_id, summary.pending_batches),
                       method_name="execute_complete", kwargs={"deferrals": deferrals})
        self._summary = summary
        if summary.pending_batches and not self._killed:
            # Waited as long as allowed (or deferred too often): the batches go on; the retry collects them.
            raise AirflowException(f"{summary.stopped_reason}; a task retry collects them into {summary.output_uri}")
        if self._killed:
            # No dataset table and no Asset event for a batch cut short: the rerun finishes and announces it.
            raise AirflowException(
                f"Image generation stopped: {self._killed}; a rerun resumes from {summary.output_uri}"
            )
        result: dict[str, Any] = {"run": summary.to_dict()}
        report = self._finalize() if self.writes_dataset_table and not summary.dry_run else None
        if report is not None:
            result["dataset"] = report.brief()
        self._emit_dataset_event(
            context,
            output_uri=summary.output_uri,
            metadata_uri=summary.metadata_uri,
            dataset_uri=report.dataset_uri if report is not None else None,
            succeeded=summary.succeeded,
            cost_usd=summary.cost_usd,
        )
        self._raise_for(summary)
        return result

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage[Any, Any]:
        """OpenLineage: inputs and outputs as on start, plus the run's model, image counts and cost."""
        from imagegen_provider.operators.lineage import ImageGenerationRunFacet

        summary: RunSummary | None = getattr(self, "_summary", None)
        if summary is None:
            return self._lineage()
        facet = ImageGenerationRunFacet(
            model=self._model_for_lineage(),
            images_total=summary.total_images,
            images_succeeded=summary.succeeded,
            images_failed=summary.failed,
            images_skipped=summary.skipped_existing,
            cost_usd=summary.cost_usd,
            estimated_cost_usd=summary.estimated_cost_usd,
            simulated=self.hook.settings.is_local,
            dry_run=summary.dry_run,
            shard=summary.shard,
        )
        return self._lineage(run_facet=facet, rows=summary.succeeded)

    def _model_for_lineage(self) -> str | None:
        try:
            model = self._request_defaults().get("model")
        except Exception:  # lineage never fails a task: a broken connection was reported by execute already
            return self.model
        return str(model) if model is not None else None

    def _raise_for(self, summary: RunSummary) -> None:
        reason = summary.stopped_reason or ""
        fatal = [kind for kind in summary.failures_by_type if is_fatal_failure(kind)]
        if reason.startswith("fatal") or fatal:
            # A bad key or an empty balance: retrying the task cannot help.
            raise AirflowFailException(f"Image generation stopped: {reason or 'fatal ' + ', '.join(fatal)}")
        transient = sum(n for kind, n in summary.failures_by_type.items() if not is_permanent_failure(kind))
        attempted = summary.succeeded + summary.failed
        if attempted and transient / attempted > self.max_failed_fraction:
            raise AirflowException(
                f"{transient} of {attempted} images failed for reasons a retry can fix "
                f"({summary.failures_by_type}); a task retry resumes from {summary.output_uri}"
            )


class ImageDatasetFinalizeOperator(_WritesDataset):
    """After the mapped generation tasks: check completeness, compact the metadata into
    ``<output>/metadata.parquet`` (Hugging Face ``imagefolder`` layout), write ``run_summary.json`` and emit
    the dataset Asset.

    :param output_path: the output folder of the generation tasks. (templated)
    :param prompts_path: the prompt table, to know which images are expected. (templated)
    :param output_conn_id: an Airflow connection for the output's store (an ``aws`` connection for ``s3://``,
        ``adls`` for ``abfs://``/``az://``, ``google_cloud_platform`` for ``gs://``; needs the store's provider).
    :param prompts_conn_id: the same for the prompt table's store.
    :param output_storage_options: fsspec options of the output's store (alone, or on top of the connection).
        Not templated: they hold credentials.
    :param prompts_storage_options: the same for the prompt table's store.
    :param images_per_prompt: as given to the generation tasks.
    :param fail_if_incomplete: fail when an image is missing or failed (its rows are listed in the log).
    :param metadata_asset: the Asset emitted; default: derived from a non-templated ``output_path``.
    """

    template_fields: Sequence[str] = ("output_path", "prompts_path")
    operator_extra_links = (ImageOutputLink(), RunSummaryLink())

    def __init__(
        self,
        *,
        output_path: Any,
        prompts_path: Any = None,
        images_per_prompt: int = 1,
        prompt_column: str = "prompt",
        id_column: str = "id",
        fail_if_incomplete: bool = False,
        metadata_asset: Asset | bool | None = None,
        **kwargs: Any,
    ) -> None:
        if metadata_asset is None:
            metadata_asset = metadata_asset_for(output_path)
        outlet = _with_outlet(metadata_asset, kwargs)
        super().__init__(**kwargs)
        self.metadata_asset = outlet
        self.output_path = output_path
        self.prompts_path = prompts_path
        self.images_per_prompt = images_per_prompt
        self.prompt_column = prompt_column
        self.id_column = id_column
        self.fail_if_incomplete = fail_if_incomplete

    def execute(self, context: Context) -> dict[str, Any]:
        report = self._finalize()
        self._report = report
        for prompt_id, index, error_type in report.failed_images[:50]:
            self.log.warning("Failed image: %s #%s (%s)", prompt_id, index, error_type)
        for prompt_id, index in report.missing_images[:50]:
            self.log.warning("Missing image: %s #%s", prompt_id, index)
        self._emit_dataset_event(
            context,
            output_uri=report.output_uri,
            dataset_uri=report.dataset_uri,
            succeeded=report.succeeded,
            cost_usd=report.total_cost_usd,
        )
        if self.fail_if_incomplete and not report.complete:
            raise AirflowException(
                f"Dataset incomplete: {report.failed} failed and {report.missing} missing images "
                f"(see {report.summary_uri})"
            )
        return {"dataset": report.brief()}

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage[Any, Any]:
        """OpenLineage: the prompt table in; the images and the dataset table out; the dataset's counts and
        cost (over every shard and run) as the run facet."""
        from imagegen_provider.operators.lineage import ImageGenerationRunFacet

        report: FinalizeReport | None = getattr(self, "_report", None)
        if report is None:
            return self._lineage()
        facet = ImageGenerationRunFacet(
            images_total=report.expected_images,
            images_succeeded=report.succeeded,
            images_failed=report.failed,
            cost_usd=report.total_cost_usd,
        )
        return self._lineage(run_facet=facet, rows=report.succeeded)


def plan_prompt_shards(
    prompts_path: Any,
    *,
    shard_size: int = 1000,
    max_shards: int = DEFAULT_MAX_SHARDS,
    prompt_column: str = "prompt",
    id_column: str = "id",
    prompts_conn_id: str | None = None,
    prompts_storage_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Shard descriptors for ``ImageGenerationOperator.partial(...).expand(shard=...)``, from the table's
    Parquet footer only. Call it from a ``@task``; keep ``max_shards`` at or under ``[core] max_map_length``.
    ``prompts_conn_id`` and ``prompts_storage_options`` reach the table's store as in the operators."""
    prompts, options = resolve_store(
        prompts_path, conn_id=prompts_conn_id, storage_options=prompts_storage_options, role="prompts"
    )
    return plan_shards(
        prompts,
        storage_options=options,
        shard_size=shard_size,
        max_shards=max_shards,
        prompt_column=prompt_column,
        id_column=id_column,
    )

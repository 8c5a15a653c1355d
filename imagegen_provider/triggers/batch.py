"""Deferrable waiting for Batch API batches: the worker slot is released while the gateway works.

:class:`BatchCompletionTrigger` runs in the triggerer. It polls ``GET /batches/{id}`` for every batch through the
hook's own async client (same connection, auth, timeouts and retries as the worker), logs their
``request_counts``, and fires once every batch has ended (completed, failed, expired or cancelled), or when
``timeout`` has passed. The operator's ``execute_complete`` then collects on a worker.

A user killing the deferred task (Airflow 3.3+ calls :meth:`BatchCompletionTrigger.on_kill`) cancels the
batches when ``cancel_on_kill`` is set; a triggerer restart does not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from imagegen_provider.transport.batch import BatchClient, BatchInfo
from imagegen_provider.wire.errors import ImageGenError, redact

#: Where a serialized trigger is found again by the triggerer.
_CLASSPATH = "imagegen_provider.triggers.batch.BatchCompletionTrigger"


def _event(payload: dict[str, Any]) -> TriggerEvent:
    return TriggerEvent(payload)  # type: ignore[no-untyped-call]


class BatchCompletionTrigger(BaseTrigger):
    """Fire when every batch in ``batch_ids`` has ended.

    :param imagegen_conn_id: the ``imagegen`` connection the batches were submitted through.
    :param batch_ids: the batches to watch.
    :param poll_interval: seconds between two looks.
    :param timeout: seconds to wait in all, counted from ``started_at``; then the event says ``timeout``.
    :param started_at: wall-clock start (kept across triggerer restarts); default: now.
    :param cancel_on_kill: cancel the batches when a user kills the deferred task.
    """

    def __init__(
        self,
        *,
        imagegen_conn_id: str,
        batch_ids: list[str],
        poll_interval: float = 60.0,
        timeout: float = 25 * 3600.0,
        started_at: float | None = None,
        cancel_on_kill: bool = True,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if not batch_ids:
            raise ValueError("BatchCompletionTrigger needs at least one batch id")
        if not (poll_interval > 0 and timeout > 0):
            raise ValueError("poll_interval and timeout must be positive")
        self.imagegen_conn_id = imagegen_conn_id
        self.batch_ids = list(batch_ids)
        self.poll_interval = float(poll_interval)
        self.timeout = float(timeout)
        self.started_at = time.time() if started_at is None else float(started_at)
        self.cancel_on_kill = cancel_on_kill

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return _CLASSPATH, {
            "imagegen_conn_id": self.imagegen_conn_id,
            "batch_ids": self.batch_ids,
            "poll_interval": self.poll_interval,
            "timeout": self.timeout,
            "started_at": self.started_at,
            "cancel_on_kill": self.cancel_on_kill,
        }

    def _hook(self) -> Any:
        # Imported here: the triggerer loads this module to deserialize, the hook pulls in the transport.
        from imagegen_provider.hooks.image_generation import ImageGenerationHook

        return ImageGenerationHook(imagegen_conn_id=self.imagegen_conn_id)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self._hook()
        # The connection is read off the event loop: Airflow's lookup is synchronous.
        settings = await asyncio.to_thread(lambda: hook.settings)
        async with hook.get_client() as client:
            batches = BatchClient(client)
            secrets = [settings.api_key] if getattr(settings, "api_key", None) else []
            while True:
                statuses = await self._look(batches, secrets)
                if isinstance(statuses, TriggerEvent):
                    yield statuses
                    return
                if all(info.terminal for info in statuses):
                    yield _event({"status": "ended", "batches": {i.id: i.status for i in statuses}})
                    return
                if time.time() - self.started_at >= self.timeout:
                    yield _event({"status": "timeout", "batches": {i.id: i.status for i in statuses},
                                        "message": f"batches still running after {self.timeout:g} s"})
                    return
                await asyncio.sleep(self.poll_interval)

    async def _look(self, batches: BatchClient, secrets: list[str]) -> list[BatchInfo] | TriggerEvent:
        """Every batch's state, logged; a fatal error (bad key, unsupported) ends the wait with an event. A
        batch that could not be read this time counts as still running (the timeout bounds the wait)."""
        infos = []
        for batch_id in self.batch_ids:
            try:
                info = await batches.retrieve(batch_id)
            except ImageGenError as exc:
                message = redact(str(exc), secrets)
                if exc.fatal or getattr(exc, "status", None) in (401, 403, 404):
                    return _event({"status": "error", "message": f"batch {batch_id}: {message}"})
                self.log.warning("Batch %s: %s (asking again in %g s)", batch_id, message, self.poll_interval)
                info = BatchInfo(id=batch_id, status="in_progress")
            else:
                counts = info.counts
                self.log.info("Batch %s: %s, %d/%d requests done (%d failed)", info.id, info.status,
                              counts.completed + counts.failed, counts.total, counts.failed)
            infos.append(info)
        return infos

    async def on_kill(self) -> None:
        """The user killed the deferred task: cancel the batches (when ``cancel_on_kill``)."""
        if not self.cancel_on_kill:
            return
        hook = self._hook()
        await asyncio.to_thread(lambda: hook.settings)
        async with hook.get_client() as client:
            batches = BatchClient(client)
            for batch_id in self.batch_ids:
                try:
                    info = await batches.cancel(batch_id)
                    self.log.warning("Cancelled batch %s (%s)", batch_id, info.status)
                except ImageGenError as exc:
                    self.log.error("Could not cancel batch %s: %s", batch_id, type(exc).__name__)

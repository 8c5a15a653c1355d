"""What ``ImageGenerationOperator(api="batch")`` adds to the operator: batch options, the decision to defer,
the trigger, and reading the trigger's event. Kept here so the operator itself changes in a few lines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagegen_provider.engine.batch import DEFAULT_BATCH_TIMEOUT, BatchOptions
from imagegen_provider.engine.batch_plan import DEFAULT_MAX_BYTES, DEFAULT_MAX_REQUESTS
from imagegen_provider.hooks._airflow import AirflowException, AirflowFailException
from imagegen_provider.triggers.batch import BatchCompletionTrigger

API_CHOICES = ("sync", "batch")
#: Operator argument → :class:`BatchSettings` field.
OPERATOR_ARGUMENTS = {
    "api": "api",
    "deferrable": "deferrable",
    "batch_poll_interval": "poll_interval",
    "batch_timeout": "timeout",
    "cancel_batches_on_kill": "cancel_on_kill",
    "batch_max_requests": "max_requests",
    "batch_max_bytes": "max_bytes",
}
#: A task collects, resubmits what expired and defers again at most this many times.
MAX_DEFERRALS = 5


@dataclass(frozen=True)
class BatchSettings:
    """The operator's batch arguments.

    :param api: ``sync`` (one request per image) or ``batch`` (the gateway's Batch API, half the price).
    :param deferrable: release the worker while the batches run (default: yes for batch, when the connection
        is a gateway a triggerer can reach; the in-process bundled gateway cannot be polled from elsewhere).
    :param poll_interval: seconds between two looks at the batches.
    :param timeout: most seconds to wait for them; the task then fails and its retry collects.
    :param cancel_on_kill: killing the task cancels its batches.
    :param max_requests: most requests per batch input file.
    :param max_bytes: largest batch input file.
    """

    api: str = "sync"
    deferrable: bool | None = None
    poll_interval: float = 60.0
    timeout: float = DEFAULT_BATCH_TIMEOUT
    cancel_on_kill: bool = True
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.api not in API_CHOICES:
            raise ValueError(f"api must be one of {', '.join(API_CHOICES)}, not {self.api!r}")
        self.options(wait=True)  # the numbers are checked when the DAG is parsed, not when the task runs

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> BatchSettings:
        """The settings named by the operator's batch arguments (:data:`OPERATOR_ARGUMENTS`), removed from
        ``kwargs`` so that the rest goes to ``BaseOperator``."""
        return cls(**{field: kwargs.pop(name) for name, field in OPERATOR_ARGUMENTS.items() if name in kwargs})

    @property
    def batch(self) -> bool:
        return self.api == "batch"

    def defers(self, *, local_gateway: bool) -> bool:
        """Whether the task hands the waiting to the triggerer."""
        return self.batch and (self.deferrable if self.deferrable is not None else True) and not local_gateway

    def options(self, *, wait: bool) -> BatchOptions:
        return BatchOptions(wait=wait, poll_interval=self.poll_interval, timeout=self.timeout,
                            max_requests=self.max_requests, max_bytes=self.max_bytes,
                            cancel_on_stop=self.cancel_on_kill)

    def trigger(self, conn_id: str, batch_ids: list[str]) -> BatchCompletionTrigger:
        return BatchCompletionTrigger(imagegen_conn_id=conn_id, batch_ids=batch_ids,
                                      poll_interval=self.poll_interval, timeout=self.timeout,
                                      cancel_on_kill=self.cancel_on_kill)


def check_event(event: dict[str, Any] | None, output: Any) -> None:
    """Fail the task on a trigger event that did not end in every batch ending.

    :raises AirflowFailException: the gateway refused the key or forgot the batches (a retry cannot help).
    :raises AirflowException: the wait timed out (the batches go on; the task retry collects them).
    """
    status = (event or {}).get("status")
    if status == "ended":
        return
    message = (event or {}).get("message") or "no event"
    if status == "timeout":
        raise AirflowException(f"Batches still running ({message}); a rerun collects them into {output}")
    raise AirflowFailException(f"Waiting for the batches failed: {message}")

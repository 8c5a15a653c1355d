"""Storage SDKs' own request logs, quiet during a run unless asked for.

The Azure SDK logs every HTTP request and response at INFO (about 110 lines per image uploaded to ``az://``,
issue 14), botocore and urllib3 are as chatty at DEBUG: in a batch of thousands of images they drown the
progress lines and fill task logs. A run raises them to WARNING for its duration, unless the user asked for
them — set one of them to a level of their own, or put the root logger at DEBUG.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: The request loggers of the storage SDKs fsspec uses (adlfs, s3fs, gcsfs) and of their HTTP stacks.
STORAGE_REQUEST_LOGGERS = (
    "azure.core.pipeline.policies.http_logging_policy",
    "azure",
    "adlfs",
    "botocore",
    "aiobotocore",
    "s3fs",
    "gcsfs",
    "google.auth",
    "urllib3",
)

_lock = threading.Lock()
_depth = 0
_raised: dict[str, int] = {}


def _quiet() -> dict[str, int]:
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return {}  # the user asked for everything
    raised = {}
    for name in STORAGE_REQUEST_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:  # a level of its own means someone asked for it
            raised[name] = logger.level
            logger.setLevel(logging.WARNING)
    return raised


@contextmanager
def quiet_storage_logs() -> Iterator[None]:
    """Raise the storage SDKs' request loggers to WARNING while the block runs, and put them back after.

    Re-entrant and shared by concurrent runs in one process (threads or tasks): the first to enter raises the
    levels, the last to leave restores them.
    """
    global _depth, _raised
    with _lock:
        if _depth == 0:
            _raised = _quiet()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for name, level in _raised.items():
                    logging.getLogger(name).setLevel(level)
                _raised = {}

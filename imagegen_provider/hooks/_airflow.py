"""The Airflow names this provider uses, resolved on every supported Airflow (3.0 and later).

Airflow 3.0 keeps ``BaseHook`` in ``airflow.hooks.base`` and the task exceptions in ``airflow.exceptions``;
the Task SDK (``airflow.sdk``) took them over in later 3.x releases, and the task runner of those releases
checks for the SDK's classes. Import the SDK's first so that a failure is classified by the runner in use.
"""

from __future__ import annotations

try:
    from airflow.sdk import BaseHook
except ImportError:  # Airflow 3.0
    from airflow.hooks.base import BaseHook  # type: ignore[no-redef,attr-defined,unused-ignore]

try:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 3.0 and 3.1: not yet in the SDK
    from airflow.exceptions import (  # type: ignore[assignment,no-redef,attr-defined,unused-ignore]
        AirflowException,
        AirflowFailException,
    )

__all__ = ["AirflowException", "AirflowFailException", "BaseHook"]

"""Extra links on the task page: the generated images, and the run summary.

Airflow 3 computes a link in the worker right after the task ran (with the task's rendered fields) and keeps
it as an XCom for the UI, so the operator's rendered ``output_path`` is what the link reads.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseOperatorLink

from imagegen_provider.engine.finalize import SUMMARY_FILE


def browser_url(location: Any) -> str:
    """A URL a browser opens for a storage location: the cloud console of an object store, the file itself
    for a local path, the URL for http(s); ``""`` (no link) for stores without a known console."""
    text = str(location)
    if "://" not in text:
        folder = "/" if text.endswith("/") else ""  # abspath drops it; a folder link keeps it
        return "file://" + quote(os.path.abspath(text)) + folder
    parts = urlsplit(text)
    bucket = parts.netloc.rpartition("@")[2]  # an ObjectStoragePath prints its conn id as user info
    key = parts.path.lstrip("/")
    if parts.scheme in ("s3", "s3a"):
        return f"https://s3.console.aws.amazon.com/s3/buckets/{quote(bucket)}?prefix={quote(key)}"
    if parts.scheme in ("gs", "gcs"):
        return f"https://console.cloud.google.com/storage/browser/{quote(bucket)}/{quote(key)}"
    if parts.scheme in ("file", "local"):
        return "file://" + quote(parts.path)
    if parts.scheme in ("http", "https"):
        return text
    return ""


def _under(operator: Any, child: str) -> str:
    output = getattr(operator, "output_path", None)
    if output is None or "{{" in str(output):
        return ""
    return browser_url(str(output).rstrip("/") + "/" + child)


class ImageOutputLink(BaseOperatorLink):
    """The folder the task wrote its images to."""

    name = "Images"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return _under(operator, "images/")


class RunSummaryLink(BaseOperatorLink):
    """``run_summary.json`` of the dataset (completeness, failures, cost): written by a finalizing task."""

    name = "Run summary"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        if not getattr(operator, "writes_dataset_table", True):
            return ""
        return _under(operator, SUMMARY_FILE)

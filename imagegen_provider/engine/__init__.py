"""The batch engine (no Airflow): prompt table → images + metadata, resumable, budgeted."""

from imagegen_provider.engine.finalize import FinalizeReport, finalize_output
from imagegen_provider.engine.keys import derive_seed, image_file_name, safe_id
from imagegen_provider.engine.pricing import PriceTable
from imagegen_provider.engine.prompts import PromptColumns, PromptTable, PromptTableError
from imagegen_provider.engine.runner import BatchRunner, RunConfig, RunSummary
from imagegen_provider.engine.schema import COLUMNS, METADATA_SCHEMA

__all__ = [
    "COLUMNS", "METADATA_SCHEMA", "BatchRunner", "FinalizeReport", "PriceTable", "PromptColumns", "PromptTable",
    "PromptTableError", "RunConfig", "RunSummary", "derive_seed", "finalize_output", "image_file_name", "safe_id",
]

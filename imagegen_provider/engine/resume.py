"""What an output already holds: images stored and recorded as succeeded are never requested again."""

from __future__ import annotations

from dataclasses import dataclass, field

from imagegen_provider.engine.metadata import current_rows, read_metadata
from imagegen_provider.engine.schema import STATUS_SUCCEEDED
from imagegen_provider.engine.storage import StorageLocation

_COLUMNS = ["prompt_id", "image_index", "status", "file_name", "finished_at", "cost_usd"]


@dataclass
class ResumeState:
    #: (prompt_id, image_index) of images recorded as succeeded whose file is still there.
    done: set[tuple[str, int]] = field(default_factory=set)
    #: Images recorded as failed last time (they are retried).
    failed: int = 0
    #: Succeeded rows whose file has gone missing (they are generated again).
    missing_files: int = 0

    @classmethod
    def load(cls, output: StorageLocation) -> ResumeState:
        frame = current_rows(read_metadata(output, _COLUMNS))
        state = cls()
        if frame.empty:
            return state
        stored = set(output.list_files("images"))
        for prompt_id, index, status, file_name in zip(
            frame["prompt_id"], frame["image_index"], frame["status"], frame["file_name"], strict=True
        ):
            if status != STATUS_SUCCEEDED:
                state.failed += 1
            elif file_name in stored:
                state.done.add((prompt_id, int(index)))
            else:
                state.missing_files += 1
        return state

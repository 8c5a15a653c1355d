"""What batch mode writes before it spends: the JSONL input files and the manifests that make it resumable.

``custom_id`` is ``<image index>:<seed>:<prompt id>``: the two integers first, so that splitting on the first two
colons is unambiguous whatever the prompt id holds.

Input files are cut under ``max_requests`` lines and ``max_bytes`` bytes (OpenAI: 50,000 and 200 MB) and
written to local temporary files, never held in memory. Manifests live in the output under
``_batches/``: ``pending-<submission>.json`` is written after the upload and before the batch is created (the
batch has no id yet; its submission token is in the batch's metadata, so a crash in between is resolved by
looking the token up), then ``<batch id>.json`` once the gateway named it. A manifest lists every image its
batch holds: an image listed in a live batch's manifest is never submitted again.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from imagegen_provider.engine.storage import StorageLocation

log = logging.getLogger(__name__)

MANIFEST_DIR = "_batches"
PENDING_PREFIX = "pending-"
#: OpenAI's documented limits per batch input file.
DEFAULT_MAX_REQUESTS = 50_000
DEFAULT_MAX_BYTES = 200 * 1024 * 1024

#: Manifest states: ``submitting`` (uploaded, creation not confirmed), a gateway batch status, or ``collected``.
SUBMITTING = "submitting"
COLLECTED = "collected"
LIVE_STATES = frozenset({SUBMITTING, "validating", "in_progress", "finalizing", "cancelling"})
ENDED_STATES = frozenset({"completed", "failed", "expired", "cancelled"})


def custom_id(prompt_id: str, image_index: int, seed: int) -> str:
    return f"{image_index}:{seed}:{prompt_id}"


def parse_custom_id(value: str) -> tuple[str, int, int]:
    """``(prompt_id, image_index, seed)``.

    :raises ValueError: not a custom_id this package wrote.
    """
    index, _, rest = value.partition(":")
    seed, sep, prompt_id = rest.partition(":")
    if not sep:
        raise ValueError(f"custom_id {value[:80]!r} is not <index>:<seed>:<prompt id>")
    return prompt_id, int(index), int(seed)


@dataclass
class BatchManifest:
    """One submitted batch, as recorded in the output."""

    submission: str
    run_id: str
    shard: str
    input_file_id: str
    #: ``[prompt_id, image_index, seed]`` of every image the batch holds.
    images: list[tuple[str, int, int]]
    estimated_cost_usd: float | None = None
    batch_id: str | None = None
    state: str = SUBMITTING
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: dict[str, int] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    #: Set once collected: how many of its images were stored, failed, or left unfinished (resubmitted).
    collected: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Its file name under :data:`MANIFEST_DIR`."""
        return f"{self.batch_id}.json" if self.batch_id else f"{PENDING_PREFIX}{self.submission}.json"

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def keys(self) -> set[tuple[str, int]]:
        return {(prompt_id, index) for prompt_id, index, _ in self.images}

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BatchManifest:
        raw = json.loads(data)
        raw["images"] = [(str(p), int(i), int(s)) for p, i, s in raw["images"]]
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in raw.items() if key in known})


class ManifestStore:
    """The manifests of one output (every shard's; callers filter by :attr:`BatchManifest.shard`)."""

    def __init__(self, output: StorageLocation) -> None:
        self.output = output

    def load_all(self) -> list[BatchManifest]:
        manifests = []
        for path in self.output.list_files(MANIFEST_DIR, suffix=".json"):
            try:
                manifests.append(BatchManifest.from_json(self.output.read_bytes(path)))
            except (ValueError, KeyError, TypeError) as exc:
                # A damaged manifest must not hide its images forever, nor stop the run: say so loudly.
                log.error("Ignoring unreadable batch manifest %s (%s)", path, exc)
        return manifests

    def save(self, manifest: BatchManifest) -> None:
        """Write (atomically) under its current name; a pending manifest that got its batch id is renamed."""
        manifest.updated_at = time.time()
        self.output.write_bytes(f"{MANIFEST_DIR}/{manifest.name}", manifest.to_json(), atomic=True)
        if manifest.batch_id:
            pending = f"{MANIFEST_DIR}/{PENDING_PREFIX}{manifest.submission}.json"
            if self.output.exists(pending):
                self.output.remove([pending])

    def drop_pending(self, manifest: BatchManifest) -> None:
        """Forget a submission that never became a batch (its images are free again)."""
        self.output.remove([f"{MANIFEST_DIR}/{manifest.name}"])


@dataclass
class Chunk:
    """One batch input file being built: a local temporary file and the images in it."""

    file: IO[bytes] = field(
        default_factory=lambda: tempfile.TemporaryFile(prefix="imagegen-batch-", suffix=".jsonl")  # noqa: SIM115
    )
    images: list[tuple[str, int, int]] = field(default_factory=list)
    size: int = 0
    estimated_cost_usd: float | None = 0.0

    def fits(self, line: bytes, *, max_requests: int, max_bytes: int) -> bool:
        """Whether ``line`` may join this chunk under both limits (an empty chunk takes any line)."""
        if not self.images:
            return True
        return len(self.images) < max_requests and self.size + len(line) <= max_bytes

    def add(self, line: bytes, image: tuple[str, int, int], estimate: float | None) -> None:
        self.file.write(line)
        self.size += len(line)
        self.images.append(image)
        if self.estimated_cost_usd is not None:
            self.estimated_cost_usd = None if estimate is None else self.estimated_cost_usd + estimate

    def rewound(self) -> IO[bytes]:
        self.file.flush()
        self.file.seek(0)
        return self.file


def jsonl_line(custom: str, body: dict[str, Any], *, endpoint: str) -> bytes:
    return json.dumps({"custom_id": custom, "method": "POST", "url": endpoint, "body": body},
                      separators=(",", ":")).encode() + b"\n"

"""The cost ledger of last resort: paid rows the output refused, kept on this machine until a rerun.

When the output stops taking writes (disk full, bucket gone read-only, a file where the folder should be),
the rows of images already paid for cannot be journaled there. They go to a local JSON-lines file instead,
under ``$IMAGEGEN_RESCUE_DIR``, else ``~/.cache/imagegen/rescue``, else the system temp folder, in a folder
named after the output and shard. The next run of the same output and shard on this machine imports them
into the output's metadata before sending anything, so every payment ends up on record.

Images that were paid for but could not be stored are kept there too, with the row they would have had.
The import stores them and records that row: the same attempt (same run id and ``finished_at``) as the
failed row on record, which it supersedes (a success wins a tie) without counting its cost twice (cost
sums de-duplicate on run id, prompt id, image index and ``finished_at``). So the rerun pays for none of them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

from imagegen_provider.engine.row import MetadataRow

log = logging.getLogger(__name__)

ENV_RESCUE_DIR = "IMAGEGEN_RESCUE_DIR"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def _candidates() -> list[Path]:
    candidates = []
    if os.environ.get(ENV_RESCUE_DIR):
        candidates.append(Path(os.environ[ENV_RESCUE_DIR]))
    candidates.append(Path.home() / ".cache" / "imagegen" / "rescue")
    candidates.append(Path(tempfile.gettempdir()) / "imagegen-rescue")
    return candidates


def rescue_root() -> Path:
    """The first writable of ``$IMAGEGEN_RESCUE_DIR``, ``~/.cache/imagegen/rescue``, ``<tmp>/imagegen-rescue``
    (made on first use only: a run that never needs a rescue leaves no folder behind)."""
    candidates = _candidates()
    for folder in candidates:
        if _writable(folder):
            return folder
    return candidates[-1]


class RescueLedger:
    """Paid rows of one output shard that the output refused.

    :param output_uri: the output (its URI names the folder, with a hash so that any URI is a safe name).
    :param shard: the shard label.
    :param run_id: names the ledger file of this run.
    """

    def __init__(self, output_uri: str, *, shard: str, run_id: str, root: Path | None = None) -> None:
        digest = hashlib.sha256(output_uri.encode()).hexdigest()[:16]
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", output_uri)[-60:].strip("_")
        self._relative = Path(f"{readable}-{digest}") / shard
        self._file = f"ledger-{re.sub(r'[^A-Za-z0-9._-]+', '_', run_id)}.jsonl"
        self._root = root
        self.rows = 0
        self.images = 0

    @functools.cached_property
    def folder(self) -> Path:
        """Where this run keeps what the output refused (chosen, and made, on first use)."""
        return (self._root or rescue_root()) / self._relative

    @property
    def path(self) -> Path:
        return self.folder / self._file

    def _folders(self) -> list[Path]:
        """Every place an earlier run may have used (the first writable one then may not be now)."""
        roots = [self._root] if self._root is not None else _candidates()
        return [root / self._relative for root in roots]

    def keep(self, row: MetadataRow) -> None:
        """Append ``row`` (durably: flushed and synced, as it may be the only record of a payment)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            handle.write(row.to_json() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows += 1

    def keep_image(self, row: MetadataRow, data: bytes) -> None:
        """Keep an image the output refused, with its ``row`` (as it reads once the image is stored)."""
        assert row.file_name is not None
        target = self.folder / "images" / row.file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        with open(self.stored_path, "ab") as handle:
            handle.write(row.to_json() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.images += 1

    @property
    def stored_path(self) -> Path:
        return self.path.with_name(self.path.name.replace("ledger-", "images-", 1))

    @staticmethod
    def image_of(ledger: Path, row: MetadataRow) -> Path:
        """The kept image of ``row``, listed in ``ledger``."""
        assert row.file_name is not None
        return ledger.parent / "images" / row.file_name

    def pending(self, kind: str = "ledger") -> list[tuple[Path, list[MetadataRow]]]:
        """Files of ``kind`` (``ledger``: rows; ``images``: rows of kept images) left by earlier runs."""
        found = []
        ledgers = sorted(p for folder in self._folders() if folder.is_dir() for p in folder.glob(f"{kind}-*.jsonl"))
        for ledger in ledgers:
            rows = []
            for line in ledger.read_bytes().splitlines():
                try:
                    rows.append(MetadataRow.from_json(line))
                except (ValueError, TypeError):
                    # The last line of a run killed mid-write: its image is paid again, nothing worse.
                    log.warning("Skipping an unreadable line of %s", ledger)
            found.append((ledger, rows))
        return found

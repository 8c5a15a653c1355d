"""Seeds and object keys: pure functions of (base seed, prompt id, image index), whatever the sharding."""

from __future__ import annotations

import hashlib
import re

from imagegen_provider.wire.request import MAX_SEED

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_ID_CHARS = 80


def derive_seed(base_seed: int, prompt_id: str, image_index: int) -> int:
    """A stable seed in ``[0, 2**31)``: sha256 of the three inputs, so order, concurrency and shard layout
    never change it (Python's ``hash`` is salted per process; sha256 is not)."""
    digest = hashlib.sha256(f"{base_seed}\x1f{prompt_id}\x1f{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_SEED + 1)


def row_seed(seed: int, image_index: int) -> int:
    """Seed of image ``image_index`` of a row whose table sets ``seed``: the first image uses it as is."""
    return (seed + image_index) % (MAX_SEED + 1)


def safe_id(prompt_id: str) -> str:
    """A path segment for ``prompt_id`` that cannot escape the output folder.

    Ids that are already safe stay as they are (readable paths); others (``../x``, ``/etc``, control
    characters, very long ids) are cleaned and suffixed with a hash of the original, so two different ids
    never share a folder.
    """
    cleaned = _SAFE.sub("_", prompt_id).strip("._")
    if cleaned == prompt_id and 0 < len(prompt_id) <= _MAX_ID_CHARS:
        return prompt_id
    digest = hashlib.sha256(prompt_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{cleaned[:_MAX_ID_CHARS]}-{digest}" if cleaned else f"id-{digest}"


def image_file_name(prompt_id: str, image_index: int, seed: int, extension: str) -> str:
    """Path of an image relative to the output root."""
    return f"images/{safe_id(prompt_id)}/{image_index}-{seed}.{extension}"


def positional_id(position: int, prompt: str | None) -> str:
    """Id of a row in a table without an id column: its position and a hash of its prompt."""
    digest = hashlib.sha256((prompt or "").encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"row{position:08d}-{digest}"

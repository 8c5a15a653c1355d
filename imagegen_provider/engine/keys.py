"""Seeds and object keys: pure functions of (base seed, prompt id, image index), whatever the sharding.

Image folders (``images/<folder>/<image index>-<seed>.<ext>``) map prompt ids injectively, and safely on
case-insensitive filesystems (macOS, Windows, SMB shares) and on Windows:

- An id is used **as is** when it is already a *plain name*: 1 to 80 characters from the lowercase alphabet
  ``a-z 0-9 . _ -``, starting with a letter or digit, not ending with ``.``, not a Windows device name
  (``con``, ``prn``, ``aux``, ``nul``, ``com0``-``com9``, ``lpt0``-``lpt9``, also with an extension such as
  ``con.txt``), and not ending with ``-`` followed by 16 hex digits (the shape of the hashed form below).
- Every other id gets ``<prefix>-<hash>``: ``prefix`` is the id lowercased, with every character outside
  ``a-z 0-9 _ -`` replaced by ``_``, leading ``_``/``-`` stripped, cut to 80 characters (``id`` when nothing is
  left); ``hash`` is the first 16 hex digits of the sha256 of the **exact** id (UTF-8). Upper-case ids
  (``Case``), ids with ``/``, spaces, non-ASCII, device names and over-long ids all take this form.

Why it is injective: every folder name is lowercase, so names equal under case folding are equal. Two plain
names are equal only for equal ids. A plain name never ends with ``-`` + 16 hex digits and a hashed name
always does, so the two forms never meet. Two hashed names are equal only if the sha256 prefixes of two
different ids are (a 64-bit collision); :func:`folder_collision` lets the prompt reader reject even that
before anything is spent, naming both ids.

Ordinary lowercase ids (``p001``, ``row00000012-1a2b3c4d``, ``cat-42``) keep their folder. Ids with upper-case
letters map to a hashed folder (they kept their own name before): images stored earlier stay where they are and
are still found on resume (resume follows each image's recorded ``file_name``), new ones go to the new folder.
"""

from __future__ import annotations

import hashlib
import re

from imagegen_provider.wire.request import MAX_SEED

_MAX_ID_CHARS = 80
_HASH_CHARS = 16
_PLAIN = re.compile(r"[a-z0-9][a-z0-9._-]*")
_HASHED_SHAPE = re.compile(rf"-[0-9a-f]{{{_HASH_CHARS}}}$")
_NOT_PREFIX = re.compile(r"[^a-z0-9_-]+")
#: Names Windows reserves for devices, whatever the extension (``con.txt`` opens the console).
WINDOWS_DEVICE_NAMES = frozenset(
    {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
)


def derive_seed(base_seed: int, prompt_id: str, image_index: int) -> int:
    """A stable seed in ``[0, 2**31)``: sha256 of the three inputs, so order, concurrency and shard layout
    never change it (Python's ``hash`` is salted per process; sha256 is not)."""
    digest = hashlib.sha256(f"{base_seed}\x1f{prompt_id}\x1f{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_SEED + 1)


def row_seed(seed: int, image_index: int) -> int:
    """Seed of image ``image_index`` of a row whose table sets ``seed``: ``seed + image_index``, never wrapped
    (the plan rejects a row whose seeds leave ``[0, MAX_SEED]``)."""
    return seed + image_index


def is_plain_name(prompt_id: str) -> bool:
    """Whether ``prompt_id`` is its own folder name (see the module docstring)."""
    return (
        0 < len(prompt_id) <= _MAX_ID_CHARS
        and _PLAIN.fullmatch(prompt_id) is not None
        and not prompt_id.endswith(".")
        and prompt_id.split(".", 1)[0] not in WINDOWS_DEVICE_NAMES
        and _HASHED_SHAPE.search(prompt_id) is None
    )


def _id_hash(prompt_id: str) -> str:
    return hashlib.sha256(prompt_id.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]


def safe_id(prompt_id: str) -> str:
    """The folder of ``prompt_id``: one path segment, injective over ids even under case folding."""
    if is_plain_name(prompt_id):
        return prompt_id
    prefix = _NOT_PREFIX.sub("_", prompt_id.lower()).lstrip("_-")[:_MAX_ID_CHARS]
    return f"{prefix or 'id'}-{_id_hash(prompt_id)}"


def folder_collision(seen: dict[str, str], prompt_id: str) -> str | None:
    """Record ``prompt_id``'s folder in ``seen`` (folder -> id); return the id already holding that folder
    (``prompt_id`` itself for a repeated id), or ``None`` when the folder was free.

    Folder names are compared as a case-insensitive filesystem compares them; they are lowercase ASCII by
    construction, so case folding is the identity (and a plain id is its own key: no second copy in memory).
    """
    folder = safe_id(prompt_id)
    holder = seen.get(folder)
    if holder is None:
        seen[folder] = prompt_id
    return holder


def image_file_name(prompt_id: str, image_index: int, seed: int, extension: str) -> str:
    """Path of an image relative to the output root."""
    return f"images/{safe_id(prompt_id)}/{image_index}-{seed}.{extension}"


def positional_id(position: int, prompt: str | None) -> str:
    """Id of a row in a table without an id column: its position and a hash of its prompt."""
    digest = hashlib.sha256((prompt or "").encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"row{position:08d}-{digest}"

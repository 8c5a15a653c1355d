"""How a client setting is declared once: a dataclass field whose metadata names its connection extra, its
reader, its CLI flag and its help. The connection allow-list, the CLI options and the dataclass all derive
from these declarations (see :mod:`imagegen_provider.transport.settings`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field
from typing import Any

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def read_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("must be a boolean")


def read_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number")
        number = int(value)
    elif isinstance(value, (int, str)):
        try:
            number = int(value)
        except ValueError:
            raise ValueError("must be an integer") from None
    else:
        raise ValueError(f"must be an integer, got a {type(value).__name__}")
    if number < 0:
        raise ValueError("must not be negative")
    return number


def read_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"must be a number, got a {type(value).__name__}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    if number < 0:
        raise ValueError("must not be negative")
    return number


def read_str(value: Any) -> str:
    if isinstance(value, (Mapping, list, tuple, bool)) or not isinstance(value, (str, int, float)):
        raise ValueError(f"must be a string, got a {type(value).__name__}")
    return str(value)


def read_url(value: Any) -> str:
    text = read_str(value).strip()
    if not text.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return text.rstrip("/")


def read_json_object_or_file(value: Any) -> dict[str, Any]:
    """A JSON object, or the path of a file holding one (how a command line gives a price table)."""
    if isinstance(value, str) and not value.lstrip().startswith("{"):
        try:
            with open(value, encoding="utf-8") as handle:
                value = handle.read()
        except OSError as exc:
            # The path is not quoted: in a connection extra this string could be anything, a secret included.
            raise ValueError(f"must be a JSON object or a file holding one (file: {exc.strerror})") from None
    return read_json_object(value)


def read_aliases(value: Any) -> dict[str, str]:
    """``{"alias": "model"}``, or ``alias=model[,alias=model...]`` from a command line."""
    if isinstance(value, str) and not value.lstrip().startswith("{"):
        pairs = [item.partition("=") for item in value.split(",")]
        if any(not sep or not alias.strip() or not model.strip() for alias, sep, model in pairs):
            raise ValueError("takes ALIAS=MODEL[,ALIAS=MODEL] (e.g. my-gw-model=dall-e-3)")
        return {alias.strip(): model.strip() for alias, _, model in pairs}
    aliases = read_json_object(value)
    if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in aliases.items()):
        raise ValueError("must map model names to model names")
    return aliases


def read_json_object(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("must be a JSON object (it is not valid JSON)") from None
    if not isinstance(value, Mapping):
        raise ValueError("must be a JSON object")
    return dict(value)


@dataclass(frozen=True)
class Option:
    """Where a setting comes from.

    :param extra: the connection extra that sets it (``None``: not from extras, e.g. the API key, which is the
        connection's password).
    :param flag: the CLI option that sets it.
    :param reader: turns an extra's value or a CLI string into the setting's value; raises ``ValueError``
        with a message that never quotes the value (an extra in the wrong field could be a secret).
    :param aliases: older extra names still accepted.
    :param zero_is_default: ``0`` means "not set" (as it always has for these extras), not zero.
    :param secret: set from the connection's password, never from an extra.
    """

    extra: str | None
    flag: str | None
    help: str
    reader: Callable[[Any], Any] = read_str
    aliases: tuple[str, ...] = ()
    zero_is_default: bool = False
    choices: tuple[str, ...] | None = None
    secret: bool = False
    metavar: str | None = None

    @property
    def dest(self) -> str | None:
        return self.flag.lstrip("-").replace("-", "_") if self.flag else None

    @property
    def is_switch(self) -> bool:
        return self.reader is read_bool

    def read(self, value: Any) -> Any:
        """The setting's value, or ``None`` (not set)."""
        if value is None or value == "":
            return None
        parsed = self.reader(value)
        if self.zero_is_default and parsed == 0:
            return None
        return parsed


def option(option: Option, *, default: Any = MISSING, default_factory: Any = MISSING, repr: bool = True) -> Any:
    """A dataclass field declared with its :class:`Option`."""
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={"option": option}, repr=repr)
    return field(default=default, metadata={"option": option}, repr=repr)


def option_of(f: Field[Any]) -> Option | None:
    found = f.metadata.get("option")
    return found if isinstance(found, Option) else None

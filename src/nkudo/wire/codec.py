"""Strict JSON decoding that names the offending field.

Why a wrapper around ``msgspec.json.decode``: every consumer (HTTP handlers,
the agent, the CLI) wants the same thing on bad input — a ``ValidationError``
with a stable code and the JSON path of the field that was wrong — and never a
bare ``msgspec`` exception that a web layer would turn into a 500.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from nkudo.errors import ValidationError

T = TypeVar("T")

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"unknown field `(?P<name>[^`]*)`")
_MISSING = re.compile(r"missing required field `(?P<name>[^`]*)`")

_encoder = msgspec.json.Encoder()


class WireError(ValidationError):
    """A message did not match its schema; ``field`` is a dotted JSON path."""

    code = "INVALID_ARGUMENT"


def field_of(message: str, prefix: str = "") -> str | None:
    """Extract a dotted field path (``actions[0].params.vcpus``) from a msgspec error text."""
    path = ""
    m = _AT.search(message)
    if m:
        path = m.group("path").lstrip(".")
    name = None
    for rx in (_UNKNOWN, _MISSING):
        n = rx.search(message)
        if n:
            name = n.group("name")
            break
    parts = [p for p in (prefix, path, name) if p]
    joined = ".".join(parts).replace(".[", "[")
    return joined or None


def clean_message(message: str) -> str:
    return _AT.sub("", message)


def decode(data: bytes | str, type: type[T], *, prefix: str = "") -> T:
    """Decode ``data`` strictly into ``type`` or raise ``WireError`` naming the field."""
    try:
        return msgspec.json.decode(data, type=type)
    except msgspec.ValidationError as exc:
        text = str(exc)
        field = field_of(text, prefix)
        msg = clean_message(text)
        raise WireError(f"{msg} (field {field})" if field else msg, field=field) from None
    except msgspec.DecodeError as exc:
        raise WireError(f"malformed JSON: {exc}", field=prefix or None) from None


def convert(obj: Any, type: type[T], *, prefix: str = "") -> T:
    """Like ``decode`` for an already-parsed object (e.g. a stored params dict)."""
    try:
        return msgspec.convert(obj, type=type)
    except msgspec.ValidationError as exc:
        text = str(exc)
        field = field_of(text, prefix)
        msg = clean_message(text)
        raise WireError(f"{msg} (field {field})" if field else msg, field=field) from None


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)

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


#: msgspec's text for a failed pattern -> the sentence said instead (``described``).
_PATTERN_TEXT: dict[str, str] = {}


def described(pattern: str, text: str) -> str:
    """Record ``text`` as what a value failing ``pattern`` is told; return ``pattern`` (for the constant).

    Why: msgspec says "Expected `str` matching regex '...'", which for a free-text name is 300 characters
    of character classes; an operator wants to read what the field takes. The pattern stays the authority.
    """
    _PATTERN_TEXT[_pattern_failure(pattern)] = text
    return pattern


def pattern_text(pattern: str) -> str | None:
    """The sentence recorded for ``pattern`` by ``described``, if any."""
    return _PATTERN_TEXT.get(_pattern_failure(pattern))


def _pattern_failure(pattern: str) -> str:
    """msgspec's message for a value failing ``pattern`` (the ``- at `$...``` part removed)."""
    return f"Expected `str` matching regex {pattern!r}"


def clean_message(message: str) -> str:
    text = _AT.sub("", message)
    return _PATTERN_TEXT.get(text, text)


def decode(data: bytes | str, type: type[T], *, prefix: str = "") -> T:
    """Decode ``data`` strictly into ``type`` or raise ``WireError`` naming the field.

    Text that no database can store is refused here, once for every message, so SQLite and PostgreSQL
    answer the same 400: invalid UTF-8, lone UTF-16 surrogates (``\\ud800``) and NUL (``\\u0000``, which
    PostgreSQL rejects in text and jsonb columns). msgspec raises a bare ``UnicodeDecodeError`` for the
    first and calls the second "truncated", neither naming the field, hence ``_bad_text``.
    """
    try:
        out = msgspec.json.decode(data, type=type)
    except msgspec.ValidationError as exc:
        # A NUL inside a pattern-checked string fails the pattern first: say "NUL", not the field's regex.
        if _has_nul_escape(data):
            _raise_bad_text(data, prefix)
        text = str(exc)
        field = field_of(text, prefix)
        msg = clean_message(text)
        raise WireError(f"{msg} (field {field})" if field else msg, field=field) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        _raise_bad_text(data, prefix)
        raise WireError(f"malformed JSON: {exc}", field=prefix or None) from None
    except RecursionError:  # ``[[[[...]]]]`` deeper than the interpreter allows (issue 10 item 10)
        raise WireError("JSON is nested too deeply", field=prefix or None) from None
    if _has_nul_escape(data):
        _raise_bad_text(data, prefix)
    return out


_NUL_B = b"\\u0000"
_NUL_S = "\\u0000"


def _has_nul_escape(data: bytes | str) -> bool:
    """Whether the JSON text holds a ``\\u0000`` escape (maybe an escaped backslash: ``_raise_bad_text`` decides)."""
    return (_NUL_S in data) if isinstance(data, str) else (_NUL_B in data)


def _raise_bad_text(data: bytes | str, prefix: str) -> None:
    """Raise the error naming the first string (key or value) holding text no database can store, if any.

    Only runs on the error path or when a NUL escape occurs at all, so the stdlib re-parse costs nothing on
    ordinary messages. ``surrogateescape`` turns each invalid UTF-8 byte into a lone surrogate, so one
    walk finds both kinds.
    """
    import json

    text = data if isinstance(data, str) else bytes(data).decode("utf-8", errors="surrogateescape")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return
    found = _find_bad(doc, "")
    if found is None:
        return
    path, what = found
    field = ".".join(p for p in (prefix, path) if p).replace(".[", "[") or None
    raise WireError(f"{what} (field {field})" if field else what, field=field)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad_char(s: str) -> str | None:
    if "\x00" in s:
        return "text must not contain NUL characters"
    if _SURROGATE.search(s):
        return "text must be valid UTF-8 without lone surrogates"
    return None


def storable_text(s: str) -> str:
    """``s`` with every character ``decode`` refuses (NUL, lone surrogates) replaced by U+FFFD.

    Why: the agent forwards text it does not control (a host command's output, a VMM's error) in log
    lines and results; the control plane refuses such characters with a 400, which would make the agent
    drop the whole report. Cleaning it on the sending side keeps the rest of the text.
    """
    if "\x00" not in s and not _SURROGATE.search(s):
        return s
    return _SURROGATE.sub("\ufffd", s.replace("\x00", "\ufffd"))


def _find_bad(obj: Any, path: str) -> tuple[str, str] | None:
    """(JSON path, reason) of the first string in ``obj`` that ``_bad_char`` refuses (iterative: no depth limit)."""
    stack: list[tuple[Any, str]] = [(obj, path)]
    while stack:
        node, here = stack.pop()
        if isinstance(node, str):
            why = _bad_char(node)
            if why:
                return here, why
        elif isinstance(node, dict):
            items = list(node.items())
            for k, v in reversed(items):
                why = _bad_char(k)
                if why:
                    return f"{here}.{k.encode('unicode_escape').decode()}".lstrip("."), why
                stack.append((v, f"{here}.{k}".lstrip(".")))
        elif isinstance(node, list):
            stack.extend((v, f"{here}[{i}]") for i, v in reversed(list(enumerate(node))))
    return None


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

"""Cursor paging (issue 13): the one definition of ``limit`` and of the opaque ``next`` cursor of every list route.

Why keyset cursors and not offsets: an offset counts rows, so a row inserted (or deleted) before the
reader's position shifts every later page by one (a duplicate or a skipped row), and the database still
walks every skipped row. A cursor names the sort key of the last row returned; the next page is "rows
strictly after it" on an index, as fast for page 200 as for page 1, and rows inserted while a client pages
never move the rows it has not read yet. Each listing therefore orders by immutable keys that are unique
together (see ``PageKind``): a mutable key (a VM's ``updated_at``) would let a row jump over the cursor.

Why no secret: a cursor only says where to resume; which rows a principal may see is decided by the
query's WHERE clause, never by the cursor, so a forged cursor can at most skip rows the client could read
anyway. The short checksum only turns an edited or truncated cursor into a clear 400 ``INVALID_CURSOR``
instead of a silently different page, and the kind in the payload refuses a cursor of another route.

Pure: no I/O, no database types; the use cases turn ``after()`` into a WHERE clause.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

import msgspec

from nkudo.cp.errors import BadRequest

#: The documented maximum of ``limit`` on every list route, and its default.
MAX_LIMIT: Final = 1000
DEFAULT_LIMIT: Final = 100
#: Longer than any cursor this module writes (the longest key is a 253-character hostname plus a UUID).
MAX_CURSOR_CHARS: Final = 1024

_TOKEN = re.compile(rf"[A-Za-z0-9_-]{{12,{MAX_CURSOR_CHARS}}}\Z")
_TAG_BYTES: Final = 8
_TAG_CONTEXT: Final = b"nkudo-cursor:v1\x00"

R = TypeVar("R")


class PageKind(enum.StrEnum):
    """Which listing a cursor belongs to; each has its own sort key (value types in ``_KEYS``)."""

    VMS = "vms"                # vm_id ascending (unique within the site)
    AGENTS = "agents"          # enrolled_at descending, id
    HOSTS = "hosts"            # hostname ascending (unique within the site), id
    PLANS = "plans"            # created_at descending, id
    EXECUTIONS = "executions"  # created_at descending, plan_id, position (the order the route always had)
    AUDIT = "audit"            # a tenant's events: id descending
    ADMIN_AUDIT = "admin-audit"  # every chain's events (admin): id descending


_STR, _INT, _TS = str, int, dt.datetime
_KEYS: Final[dict[PageKind, tuple[type, ...]]] = {
    PageKind.VMS: (_STR,),
    PageKind.AGENTS: (_TS, _STR),
    PageKind.HOSTS: (_STR, _STR),
    PageKind.PLANS: (_TS, _STR),
    PageKind.EXECUTIONS: (_TS, _STR, _INT),
    PageKind.AUDIT: (_INT,),
    PageKind.ADMIN_AUDIT: (_INT,),
}

Key = tuple[str | int | dt.datetime, ...]


def invalid(why: str) -> BadRequest:
    return BadRequest(f"cursor is not valid here ({why}); pass the `next` value of the previous page of this "
                      "list unchanged", code="INVALID_CURSOR", field="cursor")


def check_limit(limit: int) -> int:
    """``limit`` must be 1..``MAX_LIMIT``: every list use case checks it, whoever calls it (HTTP, UI, CLI)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer between 1 and {MAX_LIMIT}", field="limit")
    return limit


def _tag(body: bytes) -> bytes:
    return hashlib.sha256(_TAG_CONTEXT + body).digest()[:_TAG_BYTES]


def encode(kind: PageKind, key: Key) -> str:
    """The opaque cursor for "rows after ``key``" in ``kind``'s order (url-safe base64, no padding)."""
    if len(key) != len(_KEYS[kind]):  # pragma: no cover - a programming error in a use case
        raise AssertionError(f"{kind} cursors have {len(_KEYS[kind])} key values")
    parts: list[str | int] = [kind.value]
    for value in key:
        parts.append(value.astimezone(dt.UTC).isoformat() if isinstance(value, dt.datetime) else value)
    body = msgspec.json.encode(parts)
    return base64.urlsafe_b64encode(body + _tag(body)).rstrip(b"=").decode()


def decode(kind: PageKind, cursor: str) -> Key:
    """The key a cursor of ``kind`` resumes after; anything else is a 400 ``INVALID_CURSOR`` naming ``cursor``."""
    if not isinstance(cursor, str) or not _TOKEN.match(cursor):
        raise invalid("malformed")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise invalid("malformed") from None
    body, tag = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
    if not hmac.compare_digest(tag, _tag(body)):
        raise invalid("altered or truncated")
    try:
        parts = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise invalid("malformed") from None
    if not isinstance(parts, list) or not parts or parts[0] != kind.value:
        raise invalid(f"not a cursor of this {kind.value} list")
    types, values = _KEYS[kind], parts[1:]
    if len(values) != len(types):
        raise invalid("wrong shape")
    out: list[str | int | dt.datetime] = []
    for typ, value in zip(types, values, strict=True):
        if typ is _TS:
            out.append(_timestamp(value))
        elif typ is _INT and type(value) is int:
            out.append(value)
        elif typ is _STR and type(value) is str and 0 < len(value) <= 300:
            out.append(value)
        else:
            raise invalid("wrong shape")
    return tuple(out)


def _timestamp(value: object) -> dt.datetime:
    if not isinstance(value, str) or len(value) > 40:
        raise invalid("wrong shape")
    try:
        ts = dt.datetime.fromisoformat(value)
    except ValueError:
        raise invalid("wrong shape") from None
    if ts.tzinfo is None:
        raise invalid("wrong shape")
    return ts.astimezone(dt.UTC)


def after(kind: PageKind, cursor: str | None) -> Key | None:
    """The decoded key to resume after, or None for the first page."""
    return None if cursor is None else decode(kind, cursor)


def cut(kind: PageKind, rows: Sequence[R], limit: int, key: Callable[[R], Key]) -> tuple[Sequence[R], str | None]:
    """The page (the first ``limit`` rows) and its ``next`` cursor.

    The query fetches ``limit + 1`` rows: the extra row only says that another page exists, so ``next`` is
    omitted exactly on the last page (a full last page does not cost the client an empty request).
    """
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    return page, encode(kind, key(page[-1]))


def log_seq(cursor: str) -> int:
    """An execution log's cursor: the last ``seq`` read, in decimal (that list has always paged by ``seq``)."""
    if not isinstance(cursor, str) or not 1 <= len(cursor) <= 19 or not cursor.isascii() or not cursor.isdigit():
        raise invalid("not a log position")
    return int(cursor)

"""Paths built from plan input never leave their root directory.

Identifiers are validated by pattern before they get here; this module is the
second line: it joins, resolves symlinks and refuses anything outside the root
(``PATH_ESCAPE``). Host paths a plan *names* (kernel, image) must lie inside
one of the operator's allowed image roots.
"""

from __future__ import annotations

import os
import re

from nkudo.errors import NkudoError, ValidationError
from nkudo.wire.actions import IDENT_PATTERN
from nkudo.wire.vocab import ErrorCode

#: The wire's identifier pattern (``\Z``-anchored: a trailing newline is not a safe component).
SAFE_COMPONENT = re.compile(IDENT_PATTERN)
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL


def safe_join(root: str, *parts: str, field: str = "params") -> str:
    """``root/part/...`` after checking each part and that the result stays under ``root``."""
    for p in parts:
        if not SAFE_COMPONENT.match(p) or p in (".", ".."):
            raise ValidationError(f"{field} {p!r} is not a safe path component", field=field)
    root_real = os.path.realpath(root)
    path = os.path.join(root_real, *parts)
    real = os.path.realpath(path)
    if real != path or os.path.commonpath([root_real, real]) != root_real:
        raise NkudoError(f"{field}: {path!r} resolves outside {root_real!r}", code=ErrorCode.PATH_ESCAPE, field=field)
    return path


def within_roots(path: str, roots: tuple[str, ...], field: str) -> str:
    """Resolve a host path named by a plan; it must exist inside one of ``roots``."""
    if not os.path.isabs(path):
        raise ValidationError(f"{field} must be an absolute path", field=field)
    real = os.path.realpath(path)
    for r in roots:
        rr = os.path.realpath(r)
        if os.path.commonpath([rr, real]) == rr:
            if not os.path.isfile(real):
                raise NkudoError(
                    f"{field} {path!r} does not exist or is not a file", code=ErrorCode.FILE_NOT_FOUND, field=field
                )
            return real
    raise NkudoError(
        f"{field} {path!r} is outside the allowed image roots ({', '.join(roots) or 'none configured'})",
        code=ErrorCode.PATH_NOT_ALLOWED,
        field=field,
    )


def check_socket_path(path: str) -> str:
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise NkudoError(
            f"API socket path {path!r} is longer than {SUN_PATH_MAX} bytes; use a shorter --runtime-dir",
            code=ErrorCode.PATH_TOO_LONG,
        )
    return path

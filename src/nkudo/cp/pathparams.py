"""Path parameters that both HTTP front ends (the API in ``http.py`` and the dashboard in ``web/``) read.

Why one module: an id that fails the wire's own pattern cannot name anything that exists, so both front
ends answer it with the same 404 as a foreign or unknown id (never a 400 that tells a prober which ids
are well formed), and they must agree on the patterns, which are the wire's ``\\Z``-anchored ones
(issue 10 item 2: ``$`` would let ``"id\\n"`` through).
"""

from __future__ import annotations

import re

from aiohttp import web

from nkudo.cp.errors import NotFound
from nkudo.wire import messages as wm
from nkudo.wire.actions import IDENT_PATTERN

_UUID = re.compile(wm.UUID_PATTERN)
_IDENT = re.compile(IDENT_PATTERN)


def path_uuid(request: web.Request, name: str) -> str:
    """A UUID path parameter such as ``site_id``; anything else is the 404 of an unknown ``site``."""
    value = request.match_info[name]
    if not _UUID.match(value):
        kind = name.removesuffix("_id")
        raise NotFound(f"{kind} not found", code=f"{kind.upper()}_NOT_FOUND")
    return value


def vm_path_id(request: web.Request) -> str:
    """The ``vm_id`` path parameter: the wire's identifier pattern, or the 404 of an unknown VM."""
    value = request.match_info["vm_id"]
    if not _IDENT.match(value):
        raise NotFound("VM not found", code="VM_NOT_FOUND")
    return value

"""Untyped JSON documents (plan files) loaded with the same error contract as typed messages.

Why a function of its own: ``json.loads`` raises ``RecursionError`` on a document nested deeper than the
interpreter's recursion limit (``[[[[...]]]]`` 100000 deep), which is not a ``ValueError`` and used to
surface as "internal error: RecursionError" (issue 10 item 10). A malformed document is a validation
error with a code and a field, however it is malformed.
"""

from __future__ import annotations

import json
from typing import Any

from nkudo.wire.codec import WireError


def nesting_error(what: str, field: str | None) -> WireError:
    """The one error for a document nested too deeply to decode (shared by every JSON entry point)."""
    return WireError(f"{what} is nested too deeply (arrays/objects inside each other)", field=field)


def loads(text: str | bytes, *, what: str, field: str | None) -> Any:
    """Parse JSON text; any malformation is a ``WireError`` naming ``field``, never another exception."""
    try:
        return json.loads(text)
    except RecursionError:
        raise nesting_error(what, field) from None
    except ValueError as exc:
        raise WireError(f"{what} is not valid JSON: {exc}", field=field) from None

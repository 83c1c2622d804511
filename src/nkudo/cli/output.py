"""Terminal output helpers: colour only on a TTY (and never with NO_COLOR)."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any

_CODES = {"green": "32", "red": "31", "yellow": "33", "dim": "2", "bold": "1"}


def use_colour(stream: IO[str]) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def paint(text: str, colour: str, enabled: bool) -> str:
    return f"\033[{_CODES[colour]}m{text}\033[0m" if enabled else text


def print_json(obj: Any, stream: IO[str] | None = None) -> None:
    import json

    out = stream or sys.stdout
    out.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

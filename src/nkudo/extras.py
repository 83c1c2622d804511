"""Which optional extra each command needs, and the one sentence printed when it is missing.

Why: ``pip install nkudo`` installs only what the edge agent needs (issue 14), but the
console scripts of the control plane and the simulator are installed with it (an entry
point cannot depend on an extra). Without this check such a command would die with an
``ImportError`` traceback deep inside a subcommand; instead it says which extra to install.
Kept free of third-party imports: it runs before any of them could be found missing.
"""

from __future__ import annotations

import importlib.util
import sys
from enum import StrEnum
from typing import Final


class Extra(StrEnum):
    """The optional-dependency groups of ``pyproject.toml`` that carry a command."""

    CONTROL_PLANE = "control-plane"
    SIMULATOR = "simulator"


#: Top-level modules each extra provides (the distributions are in ``pyproject.toml``;
#: tests/test_distribution.py checks that the two lists name the same packages).
MODULES: Final[dict[Extra, tuple[str, ...]]] = {
    Extra.CONTROL_PLANE: ("aiohttp", "sqlalchemy", "alembic", "psycopg", "yaml", "jinja2", "aiohttp_jinja2", "argon2"),
    Extra.SIMULATOR: ("jsonschema", "yaml"),
}


def missing_sentence(extra: Extra, command: str) -> str:
    """The one line a user sees: what is missing and the command that installs it."""
    return (f"{command}: this command needs the '{extra.value}' extra, which is not installed; "
            f"install it with: pip install 'nkudo[{extra.value}]'")


def missing_modules(extra: Extra) -> list[str]:
    """The modules of ``extra`` that cannot be found (found = importable; nothing is imported)."""
    return [m for m in MODULES[extra] if importlib.util.find_spec(m) is None]


def require(extra: Extra, command: str) -> int | None:
    """``None`` when ``extra`` is installed; otherwise print the sentence to stderr and return exit code 1."""
    if not missing_modules(extra):
        return None
    sys.stderr.write(missing_sentence(extra, command) + "\n")
    return 1


def is_missing_extra(exc: ImportError, extra: Extra) -> bool:
    """Whether ``exc`` is a module of ``extra`` not being installed (not a bug in nkudo's own imports)."""
    name = (exc.name or "").partition(".")[0]
    return isinstance(exc, ModuleNotFoundError) and name in MODULES[extra]

"""Terminal output of ``nkudo-edge``: colour only on a TTY (never with NO_COLOR), and the one error reporter.

Both the start-up fast path and the click path report every error through
:func:`report_usage`, :func:`report_failure` and :func:`report_exception`, so an
error gives the same line and the same exit code whichever path parsed the
command line. Kept free of heavy imports: it is on the start-up path.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any, Final

    from nkudo.errors import NkudoError

PROG = "nkudo-edge"


class ExitCode:
    """The exit codes of ``nkudo-edge`` (scripts and the systemd unit depend on them).

    Named ints rather than an ``IntEnum``: importing ``enum`` (with the functools and collections it
    pulls in) took 5 ms, a quarter of what ``nkudo-edge version`` adds to a bare interpreter start.
    """

    OK: Final = 0
    #: A command or a host check failed; the reason is on stderr (or in the JSON).
    FAILURE: Final = 1
    #: The command line is wrong (as click's own usage errors).
    USAGE: Final = 2
    #: ``run``: the control plane rejected this agent's identity; restarting will not help.
    IDENTITY_GONE: Final = 3
    #: Interrupted by SIGINT (128 + 2, as shells report it).
    INTERRUPTED: Final = 130


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


def report_usage(message: str, command_path: str = PROG) -> int:
    """A wrong command line: one line naming what is wrong and where help is; exit code 2."""
    sys.stderr.write(f"{command_path}: error: {message} (see '{command_path} --help')\n")
    return ExitCode.USAGE


def report_failure(exc: NkudoError, *, as_json: bool = False, advice: str = "") -> int:
    """A failed command: JSON on stdout with ``--json``, else ``code: message`` (plus advice) on stderr."""
    if as_json:
        print_json({"ok": False, "error": {**exc.to_dict(), **({"advice": advice} if advice else {})}})
    else:
        sys.stderr.write(f"{PROG}: error: {exc.code}: {exc.message}\n")
        if advice:
            sys.stderr.write(f"  {advice}\n")
    return ExitCode.FAILURE


def report_stop(code: int, reason: str) -> int:
    """The daemon stopped with ``code``; a non-zero one gets its reason on stderr."""
    if code != ExitCode.OK:
        sys.stderr.write(f"{PROG}: {reason}\n")
    return code


def is_internal(exc: BaseException) -> bool:
    """True for a bug (not a usage error, failure, interrupt or closed pipe): --log-level debug re-raises it."""
    from nkudo.errors import NkudoError

    return not isinstance(exc, NkudoError | KeyboardInterrupt | BrokenPipeError)


def report_exception(exc: BaseException) -> int:
    """The last resort of both paths: one line for operators, never a traceback; the exit code."""
    from nkudo.errors import NkudoError, UsageError

    if isinstance(exc, KeyboardInterrupt):
        sys.stderr.write(f"{PROG}: interrupted\n")
        return ExitCode.INTERRUPTED
    if isinstance(exc, BrokenPipeError):
        _silence_stdout()
        return ExitCode.FAILURE
    if isinstance(exc, UsageError):
        return report_usage(exc.message)
    if isinstance(exc, NkudoError):
        return report_failure(exc)
    sys.stderr.write(
        f"{PROG}: internal error: {type(exc).__name__}: {exc} (rerun with --log-level debug for details)\n"
    )
    return ExitCode.FAILURE


def _silence_stdout() -> None:
    """The reader of stdout went away: send what is still buffered to /dev/null, so the
    interpreter's final flush does not print a BrokenPipeError and exit 120."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass
